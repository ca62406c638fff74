"""rl_plus.py: the RL-PLUS loss (arXiv 2508.00222) as its official code computes it (github.com/YihongDong/RL-PLUS,
rlplus_core_alg.compute_token_on_off_policy_loss), on hand-computed micro-examples; then the script end to end."""
import math

import pytest
import torch
from conftest import SMALL, TORCHRUN, assert_same_as_one_process, one_process_run_of, records, run_script

import common
import grpo
import rl_plus
from rl_plus import external_ids, group_advantages, keep_with_solution, rl_plus_loss, with_external

LOG = math.log


def one_token(p_theta, p_old, adv, external=True, **kw):
    """A single-token batch (N = 1, L_max = 1), so loss = the token's l and dloss/dlogp = dl/dlog p_theta."""
    logp = torch.tensor([[LOG(p_theta)]], requires_grad=True)
    old = torch.tensor([[LOG(p_old)]], requires_grad=True)
    loss, st = rl_plus_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), torch.tensor([external]), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), old.grad, st


# ---- Multiple Importance Sampling weight and exploration factor on one external token ----------------------------
@pytest.mark.parametrize("p,mis", [(0.2, 0.5), (1.0, 1.0), (0.01, 0.01 / (0.0075 + 0.25))])
def test_mis_weight_code_form(p, mis):
    loss, _, _, st = one_token(p, p, 1.0, gamma=0.0)  # gamma 0: C = 1, so l = -r^m
    assert st["policy/mis_weight"] == pytest.approx(mis, abs=1e-6) and loss == pytest.approx(-mis, abs=1e-6)
    assert round(0.01 / (0.0075 + 0.25), 4) == 0.0388


@pytest.mark.parametrize("p", [0.01, 0.2, 0.9])
def test_mis_literal_uniform_is_four_thirds(p):
    assert one_token(p, p, 1.0, gamma=0.0, mis_u=0.0)[3]["policy/mis_weight"] == pytest.approx(4 / 3, abs=1e-5)


def test_mis_gradient_and_detached_denominator():
    # d r^m / d log p_theta = r^m; p_old is data: no gradient reaches it, but it changes the value
    p_theta, p_old = 0.3, 0.2
    mis = p_theta / (0.75 * p_old + 0.25)
    loss, g, g_old, _ = one_token(p_theta, p_old, 1.0, gamma=0.0)
    assert loss == pytest.approx(-mis, abs=1e-6) and g == pytest.approx(-mis, abs=1e-6) and g_old is None
    assert one_token(p_theta, 0.6, 1.0, gamma=0.0)[0] != pytest.approx(loss)


def test_eaf_value_and_stop_gradient():
    loss, g, _, st = one_token(0.2, 0.2, 0.5)  # r^m = 0.2 / (0.15 + 0.25) = 0.5, C = 0.8^0.5 = 0.894427, A = 0.5
    assert st["policy/eaf"] == pytest.approx(0.894427, abs=1e-6)
    assert loss == pytest.approx(-0.223607, abs=1e-6)
    assert g == pytest.approx(-0.223607, abs=1e-6)  # = -r^m A C: no extra term from differentiating C


def test_combined_weight_peaks_inside():
    # w(p) = p / (0.75p + 0.25) * (1-p)^0.5 at theta_old is 0 at both ends, about 0.568 near p = 0.457, 0.17 at 0.05:
    # the least likely external tokens are damped, not amplified
    w = lambda p: -one_token(p, p, 1.0)[0]  # noqa: E731
    assert w(1.0) == 0 and w(0.457) == pytest.approx(0.568, abs=1e-3) and w(0.05) == pytest.approx(0.17, abs=5e-3)


