"""bench/claims.py: each paper's claim against GRPO under the identical budget."""
import importlib
import json
import sys

import pytest
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "bench"))
import claims  # noqa: E402

BUDGET = ["task", "max_steps", "prompts_per_step", "group_size", "max_new_tokens", "temperature", "lr", "epochs",
          "mini_batches", "sampler_dtype", "dtype", "model"]  # what the method and GRPO must share


def resolved(file: str, extra: list):
    """The trainer's Args with the arm's flags applied, as its command line would give them."""
    from transformers import HfArgumentParser

    mod = importlib.import_module(file)
    return HfArgumentParser(mod.Args).parse_args_into_dataclasses(args=extra)[0]


@pytest.mark.parametrize("name", list(claims.EXPERIMENTS))
def test_every_experiment_runs_its_method_and_grpo_on_the_same_budget(name):
    """Two arms, one of them GRPO; everything that sets the sample and update budget (task, prompts x samples, cap,
    optimizer steps per batch, sampler numerics) is the same in both: a method is never compared with a GRPO that
    sampled less, updated less, or sampled without the mismatch."""
    arms = claims.EXPERIMENTS[name]["arms"]
    assert len(arms) == 2 and [f for f, _ in arms.values()].count("grpo") == 1
    a, b = (resolved(f, extra) for f, extra in arms.values())
    assert {k: getattr(a, k) for k in BUDGET} == {k: getattr(b, k) for k in BUDGET}


def test_the_dppo_experiment_has_a_real_mismatch_and_several_updates_a_batch():
    for f, extra in claims.EXPERIMENTS["dppo"]["arms"].values():
        args = resolved(f, extra)
        assert args.sampler_dtype == "bfloat16" and args.dtype in ("auto", "float32") and args.mini_batches >= 4


@pytest.mark.slow  # two trainer runs with evaluations, ~1 min
def test_claims_runs_end_to_end_at_toy_size(tiny_cache, tmp_path):
    p = run_script("bench/claims.py", "dppo", "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "runs"),
                   "--docs", str(tmp_path / "docs"), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    page = (tmp_path / "docs" / "claims.md").read_text()
    assert "## dppo:" in page and "| grpo_mb4_bf16 " in page and "| dppo_bf16 " in page
    assert (tmp_path / "docs" / "claims_dppo.png").stat().st_size > 1000
    for arm in ("grpo_mb4_bf16", "dppo_bf16"):
        args = json.loads((tmp_path / "runs" / f"{arm}_s0" / "metrics.jsonl").read_text().splitlines()[0])["args"]
        assert args["sampler_dtype"] == "bfloat16" and args["mini_batches"] == 4 and args["max_steps"] == 2
