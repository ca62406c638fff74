"""lp_reg.py: the min-p proxy, the token selection and the loss on hand-computed micro-examples and naive references
(shared/specs/lp_reg.md §6), then the script itself for a few steps."""
import json
import math

import pytest
import torch
from conftest import run_script

import common
import grpo
import lp_reg
from lp_reg import full_proxy_kl, k3, lp_reg_loss, minp_proxy_logp, proxy_logprobs, select_tokens


def _all_tokens(logits, kappa):
    """log pi_proxy of every vocabulary entry, via the per-token interface: [N, V]."""
    N, V = logits.shape
    return torch.stack([minp_proxy_logp(logits, torch.full((N,), v), kappa) for v in range(V)], -1)


# ---- the proxy (§6.1, §6.2) ------------------------------------------------------------------------------------------
def test_proxy_sums_to_one_and_is_zero_exactly_below_the_threshold():
    torch.manual_seed(0)
    logits = torch.randn(64, 11) * 3
    p = torch.softmax(logits, -1)
    lp = _all_tokens(logits, 0.02)
    prox = lp.exp()
    below = p < 0.02 * p.amax(-1, keepdim=True)
    assert below.any() and (~below).sum(-1).min() >= 1
    assert torch.allclose(prox.sum(-1), torch.ones(64), atol=1e-5)
    assert torch.equal(prox[below], torch.zeros(int(below.sum()))) and (lp[below] <= -1e3).all()
    assert (prox[~below] > 0).all()
    ratio = torch.where(below, torch.nan, prox / p)  # 1 / Z on every kept token
    z = torch.where(below, 0.0, p).sum(-1, keepdim=True)
    assert torch.allclose(torch.nan_to_num(ratio, nan=0.0), torch.where(below, 0.0, 1 / z).expand_as(p), atol=1e-4)
    # §6.2: log pi_proxy = log p - log Z for kept sampled tokens
    assert torch.allclose(lp[~below], (torch.log(p) - torch.log(z)).expand_as(p)[~below], atol=1e-5)


def test_proxy_limits_of_kappa():
    torch.manual_seed(1)
    logits = torch.randn(8, 6)
    assert torch.equal(_all_tokens(logits, 0.0), torch.log_softmax(logits, -1))  # kappa -> 0: the policy itself
    assert torch.allclose(_all_tokens(logits, 1e-12), torch.log_softmax(logits, -1), atol=1e-6)
    one = _all_tokens(logits, 1.0).exp()  # kappa = 1: only the argmax
    assert torch.equal(one, torch.nn.functional.one_hot(logits.argmax(-1), 6).float())
    tie = _all_tokens(torch.tensor([[2.0, 2.0, 0.0]]), 1.0).exp()  # tied maxima share the mass
    assert torch.allclose(tie, torch.tensor([[0.5, 0.5, 0.0]]))


def test_proxy_logprobs_chunked_matches_full_vocab_reference_without_grad(tok, rand_model):
    samples = common.Samples([[1, 5, 6], [1, 7]] * 2, [[3, 4, 8, 9], [5, 2], [6], [7, 7, 3]], [[0.0] * 4, [0.0] * 2,
                             [0.0], [0.0] * 3], ["stop"] * 4)
    batch = common.collate(samples, tok.pad_token_id, "cpu")
    ids_before = batch["input_ids"].clone()
    out = proxy_logprobs(rand_model, batch, temperature=0.7, kappa=0.05, chunk_size=3)["proxy_logp"]  # [B, T]
    assert not out.requires_grad and torch.equal(batch["input_ids"], ids_before)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = rand_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    T = batch["mask"].shape[1]
    logits = logits[:, -T - 1: -1].float() / 0.7  # [B, T, V]: positions predicting the response tokens
    ref = minp_proxy_logp(logits.reshape(-1, logits.shape[-1]), batch["response_ids"].reshape(-1), 0.05)
    ref = ref.reshape(out.shape) * batch["mask"]
    assert torch.allclose(out, ref, atol=1e-4) and (out[batch["mask"] == 0] == 0).all()
    full = proxy_logprobs(rand_model, batch, 0.7, 0.05, chunk_size=512, full_k=5)
    assert torch.allclose(full["proxy_logp"], out, atol=1e-5) and full["proxy_ids"].shape == (4, T, 5)


# ---- selection (§6.3, §6.9) ---------------------------------------------------------------------------------------
def _sel_toy():
    # 3 sequences x 4 tokens; sequence 1 has positive advantage, sequence 2 has 3 real tokens
    logp = torch.log(torch.tensor([[0.9, 0.05, 0.5, 0.2], [0.01, 0.02, 0.9, 0.9], [0.3, 0.1, 0.6, 0.001]]))
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    adv = torch.tensor([-1.0, 2.0, -0.5])
    return logp, adv, mask


