"""Test environment: offline Hugging Face, scratch caches, Triton interpreted on CPU, a random
state seeded per test, and the one tiny config (``tiny_config``) with its model (``tiny_model``)
and a saved checkpoint of that model (``tiny_checkpoint``)."""

import os
import random
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

# Must happen before anything imports triton: without a GPU the kernels run interpreted.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="mmrec-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The research harness is a folder of scripts, not an installed package: its scripts import their
# siblings (quality, timing) by name, and so do its tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "research"))

import common  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test traces from nothing: torch.compile's caches and recompile counts do not carry over from earlier
    tests (eight models traced through one function would otherwise hit dynamo's recompile limit, which fails a
    fullgraph compile, depending on the tests' order)."""
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def torch_threads():
    """torch's thread count as it was before the test (the scripts set it); yields torch."""
    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def seed_per_test(request):
    """Seed torch, random and numpy from the test's node id (crc32, unlike hash(), does not
    depend on PYTHONHASHSEED): a test draws the same inputs alone, in the full suite or in any
    order, and two tests never share their draws."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield seed


@pytest.fixture(scope="session")
def tiny_config():
    """The one tiny config: ``tiny_config(**overrides)`` (tests/common.py)."""
    return common.tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(seed=0, **overrides)``: the model of ``tiny_config(**overrides)``, eval mode,
    weights drawn after ``torch.manual_seed(seed)``."""
    return common.tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A folder written by ``tiny_model(seed=0).save_pretrained`` (weights, config, code, card;
    no tokenizer). Tests that change it work on a copy."""
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "model"
    common.tiny_model(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Four short works of the bundled corpus as text files (split_works holds out the third):
    --data for runs of the main job that take seconds."""
    from mm_rec_train.data import load_shakespeare

    folder = tmp_path_factory.mktemp("texts")
    for name, text in load_shakespeare(max_works=4).items():
        (folder / f"{name}.txt").write_text(text[:6000], encoding="utf-8")
    return folder
