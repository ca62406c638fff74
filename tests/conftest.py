import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

import common  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A fresh RLVR_CACHE for the whole session: the warm-started tiny countdown model is built once (~15 s)."""
    root = tmp_path_factory.mktemp("rlvr_cache")
    old = os.environ.get("RLVR_CACHE")
    os.environ["RLVR_CACHE"] = str(root)
    common.build_tiny("countdown", common.tiny_cache_dir("countdown"))
    yield root
    if old is None:
        os.environ.pop("RLVR_CACHE", None)
    else:
        os.environ["RLVR_CACHE"] = old


@pytest.fixture(scope="session")
def standin(tiny_cache):
    """The Qwen2.5-shaped stand-in (tests/standin.py), built once per session (~5 s) in the session's cache."""
    import standin as s

    return s.standin_path()


def needs_data(name="gsm8k_train.jsonl"):
    return pytest.mark.skipif(not (common.shared_data_dir() / name).exists(), reason="../shared/data absent")


@pytest.fixture
def tok():
    return common.tiny_tokenizer()


@pytest.fixture
def rand_model(tok):
    """An untrained tiny Llama (random weights): enough for exactness tests."""
    return common.tiny_model(len(tok), seed=0).eval()


SMALL = ["--prompts_per_step", "4", "--group_size", "4", "--eval_prompts", "8", "--eval_samples", "16",
         "--log_examples_every", "1"]  # a trainer run of a few seconds


def records(d):
    """The metrics.jsonl records of a run folder (the first one is the Args)."""
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def run_script(*args, timeout=600, env=None):
    """Run a trainer as a user would; return the CompletedProcess (stdout + stderr in .stdout)."""
    import subprocess

    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # 2 gloo ranks on the CPU


def max_weight_diff(a, b) -> float:
    """Largest absolute difference between the checkpoint.pt weights of two run folders."""
    wa = torch.load(a / "checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=False)["model"]
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def one_process_run_of(tmp_path_factory, *args) -> Path:
    """A one-process run of `args` (script + flags) in a fresh folder: what a 2-rank run is compared with."""
    d = tmp_path_factory.mktemp("one_process")
    p = run_script(*args, "--output_dir", str(d))
    assert p.returncode == 0, p.stderr[-3000:]
    return d


def assert_same_as_one_process(one_dir, two_dir, keys=("reward/mean", "response/len")):
    """A 2-rank run computed what the one-process run did: per step the same rollouts (`keys` equal) and gradient
    norms to 1e-4 relative; the weights after the run to 1e-4 (at lr 3e-4 a wrong gradient moves them more)."""
    for a, b in zip(records(one_dir)[1:], records(two_dir)[1:], strict=True):
        assert all(a[k] == b[k] for k in keys), [(k, a[k], b[k]) for k in keys]
        assert b["perf/grad_norm"] == pytest.approx(a["perf/grad_norm"], rel=1e-4)
    assert max_weight_diff(one_dir, two_dir) < 1e-4
    assert (two_dir / "final" / "model.safetensors").exists()


SLOW_FIXTURES = {"tiny_cache", "standin", "one_process_run"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a trainer, builds a model or starts processes (minutes in all)")


def pytest_collection_modifyitems(config, items):
    """Every test that needs a built model is `slow`: `pytest -m "not slow"` runs the unit tests alone, in about a
    minute, which is what mutation testing runs against each mutant (README, Tests)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