# ---- advantages over the mixed group: G-1 rollouts + 1 external, mean-centred over all G -------------------------
def test_advantage_includes_the_external_response():
    reward = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 1])  # 7 rollouts, one correct, + a correct external solution
    adv = group_advantages(reward, 8, scale_std=False)
    assert torch.allclose(adv, torch.tensor([.75, -.25, -.25, -.25, -.25, -.25, -.25, .75]))
    split = reward[:7] - reward[:7].mean()  # the bug to catch: a baseline from the on-policy rollouts only
    assert not torch.allclose(adv[:7], split)
    std = group_advantages(reward, 8, scale_std=True)  # the paper's form; the code runs grpo_use_std=False
    assert std[0].item() == pytest.approx(1.6202, abs=1e-4) and std[1].item() == pytest.approx(-0.5401, abs=1e-4)
    assert rl_plus.Args().scale_std is False and rl_plus.Args().gamma == 0.5 and rl_plus.Args().mis_u == 1.0


def test_all_equal_rewards_give_exactly_zero_gradient():
    adv = group_advantages(torch.ones(4), 4, scale_std=False)
    logp = torch.log(torch.rand(4, 3) * 0.9 + 0.05).requires_grad_(True)
    loss, _ = rl_plus_loss(logp, logp.detach() - 0.3, adv, torch.ones(4, 3), torch.tensor([0, 0, 0, 1]).bool())
    loss.backward()
    assert torch.equal(adv, torch.zeros(4)) and torch.equal(logp.grad, torch.zeros(4, 3))


# ---- no clipping, disjoint masks, aggregation ------------------------------------------------------------------
def test_no_clipping_anywhere():
    assert one_token(0.75, 0.5, 1.0, external=False)[0] == pytest.approx(-1.5)  # rho 1.5: not clipped to 1.2
    assert one_token(0.75, 0.5, 1.0, external=False, eps_low=0.2, eps_high=0.2)[0] == pytest.approx(-1.2)  # ablation
    assert one_token(1.0, 1e-9, 1.0, gamma=0.0)[3]["policy/mis_weight"] == pytest.approx(4.0, abs=1e-6)  # r^m = 4


def _pair():
    """Row 0 internal, row 1 external (3 real tokens, the last the eos), one pad column on row 0."""
    p_new = torch.tensor([[0.6, 0.3, 0.5], [0.2, 0.8, 0.4]])
    p_old = torch.tensor([[0.4, 0.3, 0.9], [0.5, 0.8, 0.1]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    return p_new.log().requires_grad_(True), p_old.log(), mask, torch.tensor([False, True])


def test_internal_and_external_tokens_get_their_own_terms():
    logp, old, mask, is_ext = _pair()
    adv = torch.tensor([0.5, -1.0])
    loss, _ = rl_plus_loss(logp, old, adv, mask, is_ext, max_len=4)
    internal = -0.5 * (0.6 / 0.4 + 0.3 / 0.3)  # rho only, no MIS/EAF
    external = sum(1.0 * p / (0.75 * q + 0.25) * (1 - p) ** 0.5 for p, q in [(0.2, 0.5), (0.8, 0.8), (0.4, 0.1)])
    assert loss.item() == pytest.approx((internal + external) / (2 * 4), abs=1e-6)  # A < 0 still gets C, as in the code
    loss.backward()
    assert logp.grad[0, 2] == 0 and logp.grad[1, 2] != 0  # pad: nothing; external eos: an external token
    bumped = logp.detach().clone()
    bumped[0, 2] = 5.0  # whatever sits under a pad position
    assert rl_plus_loss(bumped, old, adv, mask, is_ext, max_len=4)[0].item() == pytest.approx(loss.item())


def test_constant_normalizer_sum_not_mean():
    logp, old, mask, is_ext = _pair()
    adv = torch.tensor([0.5, 1.0])
    base = rl_plus_loss(logp, old, adv, mask, is_ext, max_len=8)[0].item()
    pad = lambda x, v: torch.cat([x, torch.full((2, 2), v)], 1)  # noqa: E731  two more pad columns
    padded = rl_plus_loss(pad(logp.detach(), 0.0), pad(old, 0.0), adv, pad(mask, 0.0), is_ext, max_len=8)[0]
    assert padded.item() == pytest.approx(base, abs=1e-7)  # L_max fixed: padding changes nothing
    one = lambda lp, o, m: rl_plus_loss(lp, o, adv[:1], m, is_ext[:1], max_len=8)[0].item()  # noqa: E731
    lp1, o1 = torch.log(torch.full((1, 4), 0.6)), torch.log(torch.full((1, 4), 0.4))
    single = one(lp1, o1, torch.tensor([[1.0, 1, 0, 0]]))
    assert one(lp1, o1, torch.ones(1, 4)) == pytest.approx(2 * single)  # twice the tokens, twice the loss


def test_without_external_it_is_unclipped_mean_centred_grpo():
    torch.manual_seed(0)
    logp, old = torch.randn(8, 5).clamp(max=0), torch.randn(8, 5).clamp(max=0)
    mask = (torch.rand(8, 5) > 0.3).float()
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0]), 4, scale_std=False)
    ours, _ = rl_plus_loss(logp, old, adv, mask, torch.zeros(8, dtype=torch.bool), max_len=6)
    ref, _ = grpo.policy_loss(logp, old, adv, mask, 1e9, 1e9, "seq-mean-token-sum-norm", 6)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


