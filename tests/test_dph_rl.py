"""dph_rl.py (DPH-RL, arXiv 2509.07430): the f-divergences, routing, split and PPO properties on hand-computed
micro-examples and naive references, then the script itself end to end, on one process and on two ranks."""
import math

import pytest
import torch
from conftest import TORCHRUN, assert_same_as_one_process, records, run_script, SMALL as BASE_SMALL

import common
import dph_rl
from common import Example, HFSampler, Samples, collate, token_logprobs
from dph_rl import build_pef, dph_loss, f_divergence, policy_loss, route_counts, split_pef

KINDS = ["js", "forward_kl", "alpha"]


def f_naive(u, kind, alpha=0.2):
    """The generators as the official core_algos.py writes them (kl_penalty "low_var_kl" with swapped arguments,
    js_low_var, alpha_divergence_f), in float64."""
    if kind == "forward_kl":
        return u - 1 - torch.log(u)
    if kind == "js":
        return u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2)
    return (u ** (1 - alpha) - (1 - alpha) * u - alpha) / (alpha * (alpha - 1))


def per_token(delta, kind, alpha=0.2):
    """f at each entry of a 1-D delta (f_divergence on a [n, 1] batch, one token each)."""
    return torch.stack([f_divergence(d.reshape(1, 1), torch.zeros(1, 1, dtype=d.dtype), torch.ones(1, 1), kind, alpha)
                        for d in delta])


# ---- zero at the reference, non-negative, gradient sign --------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_zero_and_zero_gradient_at_the_reference(kind):
    ref = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.05, 0.7, 0.3]]))
    logp = ref.clone().requires_grad_(True)
    loss = f_divergence(logp, ref, torch.ones(2, 3), kind)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_negative_and_matches_the_table(kind, dtype):
    delta = torch.linspace(-20, 20, 401, dtype=dtype)
    f = per_token(delta, kind)
    assert torch.isfinite(f).all() and (f >= 0).all()
    u = torch.exp(torch.linspace(-3, 2.5, 56, dtype=torch.float64))  # inside forward_kl's clamp
    got = per_token(torch.log(u).to(dtype), kind).double()
    assert torch.allclose(got, f_naive(u, kind), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,closed", [
    ("forward_kl", lambda u: u - 1),
    ("js", lambda u: u * torch.log(2 * u / (1 + u))),
    ("alpha", lambda u: (u - u ** 0.8) / 0.2),
])
def test_gradient_is_the_closed_form_and_negative_below_one(kind, closed):
    delta = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)  # 1 / 11 each: token-mean over 11 tokens
    x = delta.reshape(1, -1).clone().requires_grad_(True)
    f_divergence(x, torch.zeros_like(x), torch.ones_like(x), kind).backward()
    g = x.grad.reshape(-1) * 11
    assert torch.allclose(g, closed(torch.exp(delta)), atol=1e-10)
    assert (g[delta < 0] < 0).all() and (g[delta > 0] > 0).all()  # descent raises under-weighted stored tokens


# ---- exact expectations on a toy categorical -------------------------------------------------------------------
def test_expectations_under_pi_ref_are_the_divergences():
    g = torch.Generator().manual_seed(0)
    pi_ref = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    pi = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    m = (pi + pi_ref) / 2
    kl = lambda p, q: (p * torch.log(p / q)).sum()  # noqa: E731
    expect = {"forward_kl": kl(pi_ref, pi), "js": kl(pi, m) + kl(pi_ref, m),
              "alpha": (1 - (pi ** 0.8 * pi_ref ** 0.2).sum()) / (0.2 * 0.8)}
    for kind, value in expect.items():
        f = per_token(torch.log(pi) - torch.log(pi_ref), kind)
        assert (pi_ref * f).sum().item() == pytest.approx(value.item(), rel=1e-9), kind


# ---- limits ----------------------------------------------------------------------------------------------------
def test_alpha_limits_and_tails():
    u = torch.linspace(0.3, 3, 28, dtype=torch.float64)
    d = torch.log(u)
    assert torch.allclose(per_token(d, "alpha", 0.999), u - 1 - d, atol=1e-3)  # -> forward KL
    assert torch.allclose(per_token(d, "alpha", 0.001), u * d - u + 1, atol=1e-3)  # -> reverse KL
    far = torch.tensor([-60.0], dtype=torch.float64)
    assert per_token(far, "js").item() == pytest.approx(math.log(2), abs=1e-12)
    assert per_token(far, "alpha", 0.2).item() == pytest.approx(1.25, abs=1e-12)
    for alpha in (0.0, 1.0):  # both ends excluded: f divides by alpha (alpha - 1)
        with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\), got"):
            f_divergence(d.reshape(1, -1), d.reshape(1, -1), torch.ones(1, 28), "alpha", alpha)
    with pytest.raises(ValueError, match=r"unknown divergence 'kl': js \| forward_kl \| alpha"):
        f_divergence(d.reshape(1, -1), d.reshape(1, -1), torch.ones(1, 28), "kl")