def test_select_takes_lowest_negative_valid_tokens():
    logp, adv, mask = _sel_toy()
    # 7 negative valid tokens; rho 0.3 -> k = floor(2.1) = 2: the two lowest are 0.05 and 0.1 (not the positive
    # sequence's 0.01 / 0.02, not the padded 0.001)
    sel = select_tokens(logp, adv, mask, rho=0.3)
    expect = torch.zeros(3, 4, dtype=torch.bool)
    expect[0, 1] = expect[2, 1] = True
    assert torch.equal(sel, expect)
    assert select_tokens(logp, adv, mask, rho=0.45).sum() == 3  # floor(3.15) = 3: adds 0.2
    assert not select_tokens(logp, adv, mask, rho=0.2).any()  # k = floor(1.4) = 1 <= 1: nothing (A6)
    assert not select_tokens(logp, torch.tensor([0.0, 1.0, 0.0]), mask, rho=1.0).any()  # A = 0 is not negative
    assert torch.equal(select_tokens(logp, adv * 7.3, mask, 0.3), sel)  # §6.9: invariant to advantage scale


def test_mask_skips_noise_and_tokens_already_above_the_proxy():
    logp, adv, mask = _sel_toy()
    proxy = logp - 0.1  # everything already above the proxy
    proxy[0, 1] = -1e4  # the lowest selected token is noise
    proxy[2, 1] = logp[2, 1] + 0.2  # the other one sits below its proxy: the only regularized token
    _, st = lp_reg_loss(logp, logp, proxy, adv, mask, rho=0.45)
    assert st["policy/lp_candidates"] == 3 and st["policy/lp_selected"] == 1
    _, st = lp_reg_loss(logp, logp, logp + 0.1, adv, mask, rho=0.2)
    assert st["policy/lp_selected"] == 0  # k <= 1


# ---- the loss (§6.4 - §6.7) ---------------------------------------------------------------------------------------
def _loss_toy(seed=0):
    torch.manual_seed(seed)
    B, T = 6, 50
    old = torch.log_softmax(torch.randn(B, T, 5), -1)[..., 0]
    logp = old + 0.3 * torch.randn(B, T)
    proxy = old + torch.rand(B, T) * 0.5  # pi_proxy >= pi_old (Z <= 1)
    proxy[:, ::7] = -1e4  # some noise tokens
    mask = (torch.rand(B, T) > 0.2).float()
    adv = torch.tensor([-1.0, 0.5, -2.0, 1.0, -0.3, 0.8])
    return logp, old, proxy, adv, mask


def _grads(fn, logp):
    x = logp.clone().requires_grad_(True)
    loss, st = fn(x)
    loss.backward()
    return loss.detach(), x.grad, st


@pytest.mark.parametrize("case", ["beta0", "adv_nonneg", "nothing_filtered"])
def test_equals_grpo_with_clip_range_0_10(case):
    logp, old, proxy, adv, mask = _loss_toy()
    beta = 1.0
    if case == "beta0":
        beta = 0.0
    elif case == "adv_nonneg":
        adv = adv.abs()
    else:  # on-policy with Z = 1: pi_proxy = pi_old = pi_theta
        logp, proxy = old.clone(), old.clone()
    l1, g1, st = _grads(lambda x: lp_reg_loss(x, old, proxy, adv, mask, rho=0.05, beta=beta), logp)
    l0, g0, _ = _grads(lambda x: grpo.policy_loss(x, old, adv, mask, eps_low=1.0, eps_high=9.0), logp)
    assert l1.item() == pytest.approx(l0.item(), abs=1e-7) and torch.allclose(g1, g0, atol=1e-8)
    if case == "beta0":
        assert st["policy/lp_selected"] > 0  # the selection happened; the unclipped PG equals the clipped one for A<0


def test_per_token_gradient_formula_and_token_mean_scale():
    logp, old, proxy, adv, mask = _loss_toy(1)
    beta = 0.7
    proxy = torch.where(proxy > -1e3, logp + torch.rand_like(logp) * 4.0, proxy)  # some d beyond the clamp at 2.61
    _, g, st = _grads(lambda x: lp_reg_loss(x, old, proxy, adv, mask, rho=0.2, beta=beta), logp)
    _, g0, _ = _grads(lambda x: grpo.policy_loss(x, old, adv, mask, eps_low=1.0, eps_high=9.0), logp)
    sel = select_tokens(logp, adv, mask, 0.2) & (logp < proxy)
    assert st["policy/lp_selected"] == sel.sum() > 5
    n = mask.sum()
    ratio = torch.exp(logp - old)
    d = proxy - logp
    a = adv[:, None].expand_as(logp)
    reg = torch.where(d < 2.6109, beta * (1 - torch.exp(d)), 0.0)  # §6.6: the k3 clamp stops the gradient
    expect = torch.where(sel, (-a * ratio + reg) / n, g0)  # §6.5 and §6.7: divided by all valid tokens, not |S|
    assert torch.allclose(g, expect, atol=1e-7)
    assert (sel & (d > 2.62)).any() and (sel & (d < 2.6)).any()


