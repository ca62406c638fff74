"""lp_reg.py: the min-p proxy (arXiv 2510.03222 Eq. 5), the token selection and the loss (Eq. 6, in the official
code's form compute_policy_loss_lp_reg) on hand-computed micro-examples and naive references, then the script itself:
a few steps, and 2 ranks against 1 process."""
import json
import math

import pytest
import torch
from conftest import TORCHRUN, assert_same_as_one_process, one_process_run_of, records, run_script

import common
import grpo
import lp_reg
from lp_reg import full_proxy_kl, k3, lp_reg_loss, micro_weight, minp_proxy_logp, proxy_logprobs, select_tokens


def _all_tokens(logits, kappa):
    """log pi_proxy of every vocabulary entry, via the per-token interface: [N, V]."""
    N, V = logits.shape
    return torch.stack([minp_proxy_logp(logits, torch.full((N,), v), kappa) for v in range(V)], -1)


# ---- the proxy (Eq. 5) -----------------------------------------------------------------------------------------------
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
    # log pi_proxy = log p - log Z for kept sampled tokens
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


def test_proxy_logprobs_chunked_and_micro_batched_matches_full_vocab_reference_without_grad(tok, rand_model):
    samples = common.Samples([[1, 5, 6], [1, 7]] * 2, [[3, 4, 8, 9], [5, 2], [6], [7, 7, 3]], [[0.0] * 4, [0.0] * 2,
                             [0.0], [0.0] * 3], ["stop"] * 4)
    batch = common.collate(samples, tok.pad_token_id, "cpu")
    ids_before = batch["input_ids"].clone()
    out = proxy_logprobs(rand_model, batch, temperature=0.7, kappa=0.05, chunk_size=3)["proxy_logp"]  # [B, T]
    per_row = proxy_logprobs(rand_model, batch, 1, temperature=0.7, kappa=0.05, chunk_size=3)["proxy_logp"]
    assert torch.allclose(per_row, out, atol=1e-5)  # --micro_batch_size rows per forward: the same values
    assert not out.requires_grad and torch.equal(batch["input_ids"], ids_before)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = rand_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    T = batch["mask"].shape[1]
    logits = logits[:, -T - 1: -1].float() / 0.7  # [B, T, V]: positions predicting the response tokens
    ref = minp_proxy_logp(logits.reshape(-1, logits.shape[-1]), batch["response_ids"].reshape(-1), 0.05)
    ref = ref.reshape(out.shape) * batch["mask"]
    assert torch.allclose(out, ref, atol=1e-4) and (out[batch["mask"] == 0] == 0).all()
    full = proxy_logprobs(rand_model, batch, 3, 0.7, 0.05, chunk_size=512, full_k=5)
    assert torch.allclose(full["proxy_logp"], out, atol=1e-5) and full["proxy_ids"].shape == (4, T, 5)


# ---- selection -------------------------------------------------------------------------------------------------------
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
    assert not select_tokens(logp, adv, mask, rho=0.2).any()  # k = floor(1.4) = 1 <= 1: nothing (the code's rule)
    assert not select_tokens(logp, torch.tensor([0.0, 1.0, 0.0]), mask, rho=1.0).any()  # A = 0 is not negative
    assert torch.equal(select_tokens(logp, adv * 7.3, mask, 0.3), sel)  # invariant to the advantage scale


def test_tokens_tied_with_the_kth_smallest_are_all_selected():
    """A tie is the same token after the same prefix in two samples of a group: all of them or none, so that S does
    not depend on the order rows come in (the code's topk would take an arbitrary one)."""
    logp = torch.tensor([[-5.0, -3.0, -1.0], [-3.0, -0.5, -0.2], [-3.0, -0.1, -2.0]])
    adv, mask = -torch.ones(3), torch.ones(3, 3)
    sel = select_tokens(logp, adv, mask, rho=0.25)  # k = floor(2.25) = 2: -5 and the three -3
    assert torch.equal(sel, logp <= -3.0) and sel.sum() == 4
    assert torch.equal(select_tokens(logp, adv, mask, rho=0.25, across_ranks=True), sel)  # one process: the same