def test_default_divergence_is_js():
    """The paper's default generator (and the trainer's --divergence default) is Jensen-Shannon."""
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert f_divergence(logp, ref, mask).item() == f_divergence(logp, ref, mask, "js").item()


def test_forward_kl_clamp_zeroes_the_gradient():
    x = torch.tensor([[-12.0, -10.0, 2.5, 2.7, 25.0, 100.0]], requires_grad=True)
    f_divergence(x, torch.zeros_like(x), torch.ones_like(x), "forward_kl").backward()
    assert x.grad[0, 0] == 0 and x.grad[0, 3] == 0 and x.grad[0, 4] == 0  # value clamped at 10 (or delta at 20)
    assert x.grad[0, 5] == 0  # delta capped at 20 before expm1: e^100 overflows float32, and 0 * inf would be NaN
    assert x.grad[0, 1] < 0 and x.grad[0, 2] > 0
    assert per_token(torch.tensor([-12.0, 30.0]), "forward_kl").tolist() == [10.0, 10.0]


# ---- masking ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_masked_tokens_count_for_nothing(kind):
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.3], [0.6, 0.1, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.9], [0.2, 0.1, 0.4]]))
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    loss = f_divergence(logp, ref, mask, kind)
    u = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    assert loss.item() == pytest.approx(f_naive(u, kind).sum().item() / 3, rel=1e-5)  # denominator: 3 tokens
    wild = logp.clone()
    wild[mask == 0] = torch.tensor([-1e4, 50.0, 1e4])  # even absurd values off the mask
    x = wild.clone().requires_grad_(True)
    loss2 = f_divergence(x, ref, mask, kind)
    loss2.backward()
    assert loss2.item() == loss.item() and torch.isfinite(x.grad).all() and (x.grad[mask == 0] == 0).all()


# ---- per-sample routing and the combination --------------------------------------------------------------------
def _mixed(seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logp, old, ref = (-torch.rand(B, T, generator=g) * 2 for _ in range(3))
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1
    adv = torch.randn(B, generator=g)
    is_pef = torch.tensor([False, True, False, False, True, False])
    return logp, old, ref * is_pef[:, None], adv * ~is_pef, mask, is_pef


def test_routing_each_row_sees_only_its_own_loss():
    logp, old, ref, adv, mask, is_pef = _mixed()
    base, _ = dph_loss(logp, old, ref, adv, mask, is_pef, eta=0.2)
    other = torch.randn(6, 5)
    same = [dph_loss(logp, torch.where(is_pef[:, None], other, old), ref, adv, mask, is_pef, 0.2)[0],  # pef old_logp
            dph_loss(logp, old, torch.where(is_pef[:, None], ref, other), adv, mask, is_pef, 0.2)[0],  # exp ref_logp
            dph_loss(logp, old, ref, torch.where(is_pef, torch.ones(6) * 5, adv), mask, is_pef, 0.2)[0]]  # pef adv
    assert all(x.item() == base.item() for x in same)


@pytest.mark.parametrize("weighting", ["share", "paper"])
def test_combination_and_gradients_hand_computed(weighting):
    logp, old, ref, adv, mask, is_pef = _mixed()
    x = logp.clone().requires_grad_(True)
    loss, st = dph_loss(x, old, ref, adv, mask, is_pef, eta=0.3, weighting=weighting, dual_clip=0)
    e, p = ~is_pef, is_pef
    l_exp, _ = policy_loss(logp[e], old[e], adv[e], mask[e], 0.2, 0.28, dual_clip=0)
    u = torch.exp(logp[p] - ref[p])
    l_pef = ((u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2)) * mask[p]).sum() / mask[p].sum()
    s_exp, s_pef = (4 / 6, 2 / 6) if weighting == "share" else (1.0, 1.0)
    assert loss.item() == pytest.approx(s_exp * l_exp.item() + 0.3 * s_pef * l_pef.item(), rel=1e-5)
    assert st["policy/divergence"] == pytest.approx(l_pef.item(), rel=1e-5)
    loss.backward()
    g_pef = 0.3 * s_pef * u * torch.log(2 * u / (1 + u)) * mask[p] / mask[p].sum()  # d/dlogp of eta s TM(f_js)
    assert torch.allclose(x.grad[p], g_pef, atol=1e-6)
    y = logp[e].clone().requires_grad_(True)  # D_exp rows: exactly s_exp * the PPO gradient, nothing from f
    (s_exp * policy_loss(y, old[e], adv[e], mask[e], 0.2, 0.28, dual_clip=0)[0]).backward()
    assert torch.allclose(x.grad[e], y.grad, atol=1e-7) and (y.grad != 0).any()


def test_eta_zero_is_dapo_on_the_exp_rows():
    logp, old, ref, adv, mask, is_pef = _mixed(1)
    x = logp.clone().requires_grad_(True)
    loss, _ = dph_loss(x, old, ref, adv, mask, is_pef, eta=0.0)
    loss.backward()
    e = ~is_pef
    dapo, _ = policy_loss(logp[e], old[e], adv[e], mask[e], 0.2, 0.28)
    assert loss.item() == pytest.approx(4 / 6 * dapo.item(), rel=1e-6)  # up to the `share` factor N_exp / N
    assert (x.grad[is_pef] == 0).all() and (x.grad[e] != 0).any()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("weighting", ["share", "paper"])
