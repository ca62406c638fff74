"""DPPO (dppo.py, arXiv 2602.04879) on hand-computed micro-examples: the mask of Eq. 12, the binary and top-K
estimators of Eq. 13-16 and their lower-bound order (App. B), the truncated-IS gradient of Eq. 23; then the script:
a smoke run, and 2 ranks (DDP, FSDP2) against 1 process on the same rows."""
import inspect
import json
import math

import pytest
import torch
from conftest import ROOT, SMALL, TORCHRUN, assert_same_as_one_process, one_process_run_of, records, run_script

import common
import dppo
import grpo
from dppo import divergence, dppo_loss, trust_region_mask, with_sampled_token

KINDS = ["binary_tv", "binary_kl", "topk_tv", "topk_kl"]
L = math.log


def lg(x):
    return torch.log(torch.tensor(x, dtype=torch.float32))


# ---- interface ---------------------------------------------------------------------------------------------------
def test_interface_the_issue_names():
    assert list(inspect.signature(divergence).parameters) == ["logp", "behavior_logp", "kind", "topk_behavior_logp",
                                                              "topk_logp"]
    p = inspect.signature(dppo_loss).parameters
    assert list(p)[:10] == ["logp", "behavior_logp", "adv", "mask", "kind", "delta", "is_cap", "max_len",
                            "topk_behavior_logp", "topk_logp"]
    assert (p["kind"].default, p["delta"].default, p["is_cap"].default) == ("binary_tv", 0.15, 5.0)
    a = dppo.Args()
    assert (a.model, a.mini_batches, a.scale_std, a.agg, a.divergence, a.is_cap, a.topk, a.output_dir) == (
        "tiny", 4, False, "seq-mean-token-sum-norm", "binary_tv", 5.0, 20, "runs/dppo")


# ---- pi == mu: D = 0, nothing cut, the REINFORCE gradient (Eq. 23 with r = 1, M = 1) ------------------------------
def _full(B=3, T=4, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lmu = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1)  # [B, T, V]
    y = torch.multinomial(lmu.exp().reshape(-1, V), 1, generator=g).reshape(B, T)  # [B, T]
    return lmu, y


@pytest.mark.parametrize("kind", KINDS)
def test_pi_equals_mu_nothing_masked_and_reinforce_gradient(kind):
    lmu, y = _full()
    old = lmu.gather(-1, y[..., None]).squeeze(-1)  # [B, T]
    logp = old.clone().requires_grad_(True)
    tk = lmu if kind.startswith("topk") else None  # K = |V|: the full distribution, pi == mu
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([0.75, -0.25, 0.0])
    assert torch.equal(divergence(logp, old, kind, tk, tk) * mask, torch.zeros(3, 4))
    loss, st = dppo_loss(logp, old, adv, mask, kind, max_len=5, topk_behavior_logp=tk, topk_logp=tk)
    assert st["policy/masked_frac"] == 0 and st["policy/ratio"] == pytest.approx(1.0)
    loss.backward()
    ref = logp.detach().clone().requires_grad_(True)
    ref_loss = -(adv[:, None] * ref * mask).sum() / (3 * 5)  # -agg(A log p), Dr. GRPO normaliser B * max_len
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert torch.allclose(logp.grad, ref.grad, atol=1e-7)