def test_selection_across_ranks_is_the_selection_over_the_whole_mini_batch(monkeypatch):
    """Each rank's share of a mini-batch, with N summed and the k smallest gathered over the ranks (faked here for
    rank 0 of 2), selects exactly the whole mini-batch's S on its rows; per rank it would not."""
    torch.manual_seed(3)
    logp = torch.log(torch.rand(8, 20))
    logp[:4] -= 2.0  # rank 0 holds most of the lowest tokens
    mask = (torch.rand(8, 20) > 0.3).float()
    adv = torch.tensor([-1.0, 0.5, -0.3, -2.0, -1.0, 1.0, -0.7, -0.2])
    whole = select_tokens(logp, adv, mask, rho=0.1)
    mine, other = slice(0, 4), slice(4, 8)
    k = int(0.1 * ((mask > 0) & (adv[:, None] < 0)).sum().item())
    other_neg = ((mask[other] > 0) & (adv[other, None] < 0)).sum()
    other_low = logp[other].masked_fill(~((mask[other] > 0) & (adv[other, None] < 0)), float("inf")).reshape(-1)
    other_low = other_low.topk(k, largest=False).values  # what rank 1 sends
    monkeypatch.setattr(lp_reg, "all_ranks_sum", lambda x: x + other_neg)
    monkeypatch.setattr(lp_reg, "all_ranks_cat", lambda x: torch.cat([x, other_low]))
    assert k >= 2 and whole[mine].sum() > 0
    assert torch.equal(select_tokens(logp[mine], adv[mine], mask[mine], 0.1, across_ranks=True), whole[mine])
    assert not torch.equal(select_tokens(logp[mine], adv[mine], mask[mine], 0.1), whole[mine])  # per rank: other S


def test_mask_skips_noise_and_tokens_already_above_the_proxy():
    logp, adv, mask = _sel_toy()
    proxy = logp - 0.1  # everything already above the proxy
    proxy[0, 1] = -1e4  # the lowest selected token is noise
    proxy[2, 1] = logp[2, 1] + 0.2  # the other one sits below its proxy: the only regularized token
    _, st = lp_reg_loss(logp, logp, proxy, adv, mask, rho=0.45)
    assert st["policy/lp_candidates"] == 3 and st["policy/lp_selected"] == 1
    _, st = lp_reg_loss(logp, logp, logp + 0.1, adv, mask, rho=0.2)
    assert st["policy/lp_selected"] == 0  # k <= 1


# ---- the loss --------------------------------------------------------------------------------------------------------
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
    reg = torch.where(d < 2.6109, beta * (1 - torch.exp(d)), 0.0)  # the k3 clamp at 10 stops the gradient
    expect = torch.where(sel, (-a * ratio + reg) / n, g0)  # divided by all valid tokens (Eq. 6), not by |S|
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
    """E_{o ~ pi_theta}[grad_z k3(o)] = pi_theta - pi_proxy, the gradient of Eq. 6's forward KL(pi_proxy || pi_theta):
    the code's sampled k3 is the paper's KL in expectation (exact enumeration over a 6-token vocabulary)."""
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
                * micro_weight(mask[s], mask, "token-mean") for s in (slice(0, 2), slice(2, 6)))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


# ---- the script ------------------------------------------------------------------------------------------------------
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


# Settings where Lp-Reg acts on both ranks at every step: the 32 responses hold ~60 negative-advantage tokens, so rho
# 0.3 gives k ~ 15 (the default 1% gives k <= 1: plain GRPO); temperature 1.6 makes response lengths differ by rank
MULTI = ["--group_size", "4", "--prompts_per_step", "8", "--temperature", "1.6", "--rho", "0.3", "--seed", "1",
         "--max_steps", "3", "--eval_every", "0", "--eval_prompts", "8", "--eval_samples", "2"]