# ---- external data and the group layout ------------------------------------------------------------------------
def test_group_layout_one_external_last(tok):
    examples = common.load_task("countdown:4")[0][:3]
    prompts = common.encode_prompts(tok, examples)
    n = 2  # G - 1 sampled responses per prompt
    fake = common.Samples([p for p in prompts for _ in range(n)], [[5 + i, tok.eos_token_id] for i in range(6)],
                          [[-0.1 * i, -0.2] for i in range(6)], ["stop"] * 6)
    ext = external_ids(tok, examples)
    merged = with_external(fake, ext, n)
    assert len(merged.response_ids) == 9 and merged.finish.count("external") == 3
    for i, e in enumerate(examples):
        grp = slice(3 * i, 3 * i + 3)
        assert merged.prompt_ids[grp] == [prompts[i]] * 3
        assert merged.response_ids[grp][:2] == fake.response_ids[2 * i: 2 * i + 2]
        assert merged.response_ids[3 * i + 2] == ext[i] and ext[i][-1] == tok.eos_token_id
        assert tok.decode(ext[i], skip_special_tokens=True) == e.solution
    batch = common.collate(merged, tok.pad_token_id, "cpu")  # the external eos lies under the mask
    assert batch["mask"][2].sum().item() == len(ext[0])


@pytest.mark.parametrize("task", ["countdown", "countdown:4", "arithmetic"])
def test_built_in_solutions_pass_the_verifier(tok, task):
    examples = common.load_task(task)[0][:200]
    texts = common.decode(tok, external_ids(tok, examples))
    assert all(common.score(e, t) == 1.0 for e, t in zip(examples, texts))
    assert max(map(len, external_ids(tok, examples))) <= 12  # fits the default response cap


def test_missing_or_long_solutions(tok, capsys):
    none = [common.Example("math", "q", "q", "2")] * 3
    with pytest.raises(SystemExit, match="RL-PLUS needs an external"):
        keep_with_solution(tok, none, 12)
    mixed = none[:1] + [common.Example("countdown", "Q:1,2->3 A:", "", "1,2->3", "1+2"),
                        common.Example("countdown", "Q:1,2->3 A:", "", "1,2->3", "1+2" + "+0" * 10)]
    assert [e.solution for e in keep_with_solution(tok, mixed, 12)] == ["1+2"]
    assert "skipped 2 of 3" in capsys.readouterr().out


# ---- the script -------------------------------------------------------------------------------------------------
def test_importing_rl_plus_starts_nothing():
    assert hasattr(rl_plus, "main") and rl_plus.Args().output_dir == "runs/rl_plus"
    assert rl_plus.Args().beta == 0 and rl_plus.Args().ent_coef == 0.001  # no KL, no reference model, as the code