# ---- the gate (Eq. 12): zero gradient exactly on the cut tokens, none through mu ----------------------------------
def test_zero_logit_gradient_exactly_where_the_rule_masks():
    # 2 sequences x 3 tokens over V = 3; the sampled token is id 0 everywhere, mu(0) = 0.5
    p = torch.tensor([[0.9, 0.55, 0.2], [0.1, 0.45, 0.9]])  # pi(0): A>0: TV .4 cut, .05 kept, back-move kept
    logits = torch.stack([p.log(), ((1 - p) / 2).log(), ((1 - p) / 2).log()], -1).requires_grad_(True)  # [2, 3, 3]
    logp = torch.log_softmax(logits, -1)[..., 0]  # [2, 3]
    old = torch.full((2, 3), L(0.5))
    mask = torch.ones(2, 3)
    loss, st = dppo_loss(logp, old, torch.tensor([1.0, -1.0]), mask)  # A<0: TV .4 cut, .05 kept, back-move kept
    loss.backward()
    g = logits.grad.abs().sum(-1)  # [2, 3]
    assert g[0, 0] == 0 and g[1, 0] == 0  # cut: exactly zero, not small
    assert (g[:, 1:] > 0).all()
    assert st["policy/masked_frac"] == pytest.approx(2 / 6)
    assert st["policy/masked_frac_pos"] == pytest.approx(1 / 6) and st["policy/masked_frac_neg"] == pytest.approx(1 / 6)
    assert st["policy/abs_pi_mu"] == pytest.approx((0.4 + 0.05 + 0.3 + 0.4 + 0.05 + 0.4) / 6, abs=1e-6)


def test_no_gradient_through_mu_gate_or_weight_and_none_from_padding_or_zero_adv():
    torch.manual_seed(0)
    lmu, y = _full()
    old = lmu.gather(-1, y[..., None]).squeeze(-1).clone().requires_grad_(True)  # [B, T]
    lpi = torch.log_softmax(lmu + 0.5 * torch.randn_like(lmu), -1)  # [B, T, V]
    logp = lpi.gather(-1, y[..., None]).squeeze(-1).clone().requires_grad_(True)
    tk_mu, tk_pi = lmu.clone().requires_grad_(True), lpi.clone().requires_grad_(True)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    loss, _ = dppo_loss(logp, old, torch.tensor([1.0, -1.0, 0.0]), mask, "topk_kl",
                        topk_behavior_logp=tk_mu, topk_logp=tk_pi)
    loss.backward()
    assert old.grad is None and tk_mu.grad is None and tk_pi.grad is None
    assert logp.grad[1, 3] == 0 and (logp.grad[2] == 0).all()  # padding, A = 0


# ---- moves back toward mu are never cut (Sec. 4.3), and what binary TV can never cut ------------------------------
@pytest.mark.parametrize("kind", KINDS[:2])
def test_moves_back_toward_mu_never_masked(kind):
    old, logp = lg([[0.95], [0.05]]), lg([[0.05], [0.95]])  # TV 0.9 each way
    for adv, expect in [([1.0, -1.0], [1.0, 1.0]), ([-1.0, 1.0], [0.0, 0.0])]:  # back toward mu / away from it
        ratio = (logp - old).exp()
        m = trust_region_mask(divergence(logp, old, kind), ratio, torch.tensor(adv), 0.15, 0.15)
        assert m.squeeze(-1).tolist() == expect


def test_binary_tv_cannot_cut_negatives_below_delta_or_positives_above_one_minus_delta():
    p = torch.linspace(1e-4, 1 - 1e-4, 999)[None, :]  # [1, 999] every pi
    for m, a in [(0.149, -1.0), (0.01, -1.0), (0.851, 1.0), (0.99, 1.0)]:
        old = torch.full_like(p, L(m))
        d = divergence(p.log(), old)
        assert trust_region_mask(d, p / m, torch.tensor([a]), 0.15, 0.15).all()
    old = torch.full_like(p, L(0.5))  # control: at m = .5 both sides do get cut
    assert not trust_region_mask(divergence(p.log(), old), p / 0.5, torch.tensor([1.0]), 0.15, 0.15).all()