def test_k3_is_nonnegative_and_zero_only_at_equality():
    lp = torch.linspace(-8, 0, 50)
    prox = torch.linspace(-5, -0.1, 50).flip(0)
    v = k3(lp[:, None], prox[None, :])
    assert (v >= 0).all() and torch.isfinite(v).all()
    assert torch.equal(k3(lp, lp), torch.zeros(50))
    assert torch.isfinite(k3(torch.tensor([-100.0]), torch.tensor([0.0]))).all()  # capped: no overflow


def test_sampled_k3_expected_gradient_is_the_forward_kl_gradient():
    """§6.8: E_{o ~ pi_theta}[grad_z k3(o)] = pi_theta - pi_proxy (exact enumeration over a 6-token vocabulary)."""
    z = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0, -4.5], dtype=torch.float64)
    pi = torch.softmax(z, -1)
    prox_lp = _all_tokens(z[None], 0.02)[0]
    assert (prox_lp < -1e3).sum() == 2  # two noise tokens
    expect = torch.zeros(6, dtype=torch.float64)
    for o in range(6):
        zz = z.clone().requires_grad_(True)
        k3(torch.log_softmax(zz, -1)[o], prox_lp[o]).backward()
        expect += pi[o] * zz.grad
    assert torch.allclose(expect, pi - prox_lp.exp(), atol=1e-12)


def test_full_vocab_kl_gradient():
    z = torch.tensor([[1.5, 0.2, -0.4, -4.0, 0.9]], requires_grad=True)
    ids, prox = lp_reg.minp_proxy_topk(z.detach(), 0.02, 5)
    kl = full_proxy_kl(torch.log_softmax(z, -1).gather(-1, ids), prox)
    kl.sum().backward()
    pp = _all_tokens(z.detach(), 0.02).exp()
    ref = (pp * (torch.log(pp.clamp(min=1e-30)) - torch.log_softmax(z.detach(), -1))).sum()
    assert kl.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(z.grad, torch.softmax(z.detach(), -1) - pp, atol=1e-6)


def test_mini_batch_selection_accumulates_over_micro_batches():
    logp, old, proxy, adv, mask = _loss_toy(2)
    whole, _ = lp_reg_loss(logp, old, proxy, adv, mask, rho=0.1)
    sel = select_tokens(logp, adv, mask, 0.1)
    parts = sum(lp_reg_loss(logp[s], old[s], proxy[s], adv[s], mask[s], select=sel[s])[0]
                * grpo.micro_weight(mask[s], mask, "token-mean") for s in (slice(0, 2), slice(2, 6)))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


# ---- the script ---------------------------------------------------------------------------------------------------
def test_importing_lp_reg_starts_nothing():
    a = lp_reg.Args()
    assert hasattr(lp_reg, "main") and a.model == "tiny" and a.output_dir == "runs/lp_reg"
    assert (a.kappa, a.rho, a.lp_beta, a.eps_low, a.eps_high, a.beta) == (0.02, 0.01, 1.0, 1.0, 9.0, 0.0)


def test_lp_reg_smoke(tiny_cache, tmp_path):
    p = run_script("lp_reg.py", "--max_steps", "3", "--eval_every", "0", "--output_dir", str(tmp_path),
                   "--rho", "0.1", "--micro_batch_size", "8", *grpo_small())
    assert p.returncode == 0, p.stdout + p.stderr
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = recs[1:]
    assert recs[0]["args"]["rho"] == 0.1 and [r["step"] for r in steps] == [1, 2, 3]
    for k in ["reward/mean", "loss/policy", "policy/entropy", "policy/lp_selected", "policy/lp_candidates",
              "policy/proxy_kept", "policy/clipfrac"]:
        assert all(math.isfinite(r[k]) for r in steps), k
    assert all(r["policy/lp_selected"] <= r["policy/lp_candidates"] for r in steps)
    assert any(r["policy/lp_candidates"] > 0 for r in steps)
    assert "eval/pass@16" in steps[-1] and "|S|" in p.stdout + p.stderr


def grpo_small():
    return ["--prompts_per_step", "4", "--group_size", "4", "--eval_prompts", "8", "--eval_samples", "16",
            "--log_examples_every", "1"]