def test_rl_plus_smoke(tiny_cache, tmp_path):
    p = run_script("rl_plus.py", "--max_steps", "3", "--eval_every", "2", "--output_dir", str(tmp_path), *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = records(tmp_path)
    assert recs[0]["args"]["max_steps"] == 3 and recs[1]["step"] == 0 and "eval/pass@16" in recs[1]
    steps = recs[2:]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for k in ["reward/mean", "loss/policy", "policy/entropy", "policy/mis_weight", "policy/eaf", "perf/update_s"]:
        assert all(math.isfinite(r[k]) for r in steps), k
    for r in steps:
        assert r["reward/external"] == 1.0  # the built-in solutions, scored by the same verifier
        # one update per rollout: the loss sees theta_old, so every ratio is 1, the external ones included (their
        # old log-probs come from the no-grad pass), and r^m = p / (0.75 p + 0.25) lies in [p, 1]
        assert r["policy/ratio"] == pytest.approx(1.0, abs=1e-4) and r["policy/clipfrac"] == 0
        assert r["policy/external_prob"] < r["policy/mis_weight"] <= 1 and 0 <= r["policy/eaf"] <= 1
    assert "eval/pass@1" in steps[1] and "eval/pass@1" in steps[2] and "eval/pass@1" not in steps[0]
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "final" / "config.json").exists()



def test_p_old_pass_runs_by_micro_batch(tiny_cache, tmp_path, monkeypatch):
    """Regression: the no-grad p_old pass over the external rows ran them all in one forward, whatever
    --micro_batch_size, so its memory was not bounded by the micro-batch."""
    calls, real = [], rl_plus.token_logprobs_nograd

    def spy(model, batch, micro_batch_size=0, **kw):
        calls.append((batch["mask"].shape[0], micro_batch_size))
        return real(model, batch, micro_batch_size, **kw)

    monkeypatch.setattr(rl_plus, "token_logprobs_nograd", spy)
    rl_plus.main(rl_plus.Args(output_dir=str(tmp_path), max_steps=1, prompts_per_step=4, group_size=4,
                              micro_batch_size=2, eval_every=0, eval_prompts=4, eval_samples=2, log_examples_every=0))
    assert calls == [(4, 2)]  # the step's 4 external rows, 2 at a time
    assert records(tmp_path)[-1]["policy/ratio"] == pytest.approx(1.0, abs=1e-4)  # p_old = theta_old's log-probs

# G = 5: 4 rollouts + 1 external, so each rank's on-policy means run over 16 rows and average exactly over the ranks.
# Temperature 1.6: the rollouts are mostly wrong and of different lengths on the two ranks, while every external
# solution scores 1, so the external rows carry a positive advantage on both ranks. Entropy bonus 0.01 (10x the
# default): enough that its normaliser, which must count every rank's tokens, shows in the gradient norm itself.
MULTI = ["--group_size", "5", "--prompts_per_step", "8", "--micro_batch_size", "3", "--mini_batches", "1",
         "--temperature", "1.6", "--ent_coef", "0.01", "--max_steps", "3", "--eval_every", "0", "--eval_prompts", "8",
         "--eval_samples", "2"]


