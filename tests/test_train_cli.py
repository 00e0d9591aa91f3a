"""mm_rec_train/cli.py from the user's side: the resume command printed on Ctrl-C runs as printed,
the thread count (its definition; --threads and OMP_NUM_THREADS win), and --help answers
before torch is imported."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from script_runs import script  # noqa: E402

from mm_rec_train import cli
from mm_rec_train.runs import REPOSITORY

SCRIPTS = ("train", "evaluate", "generate")


def _env():
    return {**os.environ, "PYTHONPATH": str(REPOSITORY)}


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_answers_before_torch_is_imported(name):
    """What the interpreter has imported when --help has printed and exited: no torch, no transformers."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{name!r} + '.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(REPOSITORY / 'scripts' / f'{name}.py')!r}, run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    status = done.code\n"
        "print('\\nIMPORTED', status, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    help_text, _, imported = result.stdout.rpartition("\nIMPORTED ")
    assert help_text.lstrip().startswith("usage:") and "--help" in help_text
    assert imported.split() == ["0", "[]"], imported


def test_train_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit) as done:
        script("train").parse_args(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--threads" in out and "--allow-cpu" in out


# ----------------------------------------------------------------------------- the resume command


def _as_shown(path, cwd: Path, command: bool) -> str:
    """A path as a user in ``cwd`` types it: relative inside ``cwd`` (./NAME for a command in it,
    which a shell would otherwise look up in PATH), absolute elsewhere."""
    path = Path(os.path.abspath(path))
    if cwd not in path.parents:
        return str(path)
    relative = path.relative_to(cwd)
    return f"./{relative}" if command and len(relative.parts) == 1 else str(relative)


def test_command_line_names_the_running_interpreter(tmp_path, monkeypatch):
    project = tmp_path / "project"
    venv_python = project / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    script = project / "scripts" / "train.py"
    monkeypatch.setattr(sys, "executable", str(venv_python))

    monkeypatch.chdir(project)
    command = cli.command_line(script, ["--output-dir", "runs/my run", "--resume"])
    assert shlex.split(command) == [".venv/bin/python", "scripts/train.py", "--output-dir", "runs/my run", "--resume"]

    monkeypatch.chdir(venv_python.parent)
    assert shlex.split(cli.command_line(script, []))[0] == "./python"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert shlex.split(cli.command_line(script, ["-x"])) == [str(venv_python), str(script), "-x"]
    assert shlex.split(cli.command_line(script, ["-x"], interpreter=False)) == [str(script), "-x"]


@pytest.mark.slow
def test_ctrl_c_prints_a_resume_command_that_resumes(data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C, then the printed command pasted into a shell: it runs under this interpreter and finishes the run."""
    pytest.importorskip("datasets")
    import transformers

    out = tmp_path / "run"
    step = transformers.Trainer.training_step

    def ctrl_c_at_step_2(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "training_step", ctrl_c_at_step_2)
        status = script("train").main(["--preset", "tiny", "--eval-blocks", "4", "--data", str(data_dir), "--max-steps", "4",
                                        "--eval-steps", "2", "--threads", "1", "--output-dir", str(out)])
    assert status == 130
    err = capsys.readouterr().err
    command = err.split("Resume with: ", 1)[1].strip()
    assert shlex.split(command) == [_as_shown(sys.executable, Path.cwd(), True),
                                    _as_shown(REPOSITORY / "scripts" / "train.py", Path.cwd(), False),
                                    "--output-dir", str(out), "--resume"]
    assert not (out / "results.json").exists()

    result = subprocess.run(command, shell=True, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["optimizer steps"] == 4 and results["threads"] >= 1


# ----------------------------------------------------------------------------- threads


def _nearest_idle(cpus, load, processes):
    """The definition, independently: the whole number of threads in [1, cpus // processes] nearest
    to each process's share of the idle cores, the larger one on a tie."""
    share = (cpus - max(0.0, load)) / processes
    return min(range(1, max(1, cpus // processes) + 1), key=lambda n: (abs(n - share), -n))


@pytest.mark.parametrize("cpus, load, processes", [
    (2, 0.0, 1), (2, 0.4, 1), (2, 0.5, 1), (2, 0.6, 1), (2, 1.5, 1), (2, 2.7, 1), (2, 9.0, 1), (8, 5.3, 1), (8, 0.1, 1),
    (16, 3.2, 1), (16, 3.2, 4), (16, 15.9, 4), (4, 0.0, 8), (64, 0.0, 1), (3, 0.5, 1), (8, -1.0, 1),
])
def test_idle_threads_is_the_idle_cores(cpus, load, processes):
    assert cli.idle_threads(cpus, load, processes) == _nearest_idle(cpus, load, processes)


STAT = """cpu  900 0 300 1800 0 0 0 0 0 0
cpu0 {0} 0 100 {1} {2} 0 0 0 0 0
cpu1 200 0 100 700 0 0 0 0 0 0
cpu2 100 0 0 {3} 0 0 0 0 0 0
intr 12345
"""


def test_busy_cores_are_each_cores_share_of_non_idle_time_between_two_readings():
    """Core 0: 40 of 90 jiffies busy (iowait counts as idle); core 1: none passed; core 2: all
    idle. Only the usable cores count."""
    before = cli.cpu_times(STAT.format(100, 400, 0, 500))
    after = cli.cpu_times(STAT.format(140, 440, 10, 600))
    assert before[1] == (1000, 700) and after[0] == (690, 450)
    assert cli.busy_between(before, after, {0, 1, 2}) == pytest.approx(40 / 90)
    assert cli.busy_between(before, after, {2}) == 0.0
    measured = cli.busy_cores(window=0.05)
    assert measured is None or 0.0 <= measured <= cli.usable_cpus() + 1e-9


@pytest.fixture
def no_training(monkeypatch):
    """train.py up to the training, which records the thread count instead of training."""
    import mm_rec_train.trainer

    seen = []

    def record(*args, **kwargs):
        import torch

        seen.append(torch.get_num_threads())

    monkeypatch.setattr(mm_rec_train.trainer, "train", record)
    return seen


def _busy_machine(monkeypatch, cpus=8, load=5.3):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(cli, "busy_cores", lambda: load)
    for name in cli.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_train_picks_the_idle_cores_and_says_so(torch_threads, no_training, tmp_path, monkeypatch, capsys):
    _busy_machine(monkeypatch, cpus=8, load=5.3)
    assert script("train").main(["--preset", "tiny", "--output-dir", str(tmp_path / "run")]) == 0
    expected = _nearest_idle(8, 5.3, 1)
    assert no_training == [expected]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("threads:")]
    assert lines == [f"threads: {expected} (8 cores, 5.3 busy; set --threads or OMP_NUM_THREADS to choose)"]


def test_threads_flag_and_environment_win(torch_threads, no_training, tmp_path, monkeypatch, capsys):
    _busy_machine(monkeypatch, cpus=8, load=5.3)  # the idle cores would give 3
    train = script("train")
    assert train.main(["--preset", "tiny", "--threads", "2", "--output-dir", str(tmp_path / "a")]) == 0
    assert "threads: 2 (--threads)" in capsys.readouterr().out

    torch_threads.set_num_threads(5)  # what torch does at import under OMP_NUM_THREADS=5
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert train.main(["--preset", "tiny", "--output-dir", str(tmp_path / "b")]) == 0
    assert "threads: 5 (OMP_NUM_THREADS=5)" in capsys.readouterr().out
    assert train.main(["--preset", "tiny", "--threads", "1", "--output-dir", str(tmp_path / "c")]) == 0
    assert "threads: 1 (--threads)" in capsys.readouterr().out
    assert no_training == [2, 5, 1]

    for bad in ("0", "-2", "two"):
        assert train.main(["--preset", "tiny", "--threads", bad, "--output-dir", str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "--threads" in err and len(err.splitlines()) == 1
