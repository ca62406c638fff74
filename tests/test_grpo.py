"""grpo.py: advantage and loss on hand-computed micro-examples, then the script itself end to end."""
import json
import math

import pytest
import torch
from conftest import (ROOT, SMALL, TORCHRUN, assert_same_as_one_process, max_weight_diff, one_process_run_of,
                      records, run_script)

import common
import grpo
from grpo import micro_weight, policy_loss


# ---- loss (advantage, aggregations, micro-batch weight: tests/test_copies.py, for every trainer) --------------
def _toy():
    # 2 sequences x 3 tokens; the second has 2 real tokens
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.5, 0.25], [0.25, 0.75, 0.9]]))  # ratios 1.5, 1, .5 / .5, 1.5, x
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    return new, old, mask


def test_policy_loss_clips_on_both_sides():
    new, old, mask = _toy()
    # adv +1: ratio 1.5 -> clipped to 1.2 (max(-1.5, -1.2) = -1.2), 1 -> -1, .5 -> max(-.5, -.8) = -.5 (no clip)
    # adv -1: ratio .5 -> max(.5, .8) = .8 (clipped), 1.5 -> max(1.5, 1.2) = 1.5
    adv = torch.tensor([1.0, -1.0])
    loss, st = policy_loss(new, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - 1 - 0.5 + 0.8 + 1.5) / 5, abs=1e-6)
    assert st["policy/clipfrac"] == pytest.approx(2 / 5)
    loss_hi, _ = policy_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert loss_hi.item() == pytest.approx((-1.28 - 1 - 0.5 + 0.8 + 1.5) / 5, abs=1e-6)


def test_policy_loss_gradient_zero_where_clipped():
    new, old, mask = _toy()
    new = new.clone().requires_grad_(True)
    loss, _ = policy_loss(new, old, torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    g = new.grad
    assert g[0, 0] == 0 and g[1, 0] == 0  # clipped tokens
    assert g[0, 1] != 0 and g[0, 2] != 0 and g[1, 1] != 0  # unclipped ones
    assert g[1, 2] == 0  # padding


def test_k3_kl_term():
    new, old, mask = _toy()
    ref = old  # ref = 0.5 everywhere: kl = w - log w - 1 with w = pi_ref / pi
    loss0, _ = policy_loss(new, old, torch.zeros(2), mask)
    loss, st = policy_loss(new, old, torch.zeros(2), mask, ref_logp=ref, beta=0.1)
    w = torch.tensor([0.5 / 0.75, 1, 2, 2, 0.5 / 0.75])
    kl = (w - torch.log(w) - 1).mean().item()
    assert loss0.item() == 0 and loss.item() == pytest.approx(0.1 * kl, abs=1e-6)
    assert st["policy/kl"] == pytest.approx(kl, abs=1e-6)


def test_policy_loss_log_ratio_is_capped_at_20_both_ways():
    """exp(log-ratio) is taken of the log-ratio clamped to [-20, 20]: the value stops at e^20 / e^-20 and no gradient
    flows past the cap (an overflowing ratio would turn a whole step to inf/NaN). Stats report the mean ratio."""
    old, mask = torch.zeros(1, 4), torch.tensor([[1.0, 1, 1, 0]])
    e = math.exp
    for a, want in [(-1.0, (e(20) + 0.8 + e(0.3)) / 3),  # A < 0: max(r, clip(r)): e^20 kept, 0.8 (clipped), e^0.3
                    (1.0, (-1.2 - e(-20) - 1.2) / 3)]:  # A > 0: max(-r, -clip(r)): -1.2, -e^-20 (unclipped), -1.2
        logp = torch.tensor([[20.5, -20.5, 0.3, 0.0]], requires_grad=True)
        loss, st = policy_loss(logp, old, torch.tensor([a]), mask)
        loss.backward()
        assert loss.item() == pytest.approx(want, rel=1e-6)
        assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0  # past the cap on either side: no gradient
        assert st["policy/ratio"] == pytest.approx((e(20) + e(-20) + e(0.3)) / 3, rel=1e-6)
        assert set(st) == {"policy/clipfrac", "policy/ratio"}  # no KL term, so no KL statistic


def test_policy_loss_kl_only_with_a_reference_and_beta_above_0():
    """beta defaults to 0: a reference alone adds nothing (not even a statistic), nor does beta without one; the k3
    term's log-ratio is capped at [-20, 20] like the policy's."""
    old, mask, adv = torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1)
    logp = torch.zeros(1, 3)
    ref = torch.tensor([[20.5, -20.5, 0.3]])  # ref_logp - logp
    base, st0 = policy_loss(logp, old, adv, mask)
    for kw in ({"ref_logp": ref}, {"beta": 0.1}, {"ref_logp": ref, "beta": 0.0}):
        loss, st = policy_loss(logp, old, adv, mask, **kw)
        assert loss.item() == base.item() and set(st) == set(st0), kw
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    for far in (20.5, -20.5):  # one at a time: e^20 would hide the lower cap's 0.5
        ref = torch.tensor([[far, 0.3, 0.0]])
        loss, st = policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
        kl = (k3(math.copysign(20, far)) + k3(0.3) + k3(0.0)) / 3
        assert loss.item() == pytest.approx(0.1 * kl, rel=1e-6) and st["policy/kl"] == pytest.approx(kl, rel=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_to_the_whole_batch(agg):
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5), torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    adv = torch.randn(6)
    whole, _ = policy_loss(logp, old, adv, mask, agg=agg, max_len=5)
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], agg=agg, max_len=5)[0] * micro_weight(mask[s], mask, agg)
                for s in (slice(0, 2), slice(2, 5), slice(5, 6)))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


