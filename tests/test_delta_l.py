"""delta_l.py: the weights and every aggregation mode on hand-computed examples and naive references (properties
that follow from c_i = (1/M) L_i^(-alpha) / sum_j L_j^(-alpha), arXiv 2509.07558), then the script itself: a few
steps, and 2 ranks against 1 process."""
import math

import pytest
import torch
from conftest import SMALL, TORCHRUN, assert_same_as_one_process, one_process_run_of, records, run_script

import delta_l
from delta_l import aggregate, delta_l_weights, length_metrics, micro_weight, normaliser, policy_loss

MODES = ["delta_l", "grpo", "dapo", "dr_grpo"]


def _batch(lengths, T=None, seed=0):
    """Random per-token loss [N, T] with garbage beyond each length, and its mask."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()  # [N, T]
    x = torch.randn(len(lengths), T, generator=g)
    return torch.where(mask.bool(), x, torch.full_like(x, 1e6)), mask


def coeffs(mask, mode, alpha=1.0, max_len=None):
    """c_i of LOSS = sum_i c_i sum_t l_{i,t}, read off by autograd: a token loss y_i / L_i per token."""
    y = torch.zeros(mask.shape[0], requires_grad=True)
    L = mask.sum(-1, keepdim=True)
    return torch.autograd.grad(aggregate(y[:, None] * mask / L, mask, mode, alpha, max_len), y)[0]


# ---- the weights ------------------------------------------------------------------------------------------------
def test_weights_hand_computed_and_exponent_is_negative():
    # L = 1, 2, 4, M = 8, alpha = 1: L^-1 = 1, .5, .25, sum 1.75 -> c = 1 / (8 * 1.75) * (1, .5, .25) = (4, 2, 1) / 56
    c = delta_l_weights(torch.tensor([1, 2, 4]), alpha=1.0, max_len=8)
    assert torch.allclose(c, torch.tensor([4.0, 2, 1]) / 56)
    assert c[0] > c[1] > c[2]  # shorter responses weigh more (L^(+alpha) would reverse this)
    c = delta_l_weights(torch.tensor([1, 4]), alpha=0.5, max_len=2)  # L^-.5 = 1, .5 -> (1, .5) / (2 * 1.5)
    assert torch.allclose(c, torch.tensor([1 / 3, 1 / 6]))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.75, 1.0, 1.5])
def test_weights_sum_to_one_over_m_and_are_scale_free(alpha):  # any lengths; L / mean(L) as the official code
    torch.manual_seed(0)
    for _ in range(5):
        L = torch.randint(1, 4000, (16,))
        c = delta_l_weights(L, alpha, max_len=4096)
        assert c.shape == (16,) and (c > 0).all()
        assert c.sum().item() == pytest.approx(1 / 4096, rel=1e-6)
        assert torch.allclose(delta_l_weights(L * 7, alpha, max_len=4096), c, rtol=1e-5)
        assert (c * 16 * 4096).mean().item() == pytest.approx(1.0, rel=1e-6)  # official w_i have mean 1


def test_empty_response_does_not_divide_by_zero():
    c = delta_l_weights(torch.tensor([0, 3, 5]), 1.0, max_len=12)
    assert torch.isfinite(c).all() and c.sum().item() == pytest.approx(1 / 12)


# ---- aggregation modes ------------------------------------------------------------------------------------------
def test_aggregate_hand_computed():
    x = torch.tensor([[1.0, 2, 3, 4], [5, 6, 99, 99]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    # delta_l, alpha = 1, M = 8: L = 4, 2 -> L^-1 = .25, .5 (sum .75) -> c = (1/24, 1/12); row sums 10, 11
    assert aggregate(x, mask, "delta_l", 1.0, max_len=8).item() == pytest.approx(10 / 24 + 11 / 12)
    assert aggregate(x, mask, max_len=8).item() == pytest.approx(10 / 24 + 11 / 12)  # default mode is delta_l
    assert aggregate(x, mask, "grpo").item() == pytest.approx((10 / 4 + 11 / 2) / 2)
    assert aggregate(x, mask, "dapo").item() == pytest.approx(21 / 6)
    assert aggregate(x, mask, "dr_grpo", max_len=8).item() == pytest.approx(21 / 16)
    assert aggregate(x, mask, "delta_l", max_len=8).dim() == 0
    with pytest.raises(ValueError):
        aggregate(x, mask, "bnpo")


@pytest.mark.parametrize("mode", MODES)
def test_masked_tokens_contribute_nothing(mode):
    x, mask = _batch([3, 7, 1, 5], T=9)
    clean = torch.where(mask.bool(), x, torch.zeros_like(x))
    assert aggregate(x, mask, mode, 0.75, 12).item() == pytest.approx(aggregate(clean, mask, mode, 0.75, 12).item())
    xg = x.clone().requires_grad_(True)
    aggregate(xg, mask, mode, 0.75, 12).backward()
    assert (xg.grad[mask == 0] == 0).all() and (xg.grad[mask == 1] != 0).all()


def test_equal_lengths_all_modes_agree_up_to_a_constant():  # every c_i is then the same within a mode
    x, mask = _batch([5] * 6, T=8)
    M, L = 12, 5
    grpo_, dapo_, dr = (aggregate(x, mask, m, max_len=M) for m in ("grpo", "dapo", "dr_grpo"))
    assert grpo_.item() == pytest.approx(dapo_.item(), abs=1e-6)
    assert grpo_.item() == pytest.approx(M / L * dr.item(), abs=1e-6)
    for alpha in (0.0, 0.5, 1.0):
        assert aggregate(x, mask, "delta_l", alpha, M).item() == pytest.approx(dr.item(), abs=1e-6)


def test_alpha_zero_is_dr_grpo_exactly():  # loss and gradient, any lengths
    x, mask = _batch([1, 9, 4, 12, 2, 7], T=12)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = aggregate(xa, mask, "delta_l", 0.0, 12), aggregate(xb, mask, "dr_grpo", max_len=12)
    a.backward(), b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and torch.allclose(xa.grad, xb.grad)


def test_alpha_one_is_grpo_times_a_constant():  # c_i ~ 1/L_i: GRPO's relative weights, a length-free gain
    lengths = [1, 9, 4, 12, 2, 7]
    x, mask = _batch(lengths, T=12)
    N, M = len(lengths), 12
    k = N / (M * sum(1 / L for L in lengths))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = aggregate(xa, mask, "delta_l", 1.0, M), aggregate(xb, mask, "grpo")
    a.backward(), b.backward()
    assert a.item() == pytest.approx(k * b.item(), rel=1e-5)
    assert torch.allclose(xa.grad, k * xb.grad, atol=1e-7)
    assert torch.nn.functional.cosine_similarity(xa.grad.flatten(), xb.grad.flatten(), 0).item() == pytest.approx(1)


def test_gain_is_length_free_only_for_delta_l_and_dr_grpo():  # the paper's unbiasedness: sum_i c_i = 1/M
    M = 16
    for lengths in ([2, 2, 3, 3], [10, 14, 16, 16], [1, 16, 5, 8]):
        mask = _batch(lengths, T=16)[1]
        L = torch.tensor(lengths, dtype=torch.float)
        for alpha in (0.0, 0.5, 1.0):
            assert coeffs(mask, "delta_l", alpha, M).sum().item() == pytest.approx(1 / M, rel=1e-5)
        assert coeffs(mask, "dr_grpo", max_len=M).sum().item() == pytest.approx(1 / M, rel=1e-5)
        assert coeffs(mask, "grpo").sum().item() == pytest.approx((1 / L).mean().item(), rel=1e-5)
        assert coeffs(mask, "dapo").sum().item() == pytest.approx(1 / L.mean().item(), rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_padding_columns_change_nothing_with_a_fixed_m(mode):
    x, mask = _batch([3, 7, 1, 5], T=7)
    pad = lambda t: torch.cat([t, torch.zeros(4, 5)], 1)  # noqa: E731
    assert aggregate(pad(x), pad(mask), mode, 1.0, 16).item() == pytest.approx(aggregate(x, mask, mode, 1.0, 16).item())


def test_regression_padded_width_as_m_breaks_padding_invariance():  # why M must be the fixed cap, not the width
    x, mask = _batch([3, 7, 1, 5], T=7)
    pad = lambda t: torch.cat([t, torch.zeros(4, 5)], 1)  # noqa: E731
    for mode in ("dr_grpo", "delta_l"):
        assert aggregate(pad(x), pad(mask), mode).item() != pytest.approx(aggregate(x, mask, mode).item())


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_accumulate_to_the_whole_batch(mode):
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5), torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    adv = torch.randn(6)
    whole, _ = policy_loss(logp, old, adv, mask, agg=mode, max_len=5, alpha=0.75)
    parts = [slice(0, 2), slice(2, 5), slice(5, 6)]
    acc = sum(policy_loss(logp[s], old[s], adv[s], mask[s], agg=mode, max_len=5, alpha=0.75)[0]
              * micro_weight(mask[s], mask, mode, alpha=0.75) for s in parts)
    assert acc.item() == pytest.approx(whole.item(), abs=1e-6)
    if mode == "delta_l":  # averaging per-micro-batch results instead is wrong (the bnpo / old-verl effect)
        naive = sum(policy_loss(logp[s], old[s], adv[s], mask[s], agg=mode, max_len=5, alpha=0.75)[0] / 3 for s in parts)
        assert naive.item() != pytest.approx(whole.item(), abs=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_accumulate_to_the_whole_batch(mode):
    """Each rank accumulates its micro-batches against the normaliser averaged over ranks, and DDP averages the
    ranks' gradients: the result must be the whole batch's gradient, for every mode. Rank 1's responses are longer,
    so a per-rank normaliser (the old delta_l and dapo) gives another gradient."""
    torch.manual_seed(0)
    lengths = [1, 2, 2, 3, 5, 5, 4, 5]  # rank 0: rows 0-3, rank 1: rows 4-7
    mask = _batch(lengths, T=5)[1]
    logp, old, adv = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5), torch.randn(8)
    grad = lambda loss: torch.autograd.grad(loss, logp)[0]  # noqa: E731  [8, 5]
    whole = grad(policy_loss(logp, old, adv, mask, agg=mode, max_len=5, alpha=0.75)[0])
    ranks = [slice(0, 4), slice(4, 8)]
    total = sum(normaliser(mask[r], mode, 0.75) for r in ranks) / 2  # all_ranks_sum(...) / world

    def ddp(total_of):  # the mean over ranks of each rank's accumulated micro-batches (of 3, then 1 rows)
        parts = []
        for r in ranks:
            lp, o, a, m = logp[r], old[r], adv[r], mask[r]
            parts += [policy_loss(lp[s], o[s], a[s], m[s], agg=mode, max_len=5, alpha=0.75)[0]
                      * micro_weight(m[s], m, mode, 0.75, total_of(m)) / 2 for s in (slice(0, 3), slice(3, 4))]
        return grad(sum(parts))

    assert torch.allclose(ddp(lambda m: total), whole, atol=1e-7)
    per_rank = ddp(lambda m: None)  # each rank normalised alone
    assert torch.allclose(per_rank, whole, atol=1e-7) == (mode in ("grpo", "dr_grpo"))  # rows are equal per rank


def test_length_metrics_hand_computed():
    L, M = torch.tensor([1, 2, 4]), 8  # delta_l, alpha 1: c ~ 1, 1/2, 1/4 -> spread 4; gain M sum_i c_i = 1
    assert length_metrics(L, "delta_l", 1.0, M) == pytest.approx({"loss/gain": 1.0, "policy/dl_weight_spread": 4.0})
    assert length_metrics(L, "delta_l", 0.5, M)["policy/dl_weight_spread"] == pytest.approx(2.0)
    assert length_metrics(L, "dr_grpo", 1.0, M)["loss/gain"] == pytest.approx(1.0)
    assert length_metrics(L, "grpo", 1.0, M)["loss/gain"] == pytest.approx(M * (1 + 1 / 2 + 1 / 4) / 3)
    assert length_metrics(L, "dapo", 1.0, M)["loss/gain"] == pytest.approx(M / (7 / 3))


def test_advantage_scaling_equals_loss_weighting():  # official compute_grpo_outcome_advantage: adv * w_i = N M c_i
    torch.manual_seed(1)
    logp, old = torch.randn(6, 5) * 0.5, torch.randn(6, 5) * 0.5
    mask = (torch.rand(6, 5) > 0.4).float()
    mask[:, 0] = 1
    adv, M = torch.randn(6), 5
    w = delta_l_weights(mask.sum(-1), 1.0, M) * 6 * M  # [N], mean 1
    ours, st = policy_loss(logp, old, adv, mask, agg="delta_l", max_len=M)
    official, _ = policy_loss(logp, old, adv * w, mask, agg="dr_grpo", max_len=M)
    assert st["policy/clipfrac"] > 0 and ours.item() == pytest.approx(official.item(), abs=1e-6)


def test_zero_advantage_rows_still_enter_the_normaliser():  # official code: every row's length, whatever its adv
    logp, old, mask = torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, 0.0, -1.0])  # ratio 1: token loss -adv; row sums -2, 0, 1
    loss, _ = policy_loss(logp, old, adv, mask, agg="delta_l", max_len=4)
    S = 1 / 2 + 1 / 4 + 1  # row 2 (adv 0) still counts
    assert loss.item() == pytest.approx((-2 * (1 / 2) + 1 * 1) / (4 * S))


def test_cv_ordering_on_synthetic_gradients():  # g_i = mu + sqrt(V L_i) xi_i (Var ~ L), CV against the true mean
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 4000, (16,), generator=g).tolist()
    mask, M, d = _batch(lengths, T=4000)[1], 4096, 256
    mu = torch.full((d,), 0.05)

    def cv(c, draws=2000):  # Monte Carlo: g_hat = sum_i c_i g_i
        L = torch.tensor(lengths, dtype=torch.float)
        xi = torch.randn(draws, len(lengths), d, generator=g)
        g_hat = (c.sum() * mu) + torch.einsum("i,kid->kd", c * L.sqrt(), xi)  # [draws, d]
        return (g_hat - c.sum() * mu).pow(2).sum(-1).mean().sqrt().item() / (c.sum() * mu).norm().item()

    closed = lambda c: math.sqrt(d * (c**2 * mask.sum(-1)).sum().item()) / (c.sum().item() * mu.norm().item())  # noqa
    cvs = {m: closed(coeffs(mask, m, max_len=M)) for m in ("grpo", "dapo", "dr_grpo")}
    cvs.update({f"dl{a}": closed(coeffs(mask, "delta_l", a, M)) for a in (0.0, 0.5, 0.75, 1.0, 1.25)})
    assert cv(coeffs(mask, "delta_l", 1.0, M)) == pytest.approx(cvs["dl1.0"], rel=0.05)  # the closed form is right
    assert cv(coeffs(mask, "dapo", max_len=M)) == pytest.approx(cvs["dapo"], rel=0.05)
    assert cvs["dl1.0"] == pytest.approx(cvs["grpo"], rel=1e-5)
    assert cvs["dl0.0"] == pytest.approx(cvs["dr_grpo"], rel=1e-5) == pytest.approx(cvs["dapo"], rel=1e-5)
    assert cvs["dl1.0"] < cvs["dl0.75"] < cvs["dl0.5"] < cvs["dl0.0"] and cvs["dl1.0"] < cvs["dl1.25"]


# ---- the script -------------------------------------------------------------------------------------------------
def test_importing_delta_l_starts_nothing():
    a = delta_l.Args()
    assert hasattr(delta_l, "main") and a.model == "tiny" and a.agg == "delta_l" and a.alpha == 1.0
    assert a.output_dir == "runs/delta_l"


def test_delta_l_smoke(tiny_cache, tmp_path):
    p = run_script("delta_l.py", "--max_steps", "3", "--eval_every", "2", "--micro_batch_size", "6",
                   "--output_dir", str(tmp_path), *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = records(tmp_path)
    assert recs[0]["args"]["agg"] == "delta_l" and recs[1]["step"] == 0 and "eval/pass@16" in recs[1]
    steps = recs[2:]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for k in ["reward/mean", "loss/policy", "policy/clipfrac", "policy/entropy", "response/len", "perf/update_s",
              "policy/dl_weight_spread"]:
        assert all(math.isfinite(r[k]) for r in steps), k
    assert all(r["loss/gain"] == pytest.approx(1.0, rel=1e-5) for r in steps)  # delta_l: M sum_i c_i = 1
    assert all(r["policy/dl_weight_spread"] >= 1 for r in steps)
    assert "eval/pass@1" in steps[-1] and (tmp_path / "final" / "config.json").exists()


MULTI = ["--group_size", "4", "--prompts_per_step", "8", "--micro_batch_size", "3", "--temperature", "1.6",
         "--max_steps", "3", "--eval_every", "0", "--eval_prompts", "8", "--eval_samples", "2", "--mini_batches", "1"]


@pytest.fixture(scope="module")
def one_process_run(tiny_cache, tmp_path_factory):
    return one_process_run_of(tmp_path_factory, "delta_l.py", *MULTI)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_compute_what_one_process_does(one_process_run, tmp_path, mode):
    """2 gloo ranks (DDP, or FSDP2 shards) against 1 process on the same rows, default delta_l aggregation: the
    same rewards, gradient norms and weights. At temperature 1.6 the response lengths differ between rows and
    ranks, so the weights c_i are unequal (spread > 1) and each rank's sum_j L_j^(-alpha) differs from the other's:
    a per-rank normaliser (as before) gives other gradients. The logged gain and spread are global as well."""
    extra = ["--fsdp", "true"] if mode == "fsdp" else []
    p = run_script(*TORCHRUN, "delta_l.py", *MULTI,
                   *extra, "--output_dir", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = records(one_process_run)[1:], records(tmp_path)[1:]
    assert [r["step"] for r in two] == [1, 2, 3]
    assert len({r["response/len"] for r in one}) > 1 and any(r["perf/grad_norm"] > 0.1 for r in one)  # a real test
    assert all(r["policy/dl_weight_spread"] > 1 for r in one)  # Delta-L's weights really differ between rows
    assert_same_as_one_process(one_process_run, tmp_path)  # rollouts, grad norms, weights
    for a, b in zip(one, two):
        assert b["policy/dl_weight_spread"] == pytest.approx(a["policy/dl_weight_spread"], rel=1e-6)  # global
        assert b["loss/gain"] == pytest.approx(1.0, rel=1e-5)


# ---- gaps mutation testing found (python tests/mutation.py delta_l.policy_loss delta_l.micro_weight delta_l.normaliser) ----
def naive_delta_l(logp, old, adv, mask, eps_low, eps_high, max_len, alpha, ref=None, beta=0.0):
    """policy_loss (agg delta_l) written token by token from its docstring and the paper: PPO-clip max(-A r,
    -A clip(r, 1 - eps_low, 1 + eps_high)) with r = exp(clamp(logp - old, +-20)), plus beta * k3 (d = clamp(ref - logp,
    +-20), k3 = e^d - d - 1) when a reference and beta > 0 are given, each row's sum weighted by
    c_i = (1/M) L_i^(-alpha) / sum_j L_j^(-alpha); with every statistic: an independent reference."""
    B, T = logp.shape
    L = [max(sum(mask[i].tolist()), 1.0) for i in range(B)]
    S = sum(x ** -alpha for x in L)
    tot, n, clipped, ratios, kls = 0.0, 0, 0, 0.0, 0.0
    for i in range(B):
        a, c = adv[i].item(), L[i] ** -alpha / (max_len * S)
        for t in range(T):
            if mask[i, t] == 0:
                continue
            lp = logp[i, t].item()
            r = math.exp(min(max(lp - old[i, t].item(), -20.0), 20.0))
            clip = -a * min(max(r, 1 - eps_low), 1 + eps_high)
            loss, clipped = max(-a * r, clip), clipped + (clip > -a * r)  # a tie (r inside the range) is not clipped
            if ref is not None and beta > 0:
                d = min(max(ref[i, t].item() - lp, -20.0), 20.0)
                loss, kls = loss + beta * (math.exp(d) - d - 1), kls + math.exp(d) - d - 1
            tot, n, ratios = tot + c * loss, n + 1, ratios + r
    st = {"policy/clipfrac": clipped / n, "policy/ratio": ratios / n}
    if ref is not None and beta > 0:
        st["policy/kl"] = kls / n
    return tot, st


def _dl_toy():
    """5 rows of lengths 7, 3, 1, 5, 6 in a width of 7 (M = 10 elsewhere), A of both signs and 0; ratios above, below
    and inside the clip ranges used below (never at a bound), ref - logp in [-2, 2]; garbage in the padding."""
    g = torch.Generator().manual_seed(3)
    lengths = [7, 3, 1, 5, 6]
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).float()  # [5, 7]
    old = torch.randn(5, 7, generator=g) - 1.0
    lr = torch.tensor([1.5, 0.5, 1.1, 0.95, 1.0, 3.0, 0.25, 1.25, 0.7, 2.0, 0.6]).log()
    logr = lr[torch.arange(35) % len(lr)].reshape(5, 7)
    logp = torch.where(mask.bool(), old + logr, old + 25.0)  # padding: a clamped, finite ratio
    ref = logp + torch.linspace(-2, 2, 35).reshape(5, 7)[:, torch.randperm(7, generator=g)]
    return logp, old, torch.tensor([1.0, -1.5, 0.7, -0.4, 0.0]), mask, ref


@pytest.mark.parametrize("eps_low,eps_high,alpha,beta", [(0.15, 0.28, 0.75, 0.3), (0.35, 0.15, 1.0, 1.0),
                                                         (0.2, 0.2, 1.5, 0.0)])
def test_policy_loss_and_every_stat_equal_the_token_by_token_reference(eps_low, eps_high, alpha, beta):
    """Asymmetric clip ranges, M = 10 != the width 7, the KL path at beta .3 and exactly 1, and beta 0 with a
    reference given (the KL then adds nothing and is not logged)."""
    logp, old, adv, mask, ref = _dl_toy()
    loss, st = policy_loss(logp, old, adv, mask, eps_low, eps_high, "delta_l", 10, ref, beta, alpha)
    expect, est = naive_delta_l(logp, old, adv, mask, eps_low, eps_high, 10, alpha, ref, beta)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert set(st) == set(est) == {"policy/clipfrac", "policy/ratio"} | ({"policy/kl"} if beta else set())
    for k, v in est.items():
        assert st[k] == pytest.approx(v, rel=1e-5), k
    assert 0 < st["policy/clipfrac"] < 0.5 and (st.get("policy/kl", 1.0) > 0.1)  # a real test of each
    if beta:  # the same without the reference, or with beta 0: exactly the PPO part
        ppo, st0 = policy_loss(logp, old, adv, mask, eps_low, eps_high, "delta_l", 10, None, beta, alpha)
        expect_ppo = naive_delta_l(logp, old, adv, mask, eps_low, eps_high, 10, alpha)[0]
        assert ppo.item() == pytest.approx(expect_ppo, rel=1e-5)
        assert "policy/kl" not in st0 and loss.item() > ppo.item()  # k3 >= 0 adds a positive term


def test_extreme_log_ratios_are_clamped_at_20():
    """One token, M = 1, alpha 1 (c = 1): log-ratios of +-30 give a ratio of exactly e^+-20, ref - logp of +-30 a k3
    of e^20 - 21 and e^-20 + 19; everything finite."""
    one, old = torch.ones(1, 1), torch.full((1, 1), -3.0)
    for dlog, a, want in ((30.0, -1.0, math.exp(20)), (-30.0, 1.0, -math.exp(-20))):  # unclipped is the max
        loss, st = policy_loss(old + dlog, old, torch.tensor([a]), one, max_len=1)
        assert st["policy/ratio"] == pytest.approx(math.exp(20 if dlog > 0 else -20), rel=1e-6)
        assert loss.item() == pytest.approx(want, rel=1e-6) and math.isfinite(loss.item())
        assert st["policy/clipfrac"] == 0.0
    for dref, k3 in ((30.0, math.exp(20) - 21), (-30.0, math.exp(-20) + 19)):  # ratio 1, A = 0: only the KL
        loss, st = policy_loss(old, old, torch.zeros(1), one, max_len=1, ref_logp=old + dref, beta=0.5)
        assert st["policy/kl"] == pytest.approx(k3, rel=1e-6) and loss.item() == pytest.approx(0.5 * k3, rel=1e-6)
        assert st["policy/ratio"] == 1.0 and math.isfinite(loss.item())


def test_the_defaults_are_the_trainer_s():
    """Called bare, policy_loss, normaliser and micro_weight are delta_l.py's defaults (Args()); beta's default 0
    turns the KL off even when a reference is passed. The toy has ratios past both clip bounds on both signs of A."""
    a = delta_l.Args()
    logp, old, adv, mask, ref = _dl_toy()
    bare, st = policy_loss(logp, old, adv, mask, ref_logp=ref)
    full, st_full = policy_loss(logp, old, adv, mask, eps_low=a.eps_low, eps_high=a.eps_high, agg=a.agg,
                                max_len=None, ref_logp=None, beta=a.beta, alpha=a.alpha)
    assert bare.item() == full.item() and st == st_full and "policy/kl" not in st
    assert bare.item() == pytest.approx(naive_delta_l(logp, old, adv, mask, 0.2, 0.2, 7, 1.0)[0], rel=1e-5)
    assert normaliser(mask, "delta_l").item() == normaliser(mask, "delta_l", a.alpha).item()
    assert micro_weight(mask[:2], mask, "delta_l") == micro_weight(mask[:2], mask, "delta_l", a.alpha)
    share = (1 / 7 + 1 / 3) / (1 / 7 + 1 / 3 + 1 + 1 / 5 + 1 / 6)  # lengths 7, 3 of 7, 3, 1, 5, 6; L^-1
    assert micro_weight(mask[:2], mask, "delta_l") == pytest.approx(share)


def test_normaliser_hand_computed_float64_on_the_mask_s_device():
    """Lengths 1, 2, 4 (7 tokens, 3 rows): dapo / token-mean 7, delta_l sum_i L_i^(-alpha), grpo and dr_grpo 3;
    a float64 0-dim tensor on the mask's device for every mode (meta stands in for a GPU)."""
    mask = _batch([1, 2, 4])[1]
    for agg, alpha, want in (("dapo", 1.0, 7), ("token-mean", 1.0, 7), ("delta_l", 1.0, 1.75),
                             ("delta_l", 0.5, 1 + 2 ** -0.5 + 0.5), ("grpo", 1.0, 3), ("dr_grpo", 0.5, 3)):
        n = normaliser(mask, agg, alpha)
        assert n.item() == pytest.approx(want, rel=1e-12) and n.dtype == torch.float64 and n.dim() == 0, agg
        m = normaliser(mask.to("meta"), agg, alpha)
        assert m.device.type == "meta" and m.dtype == torch.float64 and m.dim() == 0, agg


