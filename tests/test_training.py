"""mm_rec_train/data.py: the corpus from text, JSON-lines files and saved datasets, the held-out
split, and the presets' model sizes."""

import json

import pytest

pytest.importorskip("datasets", reason="load_corpus reads saved datasets.Dataset folders")

import torch  # noqa: E402

from mm_rec import MMRecConfig, MMRecForCausalLM  # noqa: E402
from mm_rec_train.data import load_corpus, split_corpus  # noqa: E402
from mm_rec_train.runs import PRESETS  # noqa: E402


def test_corpus_from_jsonl_and_a_saved_dataset(tmp_path):
    import datasets

    records = [{"text": f"document {i}\nwith two lines", "id": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    corpus = load_corpus([str(tmp_path / "a.jsonl")])
    assert list(corpus.documents.values()) == [r["text"] for r in records] and corpus.validation is None
    train_texts, held_out = split_corpus(corpus, 0.2)
    assert len(held_out) == 1 and set(held_out.values()) | set(train_texts.values()) == set(corpus.documents.values())

    datasets.DatasetDict(train=datasets.Dataset.from_list(records[:3]), validation=datasets.Dataset.from_list(records[3:])
                         ).save_to_disk(str(tmp_path / "saved"))
    train_texts, held_out = split_corpus(load_corpus([str(tmp_path / "saved")], max_documents=2), 0.05)
    assert list(train_texts.values()) == [records[0]["text"], records[1]["text"]]
    assert list(held_out.values()) == [records[3]["text"], records[4]["text"]]

    (tmp_path / "one.txt").write_text("line one\nline two\nline three\nline four\n")
    train_texts, held_out = split_corpus(load_corpus([str(tmp_path / "one.txt")]), 0.3)
    assert "".join(train_texts.values()) + "".join(held_out.values()) == "line one\nline two\nline three\nline four"
    assert list(held_out.values()) == ["\nline three\nline four"]  # the last line break before 70%


def test_presets_set_sizes_only_and_take_the_default_architecture():
    """A preset differs from MMRecConfig's defaults in size fields only; a model built from it has
    every architecture field at its default."""
    from mm_rec_train.runs import SIZE_FIELDS

    defaults = MMRecConfig().to_dict()
    for name, preset in PRESETS.items():
        assert set(preset["model"]) <= set(SIZE_FIELDS), name
        built = MMRecConfig(vocab_size=preset["vocab_size"], **preset["model"]).to_dict()
        differ = {k for k in defaults if built.get(k) != defaults[k]}
        assert differ <= {*SIZE_FIELDS, "vocab_size", "pe_dim"}, (name, differ)  # pe_dim follows hidden_size
        assert built["pe_dim"] == built["hidden_size"]


@pytest.mark.parametrize("preset, low, high",
                         [("tiny", 0.01, 0.1), ("laptop", 1.0, 1.5), ("gpu-small", 15, 25), ("gpu-130m", 100, 135)])
def test_preset_sizes(preset, low, high):
    config = MMRecConfig(vocab_size=PRESETS[preset]["vocab_size"], **PRESETS[preset]["model"])
    with torch.device("meta"):
        model = MMRecForCausalLM(config)
    assert low <= model.num_parameters() / 1e6 <= high