# ---- the paper's rare / dominant token example (Sec. 4.2), and PPO's gate as the D = |r - 1| case (Sec. 4.3) ------
def test_rare_and_dominant_token_examples():
    ones = torch.ones(1, 1)
    # rare, A>0: m=1e-4 -> p=1e-2, r=100
    old, logp = lg([[1e-4]]), lg([[1e-2]])
    r, pos = (logp - old).exp(), torch.tensor([1.0])
    assert divergence(logp, old).item() == pytest.approx(0.0099, abs=1e-6)
    assert divergence(logp, old, "binary_kl").item() == pytest.approx(0.0095, abs=2e-4)
    assert trust_region_mask((r - 1).abs(), r, pos, 0.2, 0.28).item() == 0  # PPO cuts it
    assert trust_region_mask(divergence(logp, old), r, pos, 0.15, 0.15).item() == 1
    assert trust_region_mask(divergence(logp, old, "binary_kl"), r, pos, 0.05, 0.05).item() == 1
    _, st = grpo.policy_loss(logp, old, pos, ones, 0.2, 0.28)
    assert st["policy/clipfrac"] == 1
    # dominant, A<0: m=.99 -> p=.80, r=.808
    old, logp = lg([[0.99]]), lg([[0.80]])
    r, neg = (logp - old).exp(), torch.tensor([-1.0])
    assert divergence(logp, old).item() == pytest.approx(0.19, abs=1e-6)
    assert divergence(logp, old, "binary_kl").item() == pytest.approx(0.181, abs=1e-3)
    assert trust_region_mask((r - 1).abs(), r, neg, 0.2, 0.28).item() == 1  # PPO keeps pushing it down
    assert trust_region_mask(divergence(logp, old), r, neg, 0.15, 0.15).item() == 0
    assert trust_region_mask(divergence(logp, old, "binary_kl"), r, neg, 0.05, 0.05).item() == 0
    assert trust_region_mask(divergence(logp, old), r, neg, 0.20, 0.20).item() == 1
    _, st = dppo_loss(logp, old, neg, ones)
    assert st["policy/masked_frac_neg"] == 1 and st["policy/ppo_clipfrac"] == 0


def test_ratio_divergence_gives_grpo_clip_gate_bit_for_bit():
    torch.manual_seed(1)
    old, logp = torch.randn(64, 16) * 0.3 - 1, torch.randn(64, 16) * 0.3 - 1
    adv = torch.randn(64)
    adv[::7] = 0
    mask = torch.ones(64, 16)
    r = (logp - old).exp()
    gate = trust_region_mask((r - 1).abs(), r, adv, 0.2, 0.28)
    x = logp.clone().requires_grad_(True)
    loss, st = grpo.policy_loss(x, old, adv, mask, 0.2, 0.28)
    loss.backward()
    assert torch.equal(gate == 0, (x.grad == 0) & (adv[:, None] != 0))  # PPO's zero-gradient tokens
    assert 0.1 < st["policy/clipfrac"] == pytest.approx(1 - gate.mean().item())


# ---- binary <= top-K <= exact (App. B), and the top-K set TopK(mu) | {y} (Sec. 4.4) without double counting -------
def _dists(B=64, T=3, V=12, seed=0):
    lmu, y = _full(B, T, V, seed)
    lpi = torch.log_softmax(lmu + torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed + 1)), -1)
    pick = lambda lp, ids: lp.gather(-1, ids)  # noqa: E731
    return lmu, lpi, y, pick


@pytest.mark.parametrize("metric", ["tv", "kl"])
def test_binary_le_topk_le_exact_and_the_limits(metric):
    lmu, lpi, y, pick = _dists()
    mu, pi = lmu.exp(), lpi.exp()
    exact = 0.5 * (mu - pi).abs().sum(-1) if metric == "tv" else (mu * (lmu - lpi)).sum(-1)  # [B, T]
    old, logp = pick(lmu, y[..., None]).squeeze(-1), pick(lpi, y[..., None]).squeeze(-1)  # [B, T]
    binary = divergence(logp, old, f"binary_{metric}")
    for K in (1, 3, 6):
        ids = lmu.topk(K, -1).indices  # [B, T, K]: mu's top-K, y in it or not
        tk_mu, tk_pi = with_sampled_token(pick(lmu, ids), ids, old, y), with_sampled_token(pick(lpi, ids), ids, logp, y)
        topk = divergence(logp, old, f"topk_{metric}", tk_mu, tk_pi)
        assert (binary <= topk + 1e-6).all() and (topk <= exact + 1e-6).all(), K
        assert (topk > binary + 1e-4).any() and (topk < exact - 1e-4).any()
    all_ids = torch.arange(12).expand(*y.shape, 12)
    full = divergence(logp, old, f"topk_{metric}", with_sampled_token(lmu, all_ids, old, y),
                      with_sampled_token(lpi, all_ids, logp, y))
    assert torch.allclose(full, exact, atol=1e-5)  # K = |V|: exact
    only_y = divergence(logp, old, f"topk_{metric}", old[..., None], logp[..., None])  # S = {y}: binary
    assert torch.allclose(only_y, binary, atol=1e-5)