def test_micro_weight_hand_computed_and_at_the_boundaries():
    """normaliser(micro) / normaliser(mini): 1 for the whole mini-batch (also where the normaliser is exactly 1 or
    below it), 0.0 where the normaliser is 0 (no tokens at all, or a total of 0)."""
    mask = _batch([1, 2, 4])[1]
    assert micro_weight(mask[:2], mask, "delta_l", 1.0) == pytest.approx(1.5 / 1.75)
    assert micro_weight(mask[:2], mask, "delta_l", 2.0) == pytest.approx(1.25 / 1.3125)
    assert micro_weight(mask[:2], mask, "token-mean") == pytest.approx(3 / 7) == micro_weight(mask[:2], mask, "dapo")
    assert micro_weight(mask[:2], mask, "grpo") == pytest.approx(2 / 3)
    assert micro_weight(mask[:2], mask, "delta_l", 1.0, total=torch.tensor(3.0, dtype=torch.float64)) == 0.5
    for m in (mask[:1], mask[1:2], mask):  # delta_l normaliser exactly 1, then 0.5, then 1.75
        for agg in MODES:
            assert micro_weight(m, m, agg, 1.0) == 1.0, agg
    empty = torch.zeros(3, 4)
    assert micro_weight(empty, empty, "dapo") == 0.0  # 0 tokens: the loss is 0, the share 0 (not nan or 1)
    assert micro_weight(mask, mask, "delta_l", 1.0, total=torch.tensor(0.0, dtype=torch.float64)) == 0.0