# ---- the script -------------------------------------------------------------------------------------------------
def test_importing_grpo_starts_nothing():
    assert hasattr(grpo, "main") and grpo.Args().model == "tiny"


def test_grpo_smoke(tiny_cache, tmp_path):
    p = run_script("grpo.py", "--max_steps", "3", "--eval_every", "2", "--output_dir", str(tmp_path), *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = records(tmp_path)
    assert recs[0]["args"]["max_steps"] == 3 and recs[1]["step"] == 0 and "eval/pass@16" in recs[1]
    steps = [r for r in recs[2:]]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for k in ["reward/mean", "loss/policy", "policy/clipfrac", "policy/entropy", "response/len", "perf/sample_s",
              "perf/update_s"]:
        assert all(math.isfinite(r[k]) for r in steps), k
    assert "eval/pass@1" in steps[1] and "eval/pass@1" in steps[2] and "eval/pass@1" not in steps[0]
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "final" / "config.json").exists()
    assert "reward" in p.stderr + p.stdout


def _args(tmp_path, **kw):
    """grpo.Args for an in-process run of a few seconds (the SMALL settings)."""
    base = dict(output_dir=str(tmp_path), prompts_per_step=4, group_size=4, eval_prompts=8, eval_samples=4,
                log_examples_every=0, eval_every=0)
    return grpo.Args(**{**base, **kw})


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_cache, tmp_path, monkeypatch):
    """A NaN loss at step 3 (injected) stops the run; checkpoint.pt keeps step 2's finite weights."""
    calls, real = [], grpo.policy_loss

    def nan_at_step_3(*a, **kw):
        calls.append(1)
        loss, st = real(*a, **kw)
        return (loss * float("nan") if len(calls) == 3 else loss), st

    monkeypatch.setattr(grpo, "policy_loss", nan_at_step_3)
    with pytest.raises(SystemExit, match="step 3: gradient norm is nan .* last good checkpoint"):
        grpo.main(_args(tmp_path, max_steps=6, save_every=1))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_final_checkpoint_is_saved_before_the_final_evaluation(tiny_cache, tmp_path, monkeypatch):
    """Regression: the final evaluation ran before the final checkpoint, so an evaluation crash lost the run."""
    def broken(*a, **kw):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(grpo, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        grpo.main(_args(tmp_path, max_steps=2, save_every=100))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2


def test_fewer_eval_samples_than_16_work(tiny_cache, tmp_path):
    """Regression: pass@8/16 were hard-coded, so --eval_samples below 16 crashed the final evaluation."""
    grpo.main(_args(tmp_path, max_steps=1, eval_samples=3))
    last = records(tmp_path)[-1]
    assert sorted(k for k in last if k.startswith("eval/pass@")) == ["eval/pass@1", "eval/pass@3"]


def test_too_few_training_prompts_fail_with_one_sentence(tiny_cache, tmp_path):
    f = tmp_path / "small.jsonl"
    f.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(12)))
    p = run_script("grpo.py", "--model", str(common.tiny_cache_dir("countdown")), "--task", str(f),
                   "--prompts_per_step", "32", "--output_dir", str(tmp_path / "run"))
    assert p.returncode != 0 and "fewer than the 32 needed" in p.stderr + p.stdout, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_torchrun_two_ranks_stay_identical(tiny_cache, tmp_path):
    p = run_script(*TORCHRUN,
                   str(ROOT / "tests" / "ddp_check.py"), "--max_steps", "2", "--eval_every", "2",
                   "--output_dir", str(tmp_path), *SMALL, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "params_equal").read_text() == "True"
    assert [r["step"] for r in records(tmp_path)[1:]] == [0, 1, 2]  # one metrics file, written once per step
    assert not list(tmp_path.glob("metrics*rank*"))


