"""dph_rl.py: the f-divergences, routing, split and PPO properties of dph_rl.md §5 on hand-computed micro-examples
and naive references, then the script itself end to end."""
import math

import pytest
import torch
from conftest import records, run_script, SMALL as BASE_SMALL

import dph_rl
from common import Example, HFSampler, Samples, collate, token_logprobs
from dph_rl import build_pef, dph_loss, f_divergence, policy_loss, split_pef

KINDS = ["js", "forward_kl", "alpha"]


def f_naive(u, kind, alpha=0.2):
    """The §3b table, written as printed (float64)."""
    if kind == "forward_kl":
        return u - 1 - torch.log(u)
    if kind == "js":
        return u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2)
    return (u ** (1 - alpha) - (1 - alpha) * u - alpha) / (alpha * (alpha - 1))


def per_token(delta, kind, alpha=0.2):
    """f at each entry of a 1-D delta (f_divergence on a [n, 1] batch, one token each)."""
    return torch.stack([f_divergence(d.reshape(1, 1), torch.zeros(1, 1, dtype=d.dtype), torch.ones(1, 1), kind, alpha)
                        for d in delta])


# ---- §5.1-5.3: zero at the reference, non-negative, gradient sign ------------------------------------------------
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


# ---- §5.4: exact expectations on a toy categorical ---------------------------------------------------------------
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


# ---- §5.5: limits -------------------------------------------------------------------------------------------------
def test_alpha_limits_and_tails():
    u = torch.linspace(0.3, 3, 28, dtype=torch.float64)
    d = torch.log(u)
    assert torch.allclose(per_token(d, "alpha", 0.999), u - 1 - d, atol=1e-3)  # -> forward KL
    assert torch.allclose(per_token(d, "alpha", 0.001), u * d - u + 1, atol=1e-3)  # -> reverse KL
    far = torch.tensor([-60.0], dtype=torch.float64)
    assert per_token(far, "js").item() == pytest.approx(math.log(2), abs=1e-12)
    assert per_token(far, "alpha", 0.2).item() == pytest.approx(1.25, abs=1e-12)
    with pytest.raises(ValueError):
        f_divergence(d.reshape(1, -1), d.reshape(1, -1), torch.ones(1, 28), "alpha", 1.0)


def test_forward_kl_clamp_zeroes_the_gradient():
    x = torch.tensor([[-12.0, -10.0, 2.5, 2.7, 25.0]], requires_grad=True)
    f_divergence(x, torch.zeros_like(x), torch.ones_like(x), "forward_kl").backward()
    assert x.grad[0, 0] == 0 and x.grad[0, 3] == 0 and x.grad[0, 4] == 0  # value clamped at 10 (or delta at 20)
    assert x.grad[0, 1] < 0 and x.grad[0, 2] > 0
    assert per_token(torch.tensor([-12.0, 30.0]), "forward_kl").tolist() == [10.0, 10.0]


# ---- §5.6: masking ------------------------------------------------------------------------------------------------
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


# ---- §5.7: per-sample routing and the combination ---------------------------------------------------------------
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
    parts = sum(dph_loss(logp[s], old[s], ref[s], adv[s], mask[s], is_pef[s], mini=(mask, is_pef), **kw)[0]
                for s in (slice(0, 1), slice(1, 2), slice(2, 5), slice(5, 6)))  # pef-only, exp-only and mixed
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5)


# ---- §5.10: PPO ---------------------------------------------------------------------------------------------------
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


# ---- §5.9 and §5.8: the split and the stored reference log-probs ---------------------------------------------------
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

    def generate(self, model, prompt_ids, n, max_new_tokens, temperature=1.0, seed=0, topk=0):
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
    monkeypatch.setattr(dph_rl, "score", lambda e, c: 1.0)  # every sample "correct": all prompts stored
    ex = [Example("countdown", f"Q:{i},2,3->6 A:", "", f"{i},2,3->6") for i in range(1, 7)]
    res = build_pef(rand_model, tok, HFSampler(tok), ex, list(range(6)), 4, 4, 8, 0.7, seed=3)
    assert len(res["ref_logp"]) == 6
    batch = collate(Samples(res["prompt_ids"], res["response_ids"], res["ref_logp"], ["stop"] * 6), tok.pad_token_id,
                    "cpu")
    with torch.no_grad():
        recomputed = token_logprobs(rand_model, batch, temperature=0.7)["logp"]
    assert torch.allclose(recomputed, batch["old_logp"], atol=1e-4)
    assert not torch.allclose(token_logprobs(rand_model, batch, temperature=1.0)["logp"], batch["old_logp"], atol=1e-2)


# ---- the script -------------------------------------------------------------------------------------------------
SMALL = BASE_SMALL + ["--pef_split_prompts", "48", "--pef_min_correct", "2"]


def test_importing_dph_rl_starts_nothing():
    assert hasattr(dph_rl, "main") and dph_rl.Args().divergence == "js" and dph_rl.Args().pef_min_correct == 8


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
    assert steps[0]["policy/divergence"] < 1e-6  # §5.8: the first update sees pi == pi_ref on the stored tokens
    assert "eval/pass@16" in steps[1] and "eval/pass@8" in steps[2] and "D_pef:" in p.stdout
    cache = tmp_path / "pef_cache.pt"
    stamp = cache.stat().st_mtime_ns
    p = run_script("dph_rl.py", "--max_steps", "4", "--eval_every", "2", "--output_dir", str(tmp_path),
                   "--resume", "true", *SMALL)
    assert p.returncode == 0 and "loaded the D_pef split" in p.stdout, p.stdout + p.stderr
    assert cache.stat().st_mtime_ns == stamp and [r["step"] for r in records(tmp_path)[2:]] == [1, 2, 3, 4]