@pytest.fixture(scope="module")
def one_process_run(tiny_cache, tmp_path_factory):
    return one_process_run_of(tmp_path_factory, "rl_plus.py", *MULTI)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_compute_what_one_process_does(one_process_run, tmp_path, mode):
    """2 gloo ranks (DDP, or FSDP2 shards) against 1 process on the same rows: the same rewards, gradient norms and
    weights. What must span the ranks: the entropy bonus's token-mean H_bar (its normaliser is every rank's token
    count: response lengths differ between the ranks) and the loss's N in sum / (N * L_max) (the mini-batch's rows
    over all ranks; L_max is the constant max_new). The external rows' p_old pass runs by micro-batch of 3."""
    extra = ["--fsdp", "true"] if mode == "fsdp" else []
    p = run_script(*TORCHRUN, "rl_plus.py", *MULTI,
                   *extra, "--output_dir", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = records(one_process_run)[1:], records(tmp_path)[1:]
    assert [r["step"] for r in two] == [1, 2, 3]
    assert len({r["response/len"] for r in one}) > 1 and all(r["perf/grad_norm"] > 0.05 for r in one)  # real
    for r in one:  # RL-PLUS itself at work on both ranks: every external solution is right, and fewer than half the
        # groups (a rank holds 4 of the 8) have equal rewards, so each rank holds external rows with advantage > 0
        assert r["reward/external"] == 1.0 and r["reward/zero_std_groups"] < 0.5
        assert r["policy/mis_weight"] > 0 and r["policy/eaf"] > 0
        assert r["policy/ratio"] == pytest.approx(1.0, abs=1e-4)  # the micro-batched p_old pass is theta_old's
    assert_same_as_one_process(one_process_run, tmp_path,  # the same rollouts, groups and external rows
                               ["reward/mean", "response/len", "reward/external", "reward/zero_std_groups"])


# ---- gaps mutation testing found (python tests/mutation.py rl_plus.rl_plus_loss) ----
def naive_rl_plus(logp, old, adv, mask, is_ext, gamma=0.5, max_len=None, mis_u=1.0, eps_low=None, eps_high=None,
                  agg="seq-mean-token-sum-norm", ref=None, beta=0.0):
    """rl_plus_loss written token by token from its docstring, with every statistic: an independent reference.
    Internal token: -A rho (PPO-clipped to [1 - eps_low, 1 + eps_high] if given), rho = e^clamp(log ratio, +-20);
    external token: -A p / (0.75 p_old + 0.25 U) (1 - p)^gamma; + beta k3(ref) on every token when beta > 0."""
    tot, n, n_int, n_ext, clipped, ratios, mis_sum, eaf_sum, p_sum, kl_sum = (0.0,) * 10
    for i in range(logp.shape[0]):
        a = adv[i].item()
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            lp, o = logp[i, t].item(), old[i, t].item()
            r, p = math.exp(min(max(lp - o, -20.0), 20.0)), math.exp(lp)
            if is_ext[i]:
                w, c = p / (0.75 * math.exp(o) + 0.25 * mis_u), max(1.0 - p, 0.0) ** gamma
                loss, n_ext, mis_sum, eaf_sum, p_sum = -a * w * c, n_ext + 1, mis_sum + w, eaf_sum + c, p_sum + p
            else:
                loss, n_int = -a * r, n_int + 1
                if eps_low is not None:
                    c = -a * min(max(r, 1 - eps_low), 1 + eps_high)
                    loss, clipped = max(loss, c), clipped + (c > loss)
            if ref is not None and beta > 0:
                d = min(max(ref[i, t].item() - lp, -20.0), 20.0)
                loss, kl_sum = loss + beta * (math.exp(d) - d - 1), kl_sum + math.exp(d) - d - 1
            tot, n, ratios = tot + loss, n + 1, ratios + r
    norm = n if agg == "token-mean" else logp.shape[0] * (max_len or logp.shape[1])
    st = {"policy/clipfrac": clipped / max(n_int, 1), "policy/ratio": ratios / n,
          "policy/mis_weight": mis_sum / max(n_ext, 1), "policy/eaf": eaf_sum / max(n_ext, 1),
          "policy/external_prob": p_sum / max(n_ext, 1)}
    if ref is not None and beta > 0:
        st["policy/kl"] = kl_sum / n
    return tot / norm, st


def _mixed_toy(seed=3):
    """6 rows, internal and external with A > 0 and A < 0; ratios inside and on both sides of any clip range, one
    exactly 1, an external token with p = 1 (C = 0); pads (mask 0) hold values far from the reference."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(6, 5, generator=g) * 0.9 + 0.05)
    old = torch.log(torch.rand(6, 5, generator=g) * 0.9 + 0.05)
    ref = logp + torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.25).float()
    mask[:, 0] = 1.0
    logp[0, 0], logp[2, 0] = old[0, 0], 0.0
    ref[mask == 0] = logp[mask == 0] - 15.0
    adv = torch.tensor([1.0, -0.5, 0.75, -1.0, 0.5, -0.25])
    return logp, old, ref, adv, mask, torch.tensor([False, False, True, True, False, True])


@pytest.mark.parametrize("gamma,mis_u,eps_low,eps_high,agg,beta", [
    (0.5, 1.0, None, None, "seq-mean-token-sum-norm", 0.0),  # the trainer's run; a reference without its weight
    (0.3, 0.25, 0.1, 0.3, "token-mean", 0.5),  # asymmetric clip, beta below 1
    (1.5, 1.0, 0.3, 0.05, "seq-mean-token-sum-norm", 2.0)])
def test_loss_and_every_stat_equal_the_token_by_token_reference(gamma, mis_u, eps_low, eps_high, agg, beta):
    logp, old, ref, adv, mask, is_ext = _mixed_toy()
    loss, st = rl_plus_loss(logp, old, adv, mask, is_ext, gamma=gamma, max_len=7, mis_u=mis_u, eps_low=eps_low,
                            eps_high=eps_high, agg=agg, ref_logp=ref, beta=beta)
    expect, est = naive_rl_plus(logp, old, adv, mask, is_ext, gamma, 7, mis_u, eps_low, eps_high, agg, ref, beta)
    assert loss.item() == pytest.approx(expect, rel=1e-5) and math.isfinite(loss.item())
    assert set(st) == set(est)  # the keys, policy/kl only with the KL on
    for k, v in est.items():
        assert st[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    if eps_low is not None:
        assert 0 < st["policy/clipfrac"] < 1  # the clip acts on some internal tokens, not all (ties are not clipped)


def test_log_ratios_of_30_clamp_at_20():
    """Log-ratios of +-30 (policy vs old, reference vs policy): rho is exactly e^+-20, k3 takes d = +-20, all finite."""
    def one(lp, o, adv, **kw):  # one internal token: N = L_max = 1, so the loss is the token's l
        return rl_plus_loss(torch.tensor([[lp]]), torch.tensor([[o]]), torch.tensor([adv]), torch.ones(1, 1),
                            torch.tensor([False]), **kw)

    for lp, o, rho in [(-0.5, -30.5, math.exp(20)), (-30.5, -0.5, math.exp(-20))]:
        loss, st = one(lp, o, -1.0)
        assert st["policy/ratio"] == pytest.approx(rho, rel=1e-6) and loss.item() == pytest.approx(rho, rel=1e-6)
    for lp, r, kl in [(-30.5, -0.5, math.exp(20) - 21), (-0.5, -30.5, math.exp(-20) + 19),  # d = +20, -20
                      (-1.0, -1.0 + LOG(2), 2 - LOG(2) - 1)]:  # d = log 2: k3 = 2 - log 2 - 1
        loss, st = one(lp, lp, 0.0, ref_logp=torch.tensor([[r]]), beta=0.5)  # A = 0: the loss is beta k3 alone
        assert st["policy/kl"] == pytest.approx(kl, rel=1e-6) and loss.item() == pytest.approx(0.5 * kl, rel=1e-6)
        assert math.isfinite(loss.item())


def test_the_defaults_are_the_trainer_s():
    """Called bare, rl_plus_loss is the method as rl_plus.py runs it by default (gamma 0.5, U = 1, no internal clip,
    sum / (N * L_max), no KL), and a reference passed without beta adds nothing, not even a policy/kl."""
    logp, old, ref, adv, mask, is_ext = _mixed_toy()
    a = rl_plus.Args()
    assert a.clip_internal is False  # the trainer then passes eps_low = eps_high = None
    bare, st = rl_plus_loss(logp, old, adv, mask, is_ext, ref_logp=ref)
    full, st_full = rl_plus_loss(logp, old, adv, mask, is_ext, gamma=a.gamma, max_len=None, mis_u=a.mis_u,
                                 eps_low=None, eps_high=None, agg=a.agg, ref_logp=None, beta=a.beta)
    assert bare.item() == full.item() and st == st_full and "policy/kl" not in st
    assert st["policy/clipfrac"] == 0  # no clip: no internal token counts as clipped