MULTI = ["--group_size", "4", "--prompts_per_step", "8", "--micro_batch_size", "3", "--temperature", "1.6",
         "--max_steps", "3", "--eval_every", "0", "--eval_prompts", "8", "--eval_samples", "2"]


@pytest.fixture(scope="module")
def one_process_run(tiny_cache, tmp_path_factory):
    return one_process_run_of(tmp_path_factory, "grpo.py", *MULTI)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_compute_what_one_process_does(one_process_run, tmp_path, mode):
    """2 gloo ranks (DDP, or FSDP2 shards) against 1 process on the same rows: the same rewards, losses, gradient
    norms and weights. Regressions: (1) response lengths differ between the ranks, so the old per-rank token-mean
    normaliser gave other gradients; (2) micro-batches of 3 rows hold repeated prompts or not, which deadlocked DDP
    (prompt sharing made a different number of forward calls, hence of DDP's buffer broadcasts, on each rank)."""
    extra = ["--fsdp", "true"] if mode == "fsdp" else []
    p = run_script(*TORCHRUN, "grpo.py", *MULTI, *extra,
                   "--output_dir", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = records(one_process_run)[1:], records(tmp_path)[1:]
    assert [r["step"] for r in two] == [1, 2, 3]
    assert len({r["response/len"] for r in one}) > 1 and any(r["perf/grad_norm"] > 0.1 for r in one)  # a real test
    assert_same_as_one_process(one_process_run, tmp_path)  # rollouts, grad norms, weights


def test_grpo_learns_on_the_tiny_task(tiny_cache, tmp_path):
    """SFT warm start (fixture) + GRPO: held-out pass@1 must rise clearly."""
    p = run_script("grpo.py", "--max_steps", "60", "--eval_every", "60", "--eval_prompts", "128",
                   "--output_dir", str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    recs = records(tmp_path)
    before, after = recs[1], recs[-1]
    assert after["eval/pass@1"] - before["eval/pass@1"] >= 0.1, (before, after)


def test_evaluation_does_not_change_training(tiny_cache, tmp_path):
    """Evaluation draws its own seeded samples: how often it runs must not change the training trajectory."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script("grpo.py", "--max_steps", "4", "--eval_every", "0", "--output_dir", str(a), *SMALL).returncode == 0
    assert run_script("grpo.py", "--max_steps", "4", "--eval_every", "1", "--output_dir", str(b), *SMALL).returncode == 0
    keys = ["reward/mean", "loss/policy", "perf/grad_norm", "policy/entropy"]
    train = lambda d: [[r[k] for k in keys] for r in records(d)[1:] if "reward/mean" in r]  # noqa: E731
    assert train(a) == train(b) and len(train(a)) == 4


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_finishes_the_step_saves_and_resumes(tiny_cache, tmp_path, sig):
    """Ctrl-C, or the SIGTERM a scheduler sends before it preempts a job (it used to kill the run at once)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "grpo.py", "--max_steps", "500", "--eval_every", "0", "--save_every", "1000",
           "--output_dir", str(tmp_path), *SMALL]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ})
    deadline = time.time() + 120
    steps = lambda: len(records(tmp_path)) - 1 if (tmp_path / "metrics.jsonl").exists() else 0  # noqa: E731
    while time.time() < deadline and steps() < 3:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "interrupted: saved" in out
    done = records(tmp_path)[-1]["step"]
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == done < 500
    p = run_script("grpo.py", "--max_steps", str(done + 1), "--eval_every", "0", "--output_dir", str(tmp_path),
                   "--resume", "true", *SMALL)
    assert p.returncode == 0 and f"at step {done}" in p.stdout, p.stdout[-2000:]
    assert records(tmp_path)[-1]["step"] == done + 1