def test_sampled_token_slot_counts_once():
    lmu, lpi, y, pick = _dists()
    ids = lmu.topk(4, -1).indices  # [B, T, 4]
    old, logp = pick(lmu, y[..., None]).squeeze(-1), pick(lpi, y[..., None]).squeeze(-1)
    tk_mu, tk_pi = with_sampled_token(pick(lmu, ids), ids, old, y), with_sampled_token(pick(lpi, ids), ids, logp, y)
    inside = (ids == y[..., None]).any(-1)  # [B, T]
    assert inside.any() and (~inside).any()
    assert torch.equal(torch.isinf(tk_mu[..., 4]), inside) and torch.equal(tk_mu[..., 4][~inside], old[~inside])
    for metric in ("tv", "kl"):  # naive reference: the set S = top-4 | {y} built by hand, one position at a time
        d = divergence(logp, old, f"topk_{metric}", tk_mu, tk_pi)
        for b, t in [(0, 0), (5, 1), (17, 2), (40, 0)]:
            S = sorted(set(ids[b, t].tolist()) | {int(y[b, t])})
            qm, qp = lmu[b, t, S].exp().double(), lpi[b, t, S].exp().double()
            qm, qp = torch.cat([qm, 1 - qm.sum(0, keepdim=True)]), torch.cat([qp, 1 - qp.sum(0, keepdim=True)])
            ref = 0.5 * (qm - qp).abs().sum() if metric == "tv" else (qm * (qm / qp).log()).sum()
            assert d[b, t].item() == pytest.approx(ref.item(), abs=1e-6)


# ---- the truncated importance weight min(r, C) of Eq. 23 ----------------------------------------------------------
@pytest.mark.parametrize("is_cap,w", [(5.0, 5.0), (float("inf"), 10.0)])
def test_weight_is_min_ratio_cap_not_zero(is_cap, w):
    # token 1: r = 10 with A < 0 moves back toward mu (never cut); token 2: r = 2 (TV .1 < .15)
    old, logp = lg([[0.05, 0.1]]), lg([[0.5, 0.2]]).requires_grad_(True)
    loss, st = dppo_loss(logp, old, torch.tensor([-2.0]), torch.ones(1, 2), is_cap=is_cap, max_len=4)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(2.0 * w / 4, rel=1e-5)  # -A min(r, C) / (B * max_len)
    assert logp.grad[0, 1].item() == pytest.approx(2.0 * 2.0 / 4, rel=1e-5)
    assert st["policy/is_capped"] == (0.5 if is_cap == 5.0 else 0.0)


# ---- the rollout pipeline: sampler top-K + token_logprobs extra_ids agree at the same weights ---------------------
def test_behaviour_topk_from_the_sampler_matches_the_trainer(tok, rand_model):
    train, _ = common.load_task("countdown")
    prompts = common.encode_prompts(tok, train[:3])
    seeds = common.stream_seeds((0,), len(prompts))
    s = common.HFSampler(tok, common.stop_ids(tok, rand_model)).generate(rand_model, prompts, 2, 6, temperature=0.8,
                                                                         seeds=seeds, topk=5)
    batch = common.collate(s, tok.pad_token_id, "cpu")
    with torch.no_grad():
        out = common.token_logprobs(rand_model, batch, 0.8, extra_ids=batch["topk_ids"])
    tk_mu = with_sampled_token(batch["topk_old_logp"], batch["topk_ids"], batch["old_logp"], batch["response_ids"])
    tk_pi = with_sampled_token(out["extra_logp"], batch["topk_ids"], out["logp"], batch["response_ids"])
    for kind in KINDS:
        d = divergence(out["logp"], batch["old_logp"], kind, tk_mu, tk_pi)  # [B, T]
        assert (d * batch["mask"]).abs().max() < 1e-4, kind  # theta == theta': only numerical mismatch
    outside = (batch["mask"] > 0) & (tk_mu[..., 5] > -math.inf)  # [B, T] sampled tokens outside the top-5
    assert outside.any()
    # the top-5 of the very distribution sampled (softmax(logits / 0.8)): nothing outside it is likelier than the 5th
    assert (batch["old_logp"][outside] <= batch["topk_old_logp"][..., -1][outside] + 1e-6).all()


