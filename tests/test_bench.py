"""The benchmarks that stand in for a GPU: what of them can run on a CPU, runs."""
import json

import pytest
from conftest import run_script

pytestmark = pytest.mark.slow  # each runs a benchmark script


def test_gpu_check_runs_on_the_cpu_at_toy_size(tmp_path):
    """bench/gpu_check.py end to end (stand-in build, GRPO steps through grpo.main, the figures) at toy sizes."""
    p = run_script("bench/gpu_check.py", "--device", "cpu", "--small", "--json", str(tmp_path / "f.json"), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    fig = json.loads((tmp_path / "f.json").read_text())
    assert fig["steps_timed"] >= 1 and fig["sample_tokens_per_s"] > 0 and fig["train_tokens_per_s"] > 0
    assert fig["first_step_ratio"] == pytest.approx(1, abs=1e-3)  # bf16 sampler vs bf16 trainer
    assert fig["gap_max"] < 0.1 and fig["weights_grads_adam_gb"] == pytest.approx(16 * fig["params"] / 2**30)
    assert "| sample_tokens_per_s |" in p.stdout


def test_bf16_master_shows_why_the_weights_are_float32():
    """bench/bf16_master.py: at lr 1e-6, AdamW on bf16 weights leaves most of them unchanged; on float32, none."""
    p = run_script("bench/bf16_master.py", "--steps", "1", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    share = {r.split("|")[1].strip(): float(r.split("|")[2].strip().rstrip("%"))
             for r in p.stdout.splitlines() if r.startswith(("| bf16", "| float32"))}
    assert share["bf16"] < 10 and share["float32"] > 99


def test_where_time_goes_runs_at_toy_size():
    """bench/where_time_goes.py end to end on the small-vocabulary stand-in: every timed part is reported, and the
    FLOPs the real tokens need never exceed what the padded shapes executed."""
    p = run_script("bench/where_time_goes.py", "--prompts", "2", "--group", "2", "--new_tokens", "8", "--steps", "2",
                   "--rows", "0", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [ln.split(" | ") for ln in p.stdout.splitlines() if ln.startswith("| sample/") or ln.startswith("| update/")]
    parts = {r[0][2:] for r in rows}
    assert {"sample/decoder forward", "sample/LM head", "update/decoder backward", "update/vocab projection forward",
            "update/vocab projection backward", "update/AdamW step"} <= parts
    for r in rows:
        if r[2] != "-":
            assert float(r[3]) <= float(r[2]), r  # real <= executed GFLOP