def test_bf16_run_at_lr_1e6_moves_the_float32_master_weights(tiny_cache, tmp_path):
    """Regression: with bf16 weights and a bf16 AdamW, most updates at lr 1e-6 are below bf16's resolution (2% of
    weights moved in 3 steps). Master weights stay float32; bf16 is the compute dtype (autocast)."""
    p = run_script("grpo.py", "--dtype", "bfloat16", "--lr", "1e-6", "--max_steps", "1", "--eval_every", "0",
                   "--output_dir", str(tmp_path), *SMALL[:4])
    assert p.returncode == 0, p.stderr[-2000:]
    assert records(tmp_path)[1]["perf/grad_norm"] > 0  # a real update happened
    before, _, _ = common.load_model_and_tokenizer(str(common.tiny_cache_dir("countdown")), torch.device("cpu"))
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    moved = [(after[k] != v).float().mean().item() for k, v in before.state_dict().items()]
    assert all(v.dtype == torch.float32 for v in after.values())
    assert sum(moved) / len(moved) > 0.9, moved


def test_gradient_checkpointing_changes_memory_not_results(tiny_cache, tmp_path):
    """--gradient_checkpointing recomputes each layer in backward (and turns prompt sharing off): same training."""
    runs = {}
    for gc in ("false", "true"):
        p = run_script("grpo.py", "--gradient_checkpointing", gc, "--max_steps", "2", "--eval_every", "0",
                       "--output_dir", str(tmp_path / gc), *SMALL[:4])
        assert p.returncode == 0, p.stderr[-2000:]
        runs[gc] = records(tmp_path / gc)[1:]
    for a, b in zip(runs["false"], runs["true"]):
        assert a["reward/mean"] == b["reward/mean"]
        assert b["perf/grad_norm"] == pytest.approx(a["perf/grad_norm"], rel=1e-4) and a["perf/grad_norm"] > 0


def test_fsdp_resume_continues_the_run(one_process_run, tmp_path):
    """FSDP2: a run stopped at step 2 and resumed (full state dict written by rank 0, re-sharded on load) ends
    where the uninterrupted one-process run does."""
    run = [*TORCHRUN, "grpo.py", *MULTI, "--fsdp", "true",
           "--save_every", "1", "--output_dir", str(tmp_path)]
    cut = list(run)
    cut[cut.index("--max_steps") + 1] = "2"
    assert run_script(*cut, timeout=300).returncode == 0
    p = run_script(*run, "--resume", "true", timeout=300)
    assert p.returncode == 0 and "resumed" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert [r["step"] for r in records(tmp_path)[1:]] == [1, 2, 3]
    assert max_weight_diff(one_process_run, tmp_path) < 1e-4