def test_micro_batch_shares_add_up_to_the_mini_batch(agg, weighting):
    logp, old, ref, adv, mask, is_pef = _mixed(2)
    kw = dict(eta=0.2, weighting=weighting, agg=agg)
    whole, _ = dph_loss(logp, old, ref, adv, mask, is_pef, **kw)
    kw["counts"] = route_counts(mask, is_pef)  # of the whole mini-batch
    parts = sum(dph_loss(logp[s], old[s], ref[s], adv[s], mask[s], is_pef[s], **kw)[0]
                for s in (slice(0, 1), slice(1, 2), slice(2, 5), slice(5, 6)))  # pef-only, exp-only and mixed
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5)


@pytest.mark.parametrize("weighting", ["share", "paper"])
def test_counts_over_ranks_make_the_gradient_of_the_whole_batch(weighting):
    """Two ranks with other D_exp / D_pef token counts (and other row counts): the mean of their gradients (what DDP
    and FSDP apply) equals the gradient of the whole batch when the counts are summed over ranks / world; the
    per-rank counts give another gradient."""
    logp, old, ref, adv, mask, is_pef = _mixed(3, B=6, T=7)
    mask[0] = 1  # rank 0's exp row is long, rank 1's short: per-rank token-means differ from the global one
    mask[3, 2:] = 0
    ranks = (slice(0, 2), slice(2, 6))  # rank 0: 1 exp + 1 pef row; rank 1: 3 exp + 1 pef
    kw = dict(eta=0.5, weighting=weighting)

    def grad(rows, counts=None):
        x = logp.clone().requires_grad_(True)
        dph_loss(x[rows], old[rows], ref[rows], adv[rows], mask[rows], is_pef[rows], counts=counts, **kw)[0].backward()
        return x.grad

    whole = grad(slice(None))
    counts = sum(route_counts(mask[r], is_pef[r]) for r in ranks) / 2
    assert torch.allclose(sum(grad(r, counts) for r in ranks) / 2, whole, atol=1e-7)
    assert not torch.allclose(sum(grad(r) for r in ranks) / 2, whole, atol=1e-4)


# ---- PPO ---------------------------------------------------------------------------------------------------------
def test_ppo_clip_higher_and_dual_clip():
    old = torch.zeros(1, 6)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.7, 4.0, 1.2, 0.5]]))
    mask = torch.ones(1, 6)
    for a in (1.0, -2.0):
        x = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(x, old, torch.tensor([a]), mask)
        loss.backward()
        g = x.grad[0]
        if a > 0:  # ratios 1.5 and 4 are above 1.28: no gradient; 0.7 and 0.5 still push up
            assert g[1] == 0 and g[3] == 0 and g[2] < 0 and g[5] < 0
            expect = [-1, -1.28, -0.7, -1.28, -1.2, -0.5]
        else:  # ratio .7 and .5 below 0.8: no gradient; ratio 4 > 3: the constant 3 |adv|
            assert g[2] == 0 and g[5] == 0 and g[3] == 0 and g[1] > 0
            expect = [2, 3, 1.6, 6, 2.4, 1.6]
        assert loss.item() == pytest.approx(sum(expect) / 6, abs=1e-5)
    loss, _ = policy_loss(old, old, torch.tensor([0.7]), mask)  # at ratio 1: -TM(adv)
    assert loss.item() == pytest.approx(-0.7)
    assert torch.equal(dph_rl.group_advantages(torch.ones(8), 8), torch.zeros(8))


# ---- the split and the stored reference log-probs -----------------------------------------------------------------
def test_split_pef_rule():
    correct = torch.zeros(3, 8, dtype=torch.bool)
    correct[0] = True  # 8/8
    correct[1, :7] = True  # 7/8
    assert split_pef(correct, 8).tolist() == [True, False, False]
    assert split_pef(correct, 7).tolist() == [True, True, False]