# ---- the script ---------------------------------------------------------------------------------------------------
def test_importing_dppo_starts_nothing():
    assert hasattr(dppo, "main") and dppo.Args().model == "tiny"


@pytest.mark.parametrize("extra", [[], ["--divergence", "topk_kl", "--mini_batches", "2"]])
def test_dppo_smoke(tiny_cache, tmp_path, extra):
    p = run_script("dppo.py", "--max_steps", "3", "--eval_every", "2", "--output_dir", str(tmp_path), *SMALL, *extra)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = records(tmp_path)
    assert recs[0]["args"]["max_steps"] == 3 and recs[1]["step"] == 0 and "eval/pass@16" in recs[1]
    steps = recs[2:]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for k in ["reward/mean", "loss/policy", "policy/masked_frac", "policy/masked_frac_pos", "policy/masked_frac_neg",
              "policy/divergence", "policy/abs_pi_mu", "policy/ppo_clipfrac", "policy/entropy", "perf/update_s"]:
        assert all(math.isfinite(r[k]) for r in steps), k
    assert all(0 <= r["policy/masked_frac"] <= 1 for r in steps)
    assert "eval/pass@1" in steps[1] and "eval/pass@1" in steps[2] and "eval/pass@1" not in steps[0]
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "final" / "config.json").exists()
    assert "masked" in p.stderr + p.stdout


def test_a_bf16_sampler_beside_a_float32_trainer_is_a_real_mismatch_recorded_as_mu(tiny_cache, tmp_path):
    """--sampler_dtype bfloat16: the rollouts come from bf16 numerics while the trainer computes pi in float32, so in
    the first mini-batch (pi's weights = the sampler's) |pi - mu| is bf16 rounding, not zero; with the sampler in the
    trainer's float32 it is float32 rounding. Regression: before --sampler_dtype the sampler always took --dtype."""
    gap = {}
    for sd in ("auto", "bfloat16"):
        args = dppo.Args(output_dir=str(tmp_path / sd), prompts_per_step=4, group_size=4, eval_every=0, max_steps=1,
                         mini_batches=1, log_examples_every=0, sampler_dtype=sd)
        dppo.main(args)
        rec = records(tmp_path / sd)
        assert rec[0]["args"]["sampler_dtype"] == sd
        gap[sd] = rec[-1]["policy/abs_pi_mu"]
    assert gap["auto"] < 1e-5 < 1e-4 < gap["bfloat16"] < 0.05, gap


# ---- several ranks: 2 gloo ranks compute what 1 process does on the same rows -------------------------------------
# One rollout batch, two passes over it in one mini-batch each (--mini_batches 1: with N ranks a mini-batch of several
# is a slice of each rank's own rows, so its rows could not match one process's). The second optimizer step starts
# away from the rollout weights, so with delta 0.02 the gate cuts tokens; temperature 1.6 makes the two ranks'
# response lengths differ (so the Dr. GRPO normalizer must not depend on a rank's longest response).
MULTI = ["--group_size", "4", "--prompts_per_step", "8", "--micro_batch_size", "3", "--temperature", "1.6",
         "--mini_batches", "1", "--epochs", "2", "--delta", "0.02", "--max_steps", "3", "--eval_every", "0",
         "--eval_prompts", "8", "--eval_samples", "2", "--log_examples_every", "0"]