@pytest.fixture(scope="module")
def one_process_run(tiny_cache, tmp_path_factory):
    return one_process_run_of(tmp_path_factory, "lp_reg.py", *MULTI, "--micro_batch_size", "3")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_compute_what_one_process_does(one_process_run, tmp_path, mode):
    """2 gloo ranks (DDP, or FSDP2 shards) against 1 process on the same rows: the same rewards, |S|, gradient norms
    and weights. S is the rho lowest negative tokens of the whole mini-batch, which spans both ranks: its size k and
    its threshold must come from every rank's tokens (per rank, each would take its own k and threshold). DDP runs
    micro-batches of 3 (S from the no-grad selection pass), FSDP none (S chosen inside the loss)."""
    extra = ["--fsdp", "true", "--micro_batch_size", "0"] if mode == "fsdp" else ["--micro_batch_size", "3"]
    p = run_script(*TORCHRUN, "lp_reg.py", *MULTI, *extra,
                   "--output_dir", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = records(one_process_run)[1:], records(tmp_path)[1:]
    assert [r["step"] for r in two] == [1, 2, 3]
    assert len({r["response/len"] for r in one}) > 1 and any(r["perf/grad_norm"] > 0.1 for r in one)  # a real test
    assert all(r["policy/lp_selected"] >= 2 and r["policy/lp_active_ranks"] == 1.0 for r in two)  # S on both ranks
    assert_same_as_one_process(one_process_run, tmp_path,  # the same rollouts and the same S
                               ["reward/mean", "response/len", "policy/lp_candidates", "policy/lp_selected"])


def grpo_small():
    return ["--prompts_per_step", "4", "--group_size", "4", "--eval_prompts", "8", "--eval_samples", "16",
            "--log_examples_every", "1"]


# ---- gaps mutation testing found (python tests/mutation.py lp_reg.lp_reg_loss) -----------------------------------
def naive_lp_reg(logp, old, proxy, adv, mask, sel, beta, clip_low, clip_high, ref=None, ref_beta=0.0, full_kl=None):
    """lp_reg_loss written token by token from its definition, with every statistic: an independent reference."""
    tot, n, clipped, ratios, sel_kl, n_sel, ref_kl = 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0
    for i in range(logp.shape[0]):
        a = adv[i].item()
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            lp, o, px = logp[i, t].item(), old[i, t].item(), proxy[i, t].item()
            r = math.exp(min(max(lp - o, -20.0), 20.0))
            if sel[i, t] and lp < px:  # Eq. 6 on S: unclipped PG + beta * KL (k3 capped at 10)
                d = min(px - lp, 20.0)
                kl = full_kl[i, t].item() if full_kl is not None else min(math.exp(d) - d - 1, 10.0)
                loss, n_sel, sel_kl = -a * r + beta * kl, n_sel + 1, sel_kl + kl
            else:  # PPO with range [1 - clip_low, 1 + clip_high]
                c = -a * min(max(r, 1 - clip_low), 1 + clip_high)
                loss, clipped = max(-a * r, c), clipped + (c > -a * r)
            if ref is not None and ref_beta > 0:
                d = min(max(ref[i, t].item() - lp, -20.0), 20.0)
                loss, ref_kl = loss + ref_beta * (math.exp(d) - d - 1), ref_kl + math.exp(d) - d - 1
            tot, n, ratios = tot + loss, n + 1, ratios + r
    st = {"policy/clipfrac": clipped / n, "policy/ratio": ratios / n, "policy/lp_selected": n_sel,
          "policy/lp_kl": sel_kl / max(n_sel, 1)}
    if ref is not None and ref_beta > 0:
        st["policy/kl"] = ref_kl / n
    return tot / n, st


def _extreme_toy(seed=4):
    """Ratios beyond e^+-20, between 1 + clip_high and 10, below 1 - clip_low; proxies far above (k3 past its cap),
    equal to (not below: not regularized) and below the current log-prob; enough negative tokens for rho."""
    logp, old, proxy, adv, mask = _loss_toy(seed)
    logp[0, :4] = old[0, :4] + torch.tensor([30.0, -30.0, math.log(1.5), math.log(0.5)])
    logp[3, :3] = old[3, :3] + torch.tensor([30.0, math.log(1.5), math.log(12.0)])  # adv +1
    proxy[0, 4], proxy[2, :3] = logp[0, 4] + 15.0, logp[2, :3]  # k3 beyond 10; exactly at the proxy
    mask[:, :5] = 1.0
    return logp, old, proxy, adv, mask


@pytest.mark.parametrize("clip_low,clip_high,beta,ref_beta", [(1.0, 9.0, 1.0, 0.0), (0.2, 0.28, 0.7, 0.3)])
def test_loss_and_every_stat_equal_the_token_by_token_reference(clip_low, clip_high, beta, ref_beta):
    logp, old, proxy, adv, mask = _extreme_toy()
    ref = old + 0.4 * torch.randn_like(old)
    sel = select_tokens(logp, adv, mask, 0.3)
    loss, st = lp_reg_loss(logp, old, proxy, adv, mask, rho=0.3, beta=beta, clip_low=clip_low, clip_high=clip_high,
                           ref_logp=ref, ref_beta=ref_beta)
    expect, est = naive_lp_reg(logp, old, proxy, adv, mask, sel, beta, clip_low, clip_high, ref, ref_beta)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert st["policy/lp_candidates"] == sel.sum().item() > est["policy/lp_selected"] > 3
    for k, v in est.items():
        assert st[k] == pytest.approx(v, rel=1e-5), k
    assert math.isfinite(loss.item()) and "policy/kl" in st if ref_beta else "policy/kl" not in st


def test_a_given_full_kl_replaces_k3_on_the_selected_tokens():
    logp, old, proxy, adv, mask = _extreme_toy()
    full = torch.rand_like(logp) * 3
    sel = select_tokens(logp, adv, mask, 0.3)
    loss, st = lp_reg_loss(logp, old, proxy, adv, mask, rho=0.3, beta=0.5, full_kl=full)
    expect, est = naive_lp_reg(logp, old, proxy, adv, mask, sel, 0.5, 1.0, 9.0, full_kl=full)
    assert loss.item() == pytest.approx(expect, rel=1e-5) and st["policy/lp_kl"] == pytest.approx(est["policy/lp_kl"])


def test_the_defaults_are_the_trainer_s():
    """Called bare, lp_reg_loss is the method as lp_reg.py runs it (rho 1%, beta 1, clip range [0, 10], no KL to a
    reference even when one is passed, selection over this process's rows)."""
    logp, old, proxy, adv, mask = _loss_toy(2)
    logp, old, proxy, adv, mask = (torch.cat([x] * 8) for x in (logp, old, proxy, adv, mask))  # ~1,000 negatives
    logp[3, 0] = old[3, 0] + math.log(12.0)  # a ratio past 10 with A > 0
    a = lp_reg.Args()
    bare, st = lp_reg_loss(logp, old, proxy, adv, mask, ref_logp=old - 1.0)
    full, st_full = lp_reg_loss(logp, old, proxy, adv, mask, rho=a.rho, beta=a.lp_beta, clip_low=a.eps_low,
                                clip_high=a.eps_high, ref_beta=0.0, across_ranks=False)
    assert st["policy/lp_selected"] >= 2 and "policy/kl" not in st
    assert bare.item() == full.item() and st == st_full


def test_across_ranks_selects_over_the_whole_mini_batch(monkeypatch):
    """lp_reg_loss(across_ranks=True) passes the flag on to the selection (faked second rank, as above)."""
    logp, old, proxy, adv, mask = _loss_toy(5)
    other_neg, other_low = torch.tensor(400), torch.full((64,), -50.0)  # rank 1: many negatives, all lower
    monkeypatch.setattr(lp_reg, "all_ranks_sum", lambda x: x + other_neg)
    monkeypatch.setattr(lp_reg, "all_ranks_cat", lambda x: torch.cat([x, other_low]))
    _, alone = lp_reg_loss(logp, old, proxy, adv, mask, rho=0.05)
    _, both = lp_reg_loss(logp, old, proxy, adv, mask, rho=0.05, across_ranks=True)
    assert alone["policy/lp_candidates"] > 0 and both["policy/lp_candidates"] == 0  # rank 1 holds the k lowest


def test_full_proxy_kl_sums_over_the_top_k_only():
    torch.manual_seed(6)
    B, T, K = 2, 3, 4
    proxy = torch.log_softmax(torch.randn(B, T, K), -1)
    proxy[0, 0, 3] = -1e4  # a filtered slot contributes nothing
    theta = torch.log_softmax(torch.randn(B, T, K), -1)
    expect = torch.tensor([[sum(math.exp(proxy[b, t, k]) * (proxy[b, t, k] - theta[b, t, k]) for k in range(K))
                            for t in range(T)] for b in range(B)])
    assert torch.allclose(full_proxy_kl(theta, proxy), expect, atol=1e-6)


# ---- gaps mutation testing found (python tests/mutation.py lp_reg.select_tokens dppo.trust_region_mask) ----
import threading  # noqa: E402
from fractions import Fraction  # noqa: E402


def naive_select(parts, rho):
    """select_tokens' docstring in plain Python over a mini-batch given as rank parts [(logp, adv, mask), ...]: the N
    valid tokens with A < 0, k = floor(rho * N) in exact arithmetic (rho as the decimal written), nothing if k <= 1,
    else every one of them whose logp is <= the k-th smallest (ties all in). One [B, T] bool per part."""
    neg = [(p, i, t) for p, (lp, a, m) in enumerate(parts) for i in range(lp.shape[0]) for t in range(lp.shape[1])
           if m[i, t] > 0 and a[i] < 0]
    k = math.floor(Fraction(str(rho)) * len(neg))
    out = [torch.zeros(lp.shape, dtype=torch.bool) for lp, _, _ in parts]
    if k <= 1:
        return out
    kth = sorted(parts[p][0][i, t].item() for p, i, t in neg)[k - 1]
    for p, i, t in neg:
        out[p][i, t] = parts[p][0][i, t].item() <= kth
    return out


def _n_neg_toy(n_rows, seed):
    """n_rows rows of 10 valid negative-advantage tokens (N = 10 * n_rows), plus rows that must not count: a padded
    negative row, a positive one and an A = 0 one (all with lower log-probs than any negative token)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(n_rows + 3, 10, generator=g))
    logp[n_rows:] -= 50.0
    mask = torch.ones(n_rows + 3, 10)
    mask[n_rows] = 0.0
    adv = torch.cat([-torch.rand(n_rows, generator=g) - 0.1, torch.tensor([-1.0, 1.0, 0.0])])
    return logp, adv, mask


@pytest.mark.parametrize("rho", [0.02, 0.019, 0.29, 0.5, 0.57, 1.0])
def test_select_is_the_naive_rule_where_rho_times_n_is_a_whole_number(rho):
    """N = 100: rho * N is a whole number in exact arithmetic (0.29 * 100 and 0.57 * 100 fall just below it in
    floats), so k is exactly rho * 100 (and 1.9 -> k = 1: nothing)."""
    logp, adv, mask = _n_neg_toy(10, 11)
    sel = select_tokens(logp, adv, mask, rho)
    (expect,) = naive_select([(logp, adv, mask)], rho)
    assert torch.equal(sel, expect)
    assert sel.sum() == (round(rho * 100) if rho * 100 >= 2 else 0)


def test_select_defaults_are_the_trainer_s_and_one_process_consults_no_other_rank(monkeypatch):
    """Called bare, select_tokens is the trainer's rule (rho = Args().rho, over this batch only): 1% of N = 300 is
    k = 3. Without across_ranks the other ranks are not consulted, even under torchrun (faked: a second rank with
    many lower tokens that would take all of S)."""
    logp, adv, mask = _n_neg_toy(30, 12)
    bare = select_tokens(logp, adv, mask)
    (expect,) = naive_select([(logp, adv, mask)], lp_reg.Args().rho)
    assert bare.sum() == 3 and torch.equal(bare, expect)
    assert torch.equal(select_tokens(logp, adv, mask, rho=lp_reg.Args().rho, across_ranks=False), expect)
    monkeypatch.setattr(lp_reg, "all_ranks_sum", lambda x: x + 1000)
    monkeypatch.setattr(lp_reg, "all_ranks_cat", lambda x: torch.cat([x, torch.full((x.numel(),), -1e3)]))
    assert torch.equal(select_tokens(logp, adv, mask), expect)
    (expect,) = naive_select([(logp, adv, mask)], 0.1)
    assert torch.equal(select_tokens(logp, adv, mask, 0.1, across_ranks=False), expect)
    assert not select_tokens(logp, adv, mask, 0.1, across_ranks=True).any()  # control: the fake rank does act


def _on_two_ranks(monkeypatch, parts, rho):
    """select_tokens(across_ranks=True) run by 2 ranks at once (2 threads), with all_ranks_sum / all_ranks_cat faked
    as the collectives: every rank must hand in the same shape (all_gather's rule), summed / concatenated in rank
    order."""
    barrier, slots, me = threading.Barrier(2, timeout=20), [None, None], threading.local()

    def gather(x):
        slots[me.rank] = x
        barrier.wait()
        got = list(slots)
        barrier.wait()
        assert got[0].shape == got[1].shape, "the ranks hand all_gather different shapes"
        return got

    monkeypatch.setattr(lp_reg, "all_ranks_sum", lambda x: sum(gather(x)))
    monkeypatch.setattr(lp_reg, "all_ranks_cat", lambda x: torch.cat(gather(x)))
    out, errors = [None, None], []

    def run(rank):
        me.rank = rank
        try:
            out[rank] = select_tokens(*parts[rank], rho, across_ranks=True)
        except BaseException as e:  # noqa: BLE001  re-raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_two_ranks_select_the_whole_mini_batch_s_even_when_one_holds_fewer_than_k_tokens(monkeypatch, shift):
    """Rank 0 holds one row (10 tokens, fewer than k = 24) with some of the lowest tokens, rank 1 the rest: each
    rank's S is the naive S of the whole mini-batch on its rows. S depends only on the order of the log-probs, so
    adding a constant to all of them (shift) changes nothing."""
    logp, adv, mask = _n_neg_toy(27, 13)
    logp[0, :4] -= 3.0
    logp = logp + shift
    parts = [(logp[:1], adv[:1], mask[:1]), (logp[1:], adv[1:], mask[1:])]
    expect = naive_select(parts, 0.09)  # N = 270: k = floor(24.3) = 24
    got = _on_two_ranks(monkeypatch, parts, 0.09)
    assert expect[0].sum() > 0 and expect[0].sum() + expect[1].sum() == 24
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_reference_kl_and_aggregation_on_a_plain_batch():
    """The k3 KL to the reference on ordinary log-ratios (in the extreme toy an e^20 term hides it), and the
    aggregation's max_len reaching Dr. GRPO's constant normaliser."""
    logp, old, proxy, adv, mask = _loss_toy(3)
    ref = old + 0.4 * torch.randn_like(old)
    sel = select_tokens(logp, adv, mask, 0.3)
    loss, st = lp_reg_loss(logp, old, proxy, adv, mask, rho=0.3, beta=0.7, ref_logp=ref, ref_beta=0.3)
    expect, est = naive_lp_reg(logp, old, proxy, adv, mask, sel, 0.7, 1.0, 9.0, ref, 0.3)
    assert loss.item() == pytest.approx(expect, rel=1e-5) and st["policy/kl"] == pytest.approx(est["policy/kl"])
    tm, _ = lp_reg_loss(logp, old, proxy, adv, mask, rho=0.3, beta=0.7)
    norm, _ = lp_reg_loss(logp, old, proxy, adv, mask, rho=0.3, beta=0.7, agg="seq-mean-token-sum-norm", max_len=80)
    assert norm.item() == pytest.approx(tm.item() * mask.sum().item() / (mask.shape[0] * 80), rel=1e-5)


def test_no_gradient_past_the_log_ratio_cap():
    """A > 0, ratio e^-30 (unclipped in Lp-Reg's [0, 10] range): the log-ratio is capped at -20, so the token's
    gradient is exactly 0, as past +20."""
    old, mask, adv = torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([1.0])
    logp = torch.tensor([[-30.0, -20.5, 30.0]], requires_grad=True)
    loss, _ = lp_reg_loss(logp, old, torch.full((1, 3), -1e4), adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx((-math.exp(-20) - math.exp(-20) - 10.0) / 3, rel=1e-6)
    assert torch.equal(logp.grad, torch.zeros(1, 3))


def test_regularised_tokens_are_response_tokens_strictly_below_the_proxy():
    """Of a given selection, only response tokens (mask 1) with log pi < log pi_proxy are regularised (Eq. 6 needs
    pi_proxy > pi_theta); a token exactly at its proxy, or off the response, is not counted."""
    logp = torch.tensor([[-3.0, -3.0, -3.0, -3.0]])
    proxy = torch.tensor([[-2.0, -3.0, -2.0, -4.0]])  # below, tied, below but padding, above
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    everything = torch.ones(1, 4, dtype=torch.bool)
    _, st = lp_reg_loss(logp, logp.clone(), proxy, torch.tensor([-1.0]), mask, select=everything)
    assert st["policy/lp_selected"] == 1 and st["policy/lp_candidates"] == 4


def test_proxy_default_kappa_float32_math_and_exact_when_nothing_is_filtered():
    """kappa defaults to the paper's 0.02; bf16 logits are upcast before the softmax (float32 out); a row with nothing
    filtered returns log p itself, bit for bit, not log p - log Z with Z rounded near 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 3
    seed = 0  # a near-uniform row (nothing filtered) whose logsumexp of log-softmax rounds away from 0
    while torch.log_softmax(row := 0.01 * torch.randn(40, generator=torch.Generator().manual_seed(seed)), -1) \
            .logsumexp(-1) == 0:
        seed += 1
    logits[1] = row
    tokens = torch.tensor([5, 7, 9])
    got = minp_proxy_logp(logits, tokens)
    assert torch.equal(got, minp_proxy_logp(logits, tokens, 0.02))
    assert got[1] == torch.log_softmax(logits, -1)[1, 7]  # exactly
    half = minp_proxy_logp(logits.bfloat16(), tokens)
    assert half.dtype == torch.float32
    assert torch.equal(half, minp_proxy_logp(logits.bfloat16().float(), tokens))


def test_proxy_top_k_keeps_ties_and_kappa_0_keeps_all():
    """The full-KL proxy: kappa = 0 keeps every one of the top k (renormalised over them); ties with kappa * max p
    are kept (>=, as apply_min_p): kappa = 1 on a flat row keeps all k."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=g)
    ids, lp = lp_reg.minp_proxy_topk(logits, 0.0, 5)
    top = torch.log_softmax(logits, -1).topk(5, -1)
    assert torch.equal(ids, top.indices)
    assert torch.allclose(lp, top.values - top.values.logsumexp(-1, keepdim=True))
    ids, lp = lp_reg.minp_proxy_topk(torch.zeros(2, 30), 1.0, 4)
    assert torch.allclose(lp, torch.full((2, 4), -math.log(4)))
    half_ids, half = lp_reg.minp_proxy_topk(logits.bfloat16(), 0.02, 5)
    assert half.dtype == torch.float32


def test_reference_kl_log_ratio_is_capped_at_20_both_ways():
    """ref_beta * k3(ref_logp - logp), the log-ratio clamped to [-20, 20] as in the policy term (A = 0: nothing
    selected, no policy loss)."""
    logp = torch.zeros(1, 3)
    for far in (20.5, -20.5):  # one at a time: e^20 would hide the lower cap's 0.5
        ref = torch.tensor([[far, 0.3, 0.0]])
        loss, st = lp_reg_loss(logp, logp, torch.full((1, 3), -1e4), torch.zeros(1), torch.ones(1, 3), ref_logp=ref,
                               ref_beta=0.1)
        kl = sum(math.exp(d) - d - 1 for d in (math.copysign(20, far), 0.3, 0.0)) / 3
        assert loss.item() == pytest.approx(0.1 * kl, rel=1e-6) and st["policy/kl"] == pytest.approx(kl, rel=1e-6)