class ScriptedSampler:
    """Answers prompt i with the responses in script[i] (one list per generate call), log-prob -1 per token."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, 0

    def generate(self, model, prompt_ids, n, max_new_tokens, temperature=1.0, seeds=None, topk=0):
        out = Samples([], [], [], [])
        for p in prompt_ids:
            for text in self.script[self.calls][tuple(p)][:n]:
                ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                out.prompt_ids.append(p), out.response_ids.append(ids), out.logp.append([-1.0] * len(ids))
                out.finish.append("stop")
        self.calls += 1
        return out


def test_build_pef_split_and_wrong_extra_sample(tok):
    gt = [("1,2,3", 6), ("2,2,5", 9), ("1,1,1", 3)]
    ex = [Example("countdown", f"Q:{g}->{t} A:", "", f"{g}->{t}") for g, t in gt]
    keys = [tuple(tok(e.prompt)["input_ids"]) for e in ex]
    right, wrong = ["1+2+3", "2+2+5", "1+1+1"], "9"
    script = [{keys[0]: [right[0]] * 8, keys[1]: [right[1]] * 7 + [wrong], keys[2]: [right[2]] * 8},  # 8/8, 7/8, 8/8
              {keys[0]: [right[0]], keys[2]: [wrong]}]  # extra samples: prompt 2's is wrong -> stores nothing
    res = build_pef(None, tok, ScriptedSampler(tok, script), ex, [10, 11, 12], 8, 8, 12, 1.0, 0)
    assert res["pef_idx"] == [10, 12] and res["n_correct"] == [8, 7, 8]
    assert res["prompt_ids"] == [list(keys[0])] and len(res["response_ids"]) == len(res["ref_logp"]) == 1
    assert tok.decode(res["response_ids"][0], skip_special_tokens=True) == "1+2+3"


def test_stored_ref_logp_is_the_initial_model_at_the_training_temperature(tok, rand_model, monkeypatch):
    monkeypatch.setattr(common, "score", lambda e, c: 1.0)  # every sample "correct": all prompts stored
    ex = [Example("countdown", f"Q:{i},2,3->6 A:", "", f"{i},2,3->6") for i in range(1, 7)]
    res = build_pef(rand_model, tok, HFSampler(tok, [tok.eos_token_id]), ex, list(range(6)), 4, 4, 8, 0.7, seed=3)
    assert len(res["ref_logp"]) == 6
    batch = collate(Samples(res["prompt_ids"], res["response_ids"], res["ref_logp"], ["stop"] * 6), tok.pad_token_id,
                    "cpu")
    with torch.no_grad():
        recomputed = token_logprobs(rand_model, batch, temperature=0.7)["logp"]
    assert torch.allclose(recomputed, batch["old_logp"], atol=1e-4)
    assert not torch.allclose(token_logprobs(rand_model, batch, temperature=1.0)["logp"], batch["old_logp"], atol=1e-2)


class Recording:
    """Passes every call to `inner` and keeps each generate call's Samples."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, *a, **kw):
        self.calls.append(self.inner.generate(*a, **kw))
        return self.calls[-1]


def test_extra_sample_is_not_a_replay_of_a_split_sample(tok, rand_model, monkeypatch):
    """Regression: the extra sample's seed was the split's seed + 1, and vLLM seeds child j of a prompt with seed + j,
    so the stored sample was split sample #1 again: a sample the D_pef selection had already conditioned on. A replay
    would match on all 40 prompts; independent draws match on a handful at most (a response can be just EOS)."""
    monkeypatch.setattr(common, "score", lambda e, c: 1.0)  # every prompt in D_pef, every extra sample stored
    ex = [Example("countdown", f"Q:{i % 10},{i // 10},3->6 A:", "", "") for i in range(40)]
    rec = Recording(HFSampler(tok, [tok.eos_token_id]))
    res = build_pef(rand_model, tok, rec, ex, list(range(40)), 4, 4, 8, 1.0, seed=0)
    split, extra = rec.calls
    assert res["response_ids"] == extra.response_ids and len(split.response_ids) == 160
    for j in range(4):
        assert sum(extra.response_ids[i] == split.response_ids[4 * i + j] for i in range(40)) <= 5, j


def test_split_does_not_depend_on_ranks_or_chunks(tok, rand_model, monkeypatch):
    """Each prompt samples from streams of (seed, its position in the training set): two contiguous halves split
    apart in chunks of 7 (what two ranks do) give exactly the split of the whole in one chunk."""
    monkeypatch.setattr(common, "score", lambda e, c: float(len(c) % 2 == 0))  # some prompts in D_pef, some not
    ex = [Example("countdown", f"Q:{i % 10},{i // 10},3->6 A:", "", "") for i in range(30)]
    sampler = HFSampler(tok, [tok.eos_token_id])
    whole = build_pef(rand_model, tok, sampler, ex, list(range(30)), 4, 2, 8, 1.0, seed=5)
    halves = [build_pef(rand_model, tok, sampler, ex[s], list(range(30))[s], 4, 2, 8, 1.0, seed=5, chunk=7)
              for s in (slice(0, 15), slice(15, 30))]
    assert 0 < len(whole["pef_idx"]) < 30 and whole["response_ids"]
    for key in ("pef_idx", "n_correct", "prompt_ids", "response_ids"):
        assert halves[0][key] + halves[1][key] == whole[key], key
    ref = [x for h in halves for r in h["ref_logp"] for x in r]
    assert ref == pytest.approx([x for r in whole["ref_logp"] for x in r], abs=1e-5)


# ---- the script -------------------------------------------------------------------------------------------------
SMALL = BASE_SMALL + ["--pef_split_prompts", "48", "--pef_min_correct", "2"]


def test_importing_dph_rl_starts_nothing():
    args = dph_rl.Args()
    assert hasattr(dph_rl, "main") and args.divergence == "js" and args.pef_min_correct == 8
    assert args.pef_split_prompts == 0  # the whole training set is split, as the paper does