def test_weights_defaults_and_scale_free():
    """delta_l_weights(L) is the paper's minimum-variance case (alpha 1) summing to 1 (M = 1), and only the length
    ratios matter: computed on L / mean L, the weights of lengths x 1e20 are the same (no overflow to 0/0)."""
    L = torch.tensor([3, 12, 48, 6])
    w = delta_l_weights(L)
    assert torch.allclose(w, (1 / L.double() / (1 / L.double()).sum()).float()) and w.sum().item() == pytest.approx(1)
    assert torch.allclose(delta_l_weights(L.double() * 1e20), w)


def test_aggregation_aliases_and_one_token():
    """Each mode answers to its paper name and to the verl name; a batch of one response token is that token's loss
    in every mode that averages (token-mean: divided by 1 token); an unknown mode is named in the error."""
    g = torch.Generator().manual_seed(0)
    tl = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    for short, long in [("dapo", "token-mean"), ("grpo", "seq-mean-token-mean"),
                        ("dr_grpo", "seq-mean-token-sum-norm")]:
        assert aggregate(tl, mask, long, max_len=9).item() == aggregate(tl, mask, short, max_len=9).item()
    one = torch.zeros(1, 5)
    one[0, 2] = 1.0
    for mode in ("token-mean", "seq-mean-token-mean", "delta_l"):
        assert aggregate(tl[:1], one, mode, max_len=1).item() == pytest.approx(tl[0, 2].item(), rel=1e-6), mode
    with pytest.raises(ValueError, match="unknown agg 'token_mean'"):
        aggregate(tl, mask, "token_mean")