PER_RANK = """import json, os, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from transformers import HfArgumentParser
import dppo

mine, mean = [], dppo.all_ranks_mean
def recording(values, weight=1.0):  # keep this rank's step record, before the mean over ranks
    if "policy/masked_frac" in values:
        mine.append(dict(values))
    return mean(values, weight)
dppo.all_ranks_mean = recording
args = HfArgumentParser(dppo.Args).parse_args_into_dataclasses()[0]
dppo.main(args)
Path(args.output_dir, f"rank{{torch.distributed.get_rank()}}.json").write_text(json.dumps(mine))
torch.distributed.barrier()  # as dppo.py's __main__: leave together, skip gloo's teardown
os._exit(0)
"""


@pytest.fixture(scope="module")
def one_process_run(tiny_cache, tmp_path_factory):
    return one_process_run_of(tmp_path_factory, "dppo.py", *MULTI)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_compute_what_one_process_does(one_process_run, tmp_path, mode):
    """2 gloo ranks (DDP, or FSDP2 shards) against 1 process on the same rows: the same rewards, gradient norms and
    weights, with the gate cutting tokens on each rank and the ranks' response lengths differing. dppo.py runs
    through a wrapper that keeps each rank's own step record (the metrics file holds their mean)."""
    (tmp_path / "per_rank.py").write_text(PER_RANK.format(root=str(ROOT)))
    extra = ["--fsdp", "true"] if mode == "fsdp" else []
    p = run_script(*TORCHRUN,
                   str(tmp_path / "per_rank.py"), *MULTI, *extra, "--output_dir", str(tmp_path / "run"), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = records(one_process_run)[1:], records(tmp_path / "run")[1:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in two] == [1, 2, 3] and [len(r) for r in ranks] == [3, 3]
    # a real test: the gate acts on both ranks, the ranks' responses differ in length, the gradient is not tiny
    assert all(max(s["policy/masked_frac"] for s in r) > 0 for r in ranks), ranks
    assert any(a["response/len"] != b["response/len"] for a, b in zip(*ranks))
    assert all(r["perf/grad_norm"] > 0.01 for r in one)  # small: Dr. GRPO divides by B * max_new_tokens
    assert_same_as_one_process(one_process_run, tmp_path / "run")  # rollouts, grad norms, weights


# ---- gaps mutation testing found (python tests/mutation.py dppo.dppo_loss) ----
def naive_dppo(logp, old, adv, mask, kind, delta, delta_low, is_cap, eps_low, eps_high, max_len, ref=None, beta=0.0):
    """dppo_loss written token by token from its docstring and Eq. 12-14 / 23 (binary estimators, Dr. GRPO's
    normalizer B * max_len), with d loss / d log pi per token and every statistic: an independent reference."""
    B, T = logp.shape
    dl = delta if delta_low is None else delta_low
    tot, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    n = cut_pos = cut_neg = div_sum = abs_sum = ppo = capped = r_sum = kl_sum = 0.0
    for i in range(B):
        a = adv[i].item()
        for t in range(T):
            if mask[i, t] == 0:
                continue
            lp, o = logp[i, t].item(), old[i, t].item()
            p, m = math.exp(lp), math.exp(o)
            r = math.exp(min(max(lp - o, -20.0), 20.0))
            if kind == "binary_tv":
                div = abs(m - p)
            else:  # Eq. 14 with the official code's 1e-8 guards
                div = m * (o - lp) + (1 - m) * (math.log(1 - m + 1e-8) - math.log(1 - p + 1e-8))
            away = (a > 0 and r > 1) or (a < 0 and r < 1)
            keep = not (away and div > (delta if a > 0 else dl))
            w = min(r, is_cap)
            loss, g = (-a * w * lp, -a * w) if keep else (0.0, 0.0)
            if ref is not None and beta > 0:
                d = ref[i, t].item() - lp
                kl = math.exp(min(max(d, -20.0), 20.0)) - min(max(d, -20.0), 20.0) - 1
                loss, kl_sum = loss + beta * kl, kl_sum + kl
                g += beta * (1 - math.exp(d)) if -20 < d < 20 else 0.0  # no gradient where d is clamped
            tot, grad[i, t] = tot + loss, g / (B * max_len)
            n, div_sum, abs_sum, r_sum = n + 1, div_sum + div, abs_sum + abs(p - m), r_sum + r
            cut_pos, cut_neg = cut_pos + (not keep and a > 0), cut_neg + (not keep and a < 0)
            ppo += (a > 0 and r > 1 and r - 1 > eps_high) or (a < 0 and r < 1 and 1 - r > eps_low)
            capped += r > is_cap
    st = {"policy/masked_frac": (cut_pos + cut_neg) / n, "policy/masked_frac_pos": cut_pos / n,
          "policy/masked_frac_neg": cut_neg / n, "policy/divergence": div_sum / n, "policy/abs_pi_mu": abs_sum / n,
          "policy/ppo_clipfrac": ppo / n, "policy/is_capped": capped / n, "policy/ratio": r_sum / n}
    if ref is not None and beta > 0:
        st["policy/kl"] = kl_sum / n
    return tot / (B * max_len), grad, st


def _gap_toy(extreme=False):
    """(mu, pi) of the sampled token by hand, with A = 2, 0.5, 0, -1.5: moves away from mu with TV .05 / .12 / .2 /
    .25 / .8 on both signs, moves back, r = 6 (past the cap, one kept, one cut), r exactly 1, padding. extreme: log
    ratios of +30 and -30 on tokens that move back toward mu (never cut)."""
    mu = [[0.5, 0.3, 0.6, 0.2, 0.1, 0.5], [0.5, 0.4, 0.05, 0.7, 0.5, 0.5],
          [0.3, 0.8, 0.5, 0.1, 0.4, 0.5], [0.5, 0.6, 0.3, 0.9, 0.1, 0.4]]
    pi = [[0.7, 0.35, 0.4, 0.2, 0.9, 0.5], [0.62, 0.4, 0.3, 0.5, 0.5, 0.5],
          [0.6, 0.5, 0.5, 0.2, 0.1, 0.5], [0.3, 0.55, 0.5, 0.1, 0.6, 0.4]]
    old, logp = lg(mu), lg(pi)
    if extreme:
        old[0, 2], logp[0, 2] = -5.0, -35.0  # A > 0, r = e^-30: back toward mu
        old[3, 4], logp[3, 4] = -35.0, -5.0  # A < 0, r = e^+30: back toward mu
        old[1, 3], logp[1, 3] = -5.0, -35.0  # A = .5, r = e^-30
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return logp, old, torch.tensor([2.0, 0.5, 0.0, -1.5]), mask


@pytest.mark.parametrize("kind,delta,delta_low,eps_low,eps_high,is_cap,beta,extreme,ref_shift", [
    ("binary_tv", 0.1, 0.3, 0.1, 0.5, 1.0, 0.5, False, None),  # asymmetric deltas and eps; cap 1 = r exactly 1
    ("binary_kl", 0.05, 0.02, 0.3, 0.15, 5.0, 0.0, False, None),  # a reference passed with beta 0 adds nothing
    ("binary_tv", 0.15, None, 0.2, 0.2, float("inf"), 0.0, True, None),  # log r = +-30: r = e^+-20 exactly
    ("binary_tv", 0.15, None, 0.2, 0.2, 5.0, 0.3, True, -30.0),  # ref - log pi = -30 on two tokens: d = -20
    ("binary_tv", 0.15, 0.1, 0.2, 0.2, 5.0, 0.3, False, 30.0),  # ref - log pi = +30 on two tokens: d = +20
])
def test_loss_gradient_and_every_stat_equal_the_token_by_token_reference(kind, delta, delta_low, eps_low, eps_high,
                                                                          is_cap, beta, extreme, ref_shift):
    """Loss, d loss / d log pi per token, and every statistic (keys and values) against naive_dppo, with the optional
    k3 KL to a reference (beta * k3 per token, logged as policy/kl), asymmetric thresholds, clamps that act."""
    logp, old, adv, mask = _gap_toy(extreme)
    ref = logp + 0.8 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(7))
    if ref_shift is not None:
        ref[0, 1], ref[3, 5] = logp[0, 1] + ref_shift, logp[3, 5] + ref_shift
    x = logp.clone().requires_grad_(True)
    loss, st = dppo_loss(x, old, adv, mask, kind, delta, is_cap, 8, delta_low=delta_low, eps_low=eps_low,
                         eps_high=eps_high, ref_logp=ref, beta=beta)
    loss.backward()
    expect, grad, est = naive_dppo(logp, old, adv, mask, kind, delta, delta_low, is_cap, eps_low, eps_high, 8, ref,
                                   beta)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert torch.allclose(x.grad.double(), grad, rtol=1e-5, atol=1e-7 if beta else 0.0)
    assert set(st) == set(est)
    for k, v in est.items():
        assert st[k] == pytest.approx(v, rel=1e-5, abs=1e-9 if k != "policy/ratio" else 1e-12), k
    assert 0 < st["policy/masked_frac_pos"] and 0 < st["policy/masked_frac_neg"] and math.isfinite(loss.item())