def test_dph_rl_smoke_and_resume(tiny_cache, tmp_path):
    p = run_script("dph_rl.py", "--max_steps", "3", "--eval_every", "2", "--output_dir", str(tmp_path), *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = records(tmp_path)
    assert recs[0]["args"]["max_steps"] == 3 and recs[0]["eta"] == 0.2 and recs[1]["step"] == 0
    steps = recs[2:]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for k in ["reward/mean", "loss/policy", "loss/exp", "policy/divergence", "policy/clipfrac", "policy/entropy",
              "pef/prompts", "pef/exp_prompts", "pef/stored", "pef/block", "perf/update_s"]:
        assert all(math.isfinite(r[k]) for r in steps), k
    assert steps[0]["pef/stored"] > 0 and steps[0]["pef/block"] == 2  # 4 * 4 / 8 stored sequences per step
    assert 0 < steps[0]["pef/prompts"] <= 48 and steps[0]["pef/exp_prompts"] > 4000  # the unsplit prompts stay in D_exp
    assert steps[0]["policy/divergence"] < 1e-6  # the first update sees pi == pi_ref on the stored tokens
    assert "eval/pass@16" in steps[1] and "eval/pass@8" in steps[2] and "D_pef:" in p.stdout
    cache = tmp_path / "pef_cache.pt"
    stamp = cache.stat().st_mtime_ns
    p = run_script("dph_rl.py", "--max_steps", "4", "--eval_every", "2", "--output_dir", str(tmp_path),
                   "--resume", "true", *SMALL)
    assert p.returncode == 0 and f"loaded the D_pef split from {cache}" in p.stdout, p.stdout + p.stderr
    assert cache.stat().st_mtime_ns == stamp and [r["step"] for r in records(tmp_path)[2:]] == [1, 2, 3, 4]


def _args(tmp_path, **kw):
    """dph_rl.Args for an in-process run of a few seconds: 48 split prompts, a loose D_pef rule so some are stored."""
    base = dict(model=str(common.tiny_cache_dir("countdown")), lr=3e-4, output_dir=str(tmp_path), max_steps=1,
                prompts_per_step=4, group_size=4, eval_prompts=8, eval_samples=4, log_examples_every=0, eval_every=0,
                pef_split_prompts=48, pef_min_correct=2)
    return dph_rl.Args(**{**base, **kw})


def test_a_fresh_run_reuses_the_cached_split_of_the_same_settings(tiny_cache, tmp_path, monkeypatch, capsys):
    """The split is computed once per (model, data, split settings): a second fresh run with the same settings loads
    it (and the file is not rewritten); a changed setting (--pef_k) computes its own."""
    model = str(common.tiny_cache_dir("countdown"))  # read before RLVR_CACHE moves to an empty folder
    args = lambda name, **kw: _args(tmp_path / name, model=model, **kw)  # noqa: E731
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "cache" / "dph_split"
    dph_rl.main(args("a"))
    first = capsys.readouterr()
    assert "cached the split in" in first.out and "D_pef split" in first.err  # computed, with a progress bar
    [file] = store.glob("*.pt")
    stamp = file.stat().st_mtime_ns
    dph_rl.main(args("b"))
    second = capsys.readouterr()
    assert f"loaded the D_pef split from {file}" in second.out and "D_pef split" not in second.err
    assert file.stat().st_mtime_ns == stamp and len(list(store.glob("*.pt"))) == 1
    a, b = (torch.load(tmp_path / d / "pef_cache.pt", weights_only=False) for d in "ab")
    assert a == b and a["ref_logp"]  # each run keeps its copy for --resume
    dph_rl.main(args("c", pef_k=6))
    assert "cached the split in" in capsys.readouterr().out and len(list(store.glob("*.pt"))) == 2


def test_too_few_exp_prompts_fail_with_one_sentence(tiny_cache, tmp_path, monkeypatch):
    """An initial policy that solves every prompt leaves D_exp empty: one sentence, not a numpy traceback."""
    args = _args(tmp_path, pef_split_prompts=0)
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path / "cache"))
    solved = lambda model, tok, sampler, ex, index, k, *a, **kw: {  # noqa: E731
        "pef_idx": list(index), "n_correct": [k] * len(index), "prompt_ids": [], "response_ids": [], "ref_logp": []}
    monkeypatch.setattr(dph_rl, "build_pef", solved)
    with pytest.raises(SystemExit, match=r"D_exp has only 0 prompts .*fewer than --prompts_per_step 4"):
        dph_rl.main(args)


MULTI = ["--task", "arithmetic", "--group_size", "4", "--prompts_per_step", "8", "--micro_batch_size", "3",
         "--temperature", "1.6", "--max_steps", "3", "--eval_every", "0", "--eval_prompts", "8", "--eval_samples", "2",
         "--lr", "3e-4", "--pef_split_prompts", "48", "--pef_min_correct", "2", "--pef_per_step", "8", "--eta", "1.0",
         "--log_examples_every", "0"]


@pytest.fixture(scope="module")
def arithmetic_model(tiny_cache):
    """A tiny arithmetic model: its correct answers have 2 or 3 digits, so the stored D_pef rows differ in length
    between ranks (countdown's never do). Warm-started for 1,000 steps, not the default 500: at 500 steps the model
    sits on the edge of learning the task, and on some CPUs solves 3 of the 48 split prompts 2 of 8 times at T = 1.6
    and stores no D_pef row at all, which leaves the test nothing to compare; at 1,000 steps it solves 41."""
    path = tiny_cache / "tiny-arithmetic-sft1000"
    return str(path if path.exists() else common.build_tiny("arithmetic", path, sft_steps=1000))


def _run(model, out_dir, *extra, ranks=1):  # 1 or 2 ranks
    """dph_rl.py with a split cache of its own, so that every run computes its split (on 1 or on 2 ranks)."""
    return run_script(*(TORCHRUN if ranks == 2 else []), "dph_rl.py", *MULTI, *extra, "--model", model,
                      "--output_dir", str(out_dir), env={"RLVR_CACHE": str(out_dir / "split_cache")}, timeout=300)


@pytest.fixture(scope="module")
def one_process_run(arithmetic_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("one_process")
    p = _run(arithmetic_model, d)
    assert p.returncode == 0, p.stderr[-3000:]
    return d


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_compute_what_one_process_does(arithmetic_model, one_process_run, tmp_path, mode):
    """2 gloo ranks (DDP, or FSDP2 shards) against 1 process on the same rows: the same split, rewards, gradient norms
    and weights. Each rank holds 16 rollouts and 4 stored D_pef rows per step, the ranks' rows of either kind of
    other lengths, so a per-rank normaliser of L_exp's or of L_pef's token-mean, or a per-rank D_pef block, or a
    split that depends on the ranks gives another run."""
    p = _run(arithmetic_model, tmp_path, *(["--fsdp", "true"] if mode == "fsdp" else []), ranks=2)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = records(one_process_run)[1:], records(tmp_path)[1:]
    split_one, split_two = (torch.load(d / "pef_cache.pt", weights_only=False) for d in (one_process_run, tmp_path))
    assert [r["step"] for r in two] == [1, 2, 3]
    # not vacuous: D_pef rows of several lengths in every batch, an f-loss that pulls once pi has moved from pi_ref,
    # rollouts of other lengths on the two ranks, and gradients of a size where a wrong weighting shows
    assert all(r["pef/block"] == 8 for r in one) and len({len(r) for r in split_one["response_ids"]}) > 1
    assert all(r["policy/divergence"] > 1e-3 for r in one[1:])
    assert len({r["response/len"] for r in one}) > 1 and any(r["perf/grad_norm"] > 0.1 for r in one)
    for key in ("pef_idx", "n_correct", "prompt_ids", "response_ids"):  # split on 2 ranks = split on 1 process
        assert split_one[key] == split_two[key], key
    assert_same_as_one_process(one_process_run, tmp_path)  # rollouts, grad norms, weights


# ---- gaps mutation testing found (python tests/mutation.py dph_rl.policy_loss dph_rl.dph_loss dph_rl.route_counts) ----
def naive_ppo(logp, old, adv, mask, eps_low, eps_high, agg, max_len, dual_clip):
    """PPO-clip with dual-clip token by token (verl compute_policy_loss: max of the two PPO terms, for A < 0 at most
    -A c; clipfrac counts the tokens where the clipped term is strictly larger), the three aggregations as aggregate's
    docstring words them, and every statistic: an independent reference."""
    B, T = logp.shape
    rows, clipped, ratios = [], 0, 0.0
    for i in range(B):
        a, row_sum, row_n = adv[i].item(), 0.0, 0
        for t in range(T):
            if mask[i, t] == 0:
                continue
            r = math.exp(min(max(logp[i, t].item() - old[i, t].item(), -20.0), 20.0))
            unclipped, clip = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
            loss = max(unclipped, clip)
            if dual_clip and a < 0:
                loss = min(loss, -a * dual_clip)
            row_sum, row_n, clipped, ratios = row_sum + loss, row_n + 1, clipped + (clip > unclipped), ratios + r
        rows.append((row_sum, row_n))
    n = sum(k for _, k in rows)
    if agg == "token-mean":
        value = sum(s for s, _ in rows) / n
    elif agg == "seq-mean-token-mean":
        value = sum(s / max(k, 1) for s, k in rows) / B
    else:  # seq-mean-token-sum-norm
        value = sum(s for s, _ in rows) / (B * (max_len or T))
    return value, {"policy/clipfrac": clipped / n, "policy/ratio": ratios / n}


def naive_dph(logp, old, ref, adv, mask, is_pef, eta, kind, alpha, weighting, eps_low, eps_high, dual_clip, agg,
              max_len):
    """dph_loss on a whole batch from the module docstring's points 3-5: naive_ppo on the D_exp rows (none: L_exp 0,
    ratio 1, nothing clipped), the token-mean of the table's f(pi / pi_ref) on the D_pef rows, combined as
    (N_exp/N) L_exp + eta (N_pef/N) L_pef (share, N in rows) or L_exp + eta L_pef (paper)."""
    e = [i for i in range(len(is_pef)) if not is_pef[i]]
    p = [i for i in range(len(is_pef)) if is_pef[i]]
    l_exp, st = 0.0, {"policy/clipfrac": 0.0, "policy/ratio": 1.0}
    if e:
        l_exp, st = naive_ppo(logp[e], old[e], adv[e], mask[e], eps_low, eps_high, agg, max_len, dual_clip)
    fs = [f_naive(torch.tensor(math.exp(logp[i, t].item() - ref[i, t].item()), dtype=torch.float64), kind,
                  alpha).item() for i in p for t in range(logp.shape[1]) if mask[i, t]]
    l_pef = sum(fs) / len(fs) if fs else 0.0
    s_exp, s_pef = (len(e) / len(is_pef), len(p) / len(is_pef)) if weighting == "share" else (1.0, 1.0)
    loss = s_exp * l_exp + eta * s_pef * l_pef
    return loss, {**st, "loss/exp": l_exp, "policy/divergence": l_pef, "loss/policy": loss}


def _dph_toy():
    """6 rows, T = 6. D_exp rows with A = 1.5, -2, 0, 0.5 and log-ratios at 0 (r = 1: inside the clip range, the two
    PPO terms tie), inside, above and below the range, between 1 + eps_high and the dual clip, past 3 and past 4,
    +30 and -30 (clamped at +-20); two D_pef rows with log(pi / pi_ref) in [-1.2, 2] (inside forward_kl's clamps);
    rows of 2 to 6 tokens."""
    L = math.log
    logp = -0.1 - 2 * torch.rand(6, 6, generator=torch.Generator().manual_seed(11))
    logp[2, 4] = -31.0  # log-ratio -30 below: old = -1
    log_ratio = torch.tensor([[0.0, L(1.1), L(1.6), L(0.5), 30.0, 0.0],  # A = 1.5
                              [0.0] * 6,  # D_pef
                              [L(0.9), L(0.5), L(2.5), L(3.5), -30.0, L(1.2)],  # A = -2
                              [0.2, -0.3, 0.0, 0.1, 0.0, 0.0],  # A = 0
                              [0.0] * 6,  # D_pef
                              [L(1.2), L(0.7), 0.0, 0.0, 0.0, 0.0]])  # A = 0.5
    old = logp - log_ratio
    is_pef = torch.tensor([False, True, False, False, True, False])
    delta = torch.zeros(6, 6)
    delta[1], delta[4, :3] = torch.tensor([0.3, -1.2, 2.0, -0.4, 0.0, 0.7]), torch.tensor([-0.7, 1.1, 0.5])
    ref = torch.where(is_pef[:, None], logp - delta, torch.randn(6, 6))  # D_exp rows: anything, never read
    adv = torch.tensor([1.5, 0.0, -2.0, 0.0, 0.0, 0.5])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    return logp, old, ref, adv, mask, is_pef


@pytest.mark.parametrize("kind,alpha,weighting,agg,max_len,eps_low,eps_high,dual_clip,eta,rows,one_token", [
    ("js", 0.2, "share", "token-mean", None, 0.1, 0.5, 2.0, 0.3, None, False),  # asymmetric eps, dual clip 2
    ("alpha", 0.6, "paper", "seq-mean-token-mean", None, 0.2, 0.28, 3.0, 0.5, None, False),
    ("forward_kl", 0.2, "share", "seq-mean-token-sum-norm", 9, 0.3, 0.2, 0.0, 1.0, None, False),  # max_len > T
    ("js", 0.2, "share", "token-mean", None, 0.2, 0.28, 3.0, 0.4, [0, 1], True),  # 1 D_exp token, 1 D_pef token
    ("alpha", 0.3, "share", "seq-mean-token-mean", None, 0.2, 0.28, 3.0, 0.4, [2, 4], True),  # 1 D_exp row
])
def test_loss_and_every_stat_equal_the_token_by_token_reference(kind, alpha, weighting, agg, max_len, eps_low,
                                                                 eps_high, dual_clip, eta, rows, one_token):
    """dph_loss (and policy_loss on its D_exp rows): the loss and every statistic, keys and values, against
    naive_dph / naive_ppo, for every divergence, weighting and aggregation, asymmetric clips, dual-clip off, 2 and 3,
    and normalisers of a single token or row."""
    logp, old, ref, adv, mask, is_pef = _dph_toy()
    if rows is not None:
        logp, old, ref, adv, mask, is_pef = (x[rows] for x in (logp, old, ref, adv, mask, is_pef))
    if one_token:
        mask[:, 1:] = 0
    kw = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, agg=agg, max_len=max_len)
    loss, st = dph_loss(logp, old, ref, adv, mask, is_pef, eta, kind, alpha, weighting, **kw)
    expect, est = naive_dph(logp, old, ref, adv, mask, is_pef, eta, kind, alpha, weighting, **kw)
    assert loss.item() == pytest.approx(expect, rel=1e-5, abs=1e-7) and set(st) == set(est)
    for k, v in est.items():
        assert st[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    e = ~is_pef
    ppo, st_ppo = policy_loss(logp[e], old[e], adv[e], mask[e], **kw)
    expect_ppo, est_ppo = naive_ppo(logp[e], old[e], adv[e], mask[e], **kw)
    assert ppo.item() == pytest.approx(expect_ppo, rel=1e-5) and set(st_ppo) == set(est_ppo)
    for k, v in est_ppo.items():
        assert st_ppo[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert 0 < st["policy/clipfrac"] < 1 or one_token


def test_log_ratios_past_20_are_clamped_to_e20():
    """log(pi / pi_old) of +-30 and +-100 gives a ratio of exactly e^+-20, in the statistic and in the loss (the
    unclipped term for A > 0 below the range, and for A < 0 above it with dual-clip off): finite, never e^+-30."""
    old = torch.full((1, 1), -2.0)
    for log_ratio in (30.0, -30.0, 100.0, -100.0):
        r = math.exp(math.copysign(20.0, log_ratio))
        for a in (1.0, -1.0):
            loss, st = policy_loss(old + log_ratio, old, torch.tensor([a]), torch.ones(1, 1), dual_clip=0)
            assert st["policy/ratio"] == pytest.approx(r, rel=1e-6)
            assert loss.item() == pytest.approx(max(-a * r, -a * min(max(r, 0.8), 1.28)), rel=1e-6)


def test_an_infinite_dual_clip_bounds_nothing():
    """dual_clip = inf is dual-clip off (0), rows with A = 0 (groups of equal rewards) included."""
    logp, old, _, adv, mask, is_pef = _dph_toy()
    e = ~is_pef
    off, st_off = policy_loss(logp[e], old[e], adv[e], mask[e], dual_clip=0)
    inf, st_inf = policy_loss(logp[e], old[e], adv[e], mask[e], dual_clip=float("inf"))
    assert (adv[e] == 0).any() and inf.item() == off.item() and st_inf == st_off


def test_the_defaults_are_the_trainer_s():
    """Called bare (eta has no default), dph_loss and policy_loss are the method as dph_rl.py runs it with Args(): JS,
    share, clip-higher 0.2 / 0.28, dual-clip 3, token-mean; the alpha divergence without an alpha is Args().alpha's."""
    logp, old, ref, adv, mask, is_pef = _dph_toy()  # A = -2 at ratio 3.5: dual-clip 3 acts, 4 would not
    a = dph_rl.Args()
    kw = dict(eps_low=a.eps_low, eps_high=a.eps_high, dual_clip=a.dual_clip, agg=a.agg)
    bare, st = dph_loss(logp, old, ref, adv, mask, is_pef, 0.2)
    full, st_full = dph_loss(logp, old, ref, adv, mask, is_pef, 0.2, a.divergence, a.alpha, a.pef_weighting, **kw)
    assert bare.item() == full.item() and st == st_full
    for kind in KINDS:
        bare, st = dph_loss(logp, old, ref, adv, mask, is_pef, 0.2, kind)
        full, st_full = dph_loss(logp, old, ref, adv, mask, is_pef, 0.2, kind, a.alpha)
        assert bare.item() == full.item() and st == st_full, kind
    e = ~is_pef
    bare, st = policy_loss(logp[e], old[e], adv[e], mask[e])
    full, st_full = policy_loss(logp[e], old[e], adv[e], mask[e], **kw)
    assert bare.item() == full.item() and st == st_full
    assert bare.item() != policy_loss(logp[e], old[e], adv[e], mask[e], dual_clip=0)[0].item()  # not vacuous
    with pytest.raises(ValueError, match="unknown pef_weighting 'equal'"):
        dph_loss(logp, old, ref, adv, mask, is_pef, 0.2, weighting="equal")


def test_each_route_reads_only_its_own_inputs():
    """D_pef rows alone need no old log-probs or advantages: L_exp 0 and the on-policy PPO statistics (ratio 1,
    nothing clipped); D_exp rows alone need no reference log-probs: DAPO, with a divergence of 0."""
    logp, old, ref, adv, mask, is_pef = _dph_toy()
    p, e = is_pef, ~is_pef
    loss, st = dph_loss(logp[p], None, ref[p], None, mask[p], is_pef[p], 0.3, "js")
    u = torch.exp(logp[p] - ref[p]).double()[mask[p] > 0]
    l_pef = f_naive(u, "js").mean().item()
    assert loss.item() == pytest.approx(0.3 * l_pef, rel=1e-5) and set(st) == {
        "policy/clipfrac", "policy/ratio", "loss/exp", "policy/divergence", "loss/policy"}
    assert st["policy/clipfrac"] == 0.0 and st["policy/ratio"] == 1.0 and st["loss/exp"] == 0.0
    assert st["policy/divergence"] == pytest.approx(l_pef, rel=1e-5)
    assert st["loss/policy"] == pytest.approx(loss.item())
    loss, st = dph_loss(logp[e], old[e], None, adv[e], mask[e], is_pef[e], 0.3)
    dapo, st_dapo = policy_loss(logp[e], old[e], adv[e], mask[e])
    assert loss.item() == dapo.item() and st == {**st_dapo, "loss/exp": dapo.item(), "policy/divergence": 0.0,
                                                 "loss/policy": dapo.item()}