def test_the_defaults_are_the_trainer_s():
    """Called bare, dppo_loss is the method as dppo.py runs it with Args(): binary TV with delta 0.15 on both signs,
    C = 5, eps 0.2 for the PPO diagnostic, no KL to a reference even when one is passed; and beta without ref_logp
    adds nothing (there is nothing to compare with)."""
    logp, old, adv, mask = _gap_toy()
    ref = logp - 0.5
    a = dppo.Args()
    bare, st = dppo_loss(logp, old, adv, mask, ref_logp=ref)
    full, st_full = dppo_loss(logp, old, adv, mask, kind=a.divergence, delta=a.delta or 0.15, is_cap=a.is_cap,
                              delta_low=a.delta_low or None, agg=a.agg, eps_low=a.eps_low, eps_high=a.eps_high,
                              ref_logp=ref, beta=a.beta)
    assert st["policy/is_capped"] > 0 and st["policy/ppo_clipfrac"] > 0 and "policy/kl" not in st
    assert bare.item() == full.item() and st == st_full
    no_ref, st_no_ref = dppo_loss(logp, old, adv, mask, beta=0.5)
    assert no_ref.item() == bare.item() and st_no_ref == st


# ---- gaps mutation testing found (python tests/mutation.py lp_reg.select_tokens dppo.trust_region_mask) ----
def test_trust_region_mask_hand_table_at_the_thresholds_with_asymmetric_deltas():
    """Eq. 12 by hand, delta_low = 0.125 (A < 0) != delta_high = 0.25 (A > 0): a token is cut only if it moves away
    from mu (r > 1 for A > 0, r < 1 for A < 0: r exactly 1 does not, though a top-K D can be large there) and D is
    strictly above its sign's delta (D exactly at delta is kept); A = 0 is never cut."""
    # (r, D, M) per token; rows A = +2, -0.5, 0
    table = [[(1.0, 0.5, 1), (1.5, 0.25, 1), (1.5, 0.375, 0), (1.5, 0.2, 1), (0.5, 0.5, 1)],
             [(1.0, 0.5, 1), (0.5, 0.125, 1), (0.5, 0.2, 0), (0.5, 0.1, 1), (1.5, 0.5, 1)],
             [(1.0, 0.5, 1), (1.5, 0.375, 1), (0.5, 0.2, 1), (1.5, 0.5, 1), (0.5, 0.5, 1)]]
    ratio, div, expect = (torch.tensor([[tok[j] for tok in row] for row in table]).float() for j in range(3))
    m = trust_region_mask(div, ratio, torch.tensor([2.0, -0.5, 0.0]), 0.125, 0.25)
    assert m.dtype == torch.float32 and torch.equal(m, expect)
    swapped = trust_region_mask(div, ratio, torch.tensor([2.0, -0.5, 0.0]), 0.25, 0.125)  # the deltas by sign
    assert swapped[0].tolist() == [1, 0, 0, 0, 1] and swapped[1].tolist() == [1, 1, 1, 1, 1]


def test_unknown_divergence_is_named_with_the_choices():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"unknown divergence 'tv': binary_tv \| binary_kl \| topk_tv \| topk_kl"):
        divergence(x, x, "tv")
