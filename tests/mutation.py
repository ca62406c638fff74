"""Mutation testing of the pure functions: would the unit tests notice a small bug planted in a loss, an advantage, an
aggregation, a divergence, a verifier, the log-probs or pass@k? Run it before sending a change to one of them:

    pip install mutmut==3.8.1
    python tests/mutation.py                        # every function below (about two hours on 2 cores)
    python tests/mutation.py grpo.policy_loss       # one function (a minute or two)
    python tests/mutation.py --survivors            # only the mutants the last run did not kill (after a new test)
    python tests/mutation.py --report               # the last run's results again, nothing run

It copies the code and tests to runs/mutation/ (ignored by git), lets mutmut (github.com/boxed/mutmut) plant its
mutants there one at a time, runs the fast unit tests (`pytest -m "not slow"`, see conftest.py) against each, and
prints the share killed per function, every surviving mutant as a diff, and the total. A survivor is a bug the
tests would let through: kill it with a test that asserts the property it breaks, or, if it cannot change behaviour,
add it to EQUIVALENT below with the reason. Exit status 1 when fewer than 95% of the non-equivalent mutants die.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "mutation"
SOURCES = ["common.py", "grpo.py", "dph_rl.py", "lp_reg.py", "rl_plus.py", "delta_l.py", "dppo.py"]
ALL_TRAINERS = ["group_advantages", "aggregate", "policy_loss", "micro_weight"]
FUNCTIONS = {  # file -> the pure functions mutated (a method as Class.method)
    "common": ["last_boxed", "extract_answer", "verify_countdown", "verify_arithmetic", "verify_sum", "verify_math",
               "score", "parse_task_name", "default_max_new_tokens",
               "sample_tokens", "stream_seeds", "_upcast", "_ChunkLogprobs.forward", "_ChunkLogprobs.backward",
               "token_logprobs", "masked_mean", "pass_at_k", "pass_ks"],
    "grpo": ALL_TRAINERS,
    "dph_rl": ["group_advantages", "aggregate", "policy_loss", "f_divergence", "route_counts", "dph_loss",
               "split_pef"],
    "lp_reg": ["group_advantages", "aggregate", "micro_weight", "minp_proxy_logp", "minp_proxy_topk",
               "select_tokens", "full_proxy_kl", "lp_reg_loss"],
    "rl_plus": ["group_advantages", "aggregate", "micro_weight", "rl_plus_loss"],
    "delta_l": ["group_advantages", "aggregate", "policy_loss", "micro_weight", "delta_l_weights", "normaliser"],
    "dppo": ["group_advantages", "aggregate", "micro_weight", "divergence", "trust_region_mask", "with_sampled_token",
             "dppo_loss"],
}
CAUGHT = ("killed", "timeout")  # a mutant that makes the tests hang is caught by mutmut's time limit


def _nth(line: str, old: str, new: str, n: int) -> str:
    """line with the n-th (0-based) occurrence of old replaced by new."""
    parts = line.split(old)
    assert len(parts) > n + 1, (line, old, n)
    return old.join(parts[:n + 1]) + new + old.join(parts[n + 1:])


# Mutants that cannot change behaviour: (function, the line mutmut removes, the line it adds, why). Matched by text,
# so they stay recognised when mutmut renumbers its mutants.
EQUIVALENT = [
    ('group_advantages',
     'adv = r - r.mean(-1, keepdim=True)  # [P, G]',
     'adv = r - r.mean(+1, keepdim=True)  # [P, G]',
     'r is [P, G]: dim +1 and dim -1 are the same axis'),
    ('group_advantages',
     'adv = adv / (r.std(-1, keepdim=True) + eps)  # Bessel-corrected std, as TRL and verl',
     'adv = adv / (r.std(+1, keepdim=True) + eps)  # Bessel-corrected std, as TRL and verl',
     'r is [P, G]: dim +1 and dim -1 are the same axis'),
    ('pass_at_k',
     'if n - c < k:',
     'if n + c < k:',
     'a shortcut: when n - c < k the product has the factor 1 - k/k = 0, so it gives 1.0 anyway'),
    ('pass_ks',
     'return sorted({k for k in (1, 8, 16) if k <= n} | {n})',
     'return sorted({k for k in (1, 8, 16) if k < n} | {n})',
     "k = n is added by '| {n}' in any case"),
    ('dppo_loss',
     '"policy/masked_frac_pos": (cut * (a > 0)).sum().item() / n.item(),  # ... of them with A > 0',
     '"policy/masked_frac_pos": (cut * (a >= 0)).sum().item() / n.item(),  # ... of them with A > 0',
     'trust_region_mask never cuts a token with A = 0, so those add 0 to the count either way'),
    ('dppo_loss',
     '"policy/masked_frac_neg": (cut * (a < 0)).sum().item() / n.item(),  # ... of them with A < 0',
     '"policy/masked_frac_neg": (cut * (a <= 0)).sum().item() / n.item(),  # ... of them with A < 0',
     'trust_region_mask never cuts a token with A = 0, so those add 0 to the count either way'),
    ('select_tokens',
     'vals = logp.detach().masked_fill(~neg, float("inf")).reshape(-1)  # [B*T]',
     'vals = logp.detach().masked_fill(~neg, float("INF")).reshape(-1)  # [B*T]',
     "float() reads 'INF' as 'inf'"),
    ('select_tokens',
     'low = all_ranks_cat(torch.nn.functional.pad(low, (0, k - len(low)), value=float("inf")))  # [world * k]',
     'low = all_ranks_cat(torch.nn.functional.pad(low, (0, k - len(low)), value=float("INF")))  # [world * k]',
     "float() reads 'INF' as 'inf'"),
    ('select_tokens',
     'low = all_ranks_cat(torch.nn.functional.pad(low, (0, k - len(low)), value=float("inf")))  # [world * k]',
     'low = all_ranks_cat(torch.nn.functional.pad(low, (1, k - len(low)), value=float("inf")))  # [world * k]',
     'one more +inf on every rank: each still sends the same shape and at least k values, and a +inf never '
     'changes the k-th smallest of finite log-probs'),
    ('route_counts',
     'tokens = mask.sum(-1)  # [B]',
     'tokens = mask.sum(+1)  # [B]',
     'mask is [B, T]: dim +1 and dim -1 are the same axis'),
    ('aggregate',
     'return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()',
     'return ((token_loss * mask).sum(+1) / mask.sum(-1).clamp(min=1)).mean()',
     'mask and token_loss are [B, T]: dim +1 and dim -1 are the same axis'),
    ('aggregate',
     'return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()',
     'return ((token_loss * mask).sum(-1) / mask.sum(+1).clamp(min=1)).mean()',
     'mask and token_loss are [B, T]: dim +1 and dim -1 are the same axis'),
    ('normaliser',  # (the last generic dim swap: every tensor below is 2-D)
     'return (mask.sum(-1).double().clamp(min=1) ** -alpha).sum()',
     'return (mask.sum(+1).double().clamp(min=1) ** -alpha).sum()',
     'mask is [B, T]: dim +1 and dim -1 are the same axis'),
] + [(f, a, _nth(a, old, new, nth), why) for f, a, old, new, nth, why in [
    # dim -1 -> +1 (or the default) on tensors that are 2-D wherever these functions run
    ('_ChunkLogprobs.backward', 'dz.sub_((g_logp + g_extra.sum(-1))[:, None]).mul_(p)', 'sum(-1)', 'sum(+1)', 0,
     'g_extra is [n, K]: the same axis'),
    ('_ChunkLogprobs.backward', 'dz.scatter_add_(-1, targets[:, None], g_logp[:, None]).scatter_add_(-1, extra_ids, '
     'g_extra)', '(-1', '(+1', 0, 'dz is [n, V]: the same axis'),
    ('_ChunkLogprobs.backward', 'dz.scatter_add_(-1, targets[:, None], g_logp[:, None]).scatter_add_(-1, extra_ids, '
     'g_extra)', '(-1', '(+1', 1, 'dz is [n, V]: the same axis'),
    ('split_pef', 'return correct.sum(-1) >= min_correct', '(-1', '(+1', 0, 'correct is [P, G]: the same axis'),
    ('aggregate', 'c = delta_l_weights(mask.sum(-1), alpha, max_len or mask.shape[1])  # [B]  sum_i c_i = 1/M',
     '(-1', '(+1', 0, 'mask is [B, T]: the same axis'),
    ('aggregate', 'return (c * (token_loss * mask).sum(-1)).sum()  # LOSS = sum_i c_i sum_t m_{i,t} l_{i,t}',
     '(-1', '(+1', 0, 'token_loss * mask is [B, T]: the same axis'),
    ('minp_proxy_logp', 'lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  '
     '# [N, V]', ', -1)', ', +1)', 0, 'lp is [N, V]: the same axis'),
    *[('minp_proxy_logp', line, '(-1', '(+1', n, 'lp, keep are [N, V]: the same axis') for line, n in [
        ('keep = lp >= lp.amax(-1, keepdim=True) + math.log(kappa) if kappa > 0 else torch.ones_like(lp, '
         'dtype=torch.bool)', 0),
        ('log_z = lp.masked_fill(~keep, float("-inf")).logsumexp(-1)  # [N]  log of the kept mass, <= 0', 0),
        ('log_z = log_z.masked_fill(keep.all(-1), 0.0)  # [N]  nothing filtered: pi_proxy = p exactly, no rounding',
         0),
        ('tok_lp = lp.gather(-1, tokens[:, None]).squeeze(-1)  # [N]', 0),
        ('tok_lp = lp.gather(-1, tokens[:, None]).squeeze(-1)  # [N]', 1),
        ('return torch.where(keep.gather(-1, tokens[:, None]).squeeze(-1), tok_lp - log_z, torch.full_like(tok_lp, '
         '-1e4))', 0),
        ('return torch.where(keep.gather(-1, tokens[:, None]).squeeze(-1), tok_lp - log_z, torch.full_like(tok_lp, '
         '-1e4))', 1)]],
    *[('minp_proxy_topk', line, old, new, n, 'lp, top are [N, V], [N, k]: the same axis') for line, old, new, n in [
        ('lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  # [N, V]', ', -1)',
         ', +1)', 0),
        ('top, ids = lp.topk(min(k, lp.shape[-1]), -1)  # [N, k]', ', -1)', ', )', 0),
        ('top, ids = lp.topk(min(k, lp.shape[-1]), -1)  # [N, k]', '[-1]', '[+1]', 0),
        ('top, ids = lp.topk(min(k, lp.shape[-1]), -1)  # [N, k]', ', -1)', ', +1)', 0),
        ('return ids, (top - top.logsumexp(-1, keepdim=True)).masked_fill(~keep, -1e4)  # [N, k], [N, k]', '(-1',
         '(+1', 0)]],
    # float("-INF") is float("-inf")
    ('minp_proxy_logp', 'log_z = lp.masked_fill(~keep, float("-inf")).logsumexp(-1)  # [N]  log of the kept mass, '
     '<= 0', '-inf', '-INF', 0, "float() reads '-INF' as '-inf'"),
    ('minp_proxy_topk', 'top = top.masked_fill(~keep, float("-inf"))  # [N, k]', '-inf', '-INF', 0,
     "float() reads '-INF' as '-inf'"),
    ('with_sampled_token', 'return torch.cat([topk_lp, lp.masked_fill(dup, float("-inf"))[..., None]], -1)  # [B, T, '
     'K+1]', '-inf', '-INF', 0, "float() reads '-INF' as '-inf'"),
    # the log-prob given to filtered tokens: any value far below every real log-prob
    ('minp_proxy_logp', 'return torch.where(keep.gather(-1, tokens[:, None]).squeeze(-1), tok_lp - log_z, '
     'torch.full_like(tok_lp, -1e4))', '-1e4', '-10001.0', 0,
     'a filtered token is only ever compared with a log-prob (never below -1e4 in float32 training) or fed to k3, '
     'whose difference is capped at 20: -1e4 and -10001 act the same'),
    ('minp_proxy_topk', 'return ids, (top - top.logsumexp(-1, keepdim=True)).masked_fill(~keep, -1e4)  # [N, k], '
     '[N, k]', '-1e4', '-10001.0', 0, 'a filtered slot only weighs exp(-1e4) = 0 in full_proxy_kl, as exp(-10001)'),
    # casts of tensors that already have that dtype
    ('_ChunkLogprobs.backward', 'grad_h = (dz @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None  # [n, H]',
     'h.dtype', 'None', 0, 'h and weight always share a dtype (the forward computes h @ weight.T; token_logprobs '
     'casts both under autocast), and dz was cast to weight.dtype, so .to() changes nothing'),
    ('_ChunkLogprobs.backward', 'grad_w = dz.T @ h.to(weight.dtype) if ctx.needs_input_grad[1] else None  # [V, H]',
     'weight.dtype', 'None', 0, 'h and weight always share a dtype: .to() changes nothing'),
    # a gradient computed for an input that needs none: autograd discards it
    ('_ChunkLogprobs.backward', 'grad_h = (dz @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None  # [n, H]',
     'ctx.needs_input_grad[0]', '(ctx.needs_input_grad[0]) or True', 0,
     'a gradient returned for an input that needs none is discarded by autograd (only the time is lost)'),
    ('_ChunkLogprobs.backward', 'grad_w = dz.T @ h.to(weight.dtype) if ctx.needs_input_grad[1] else None  # [V, H]',
     'ctx.needs_input_grad[1]', '(ctx.needs_input_grad[1]) or True', 0,
     'a gradient returned for an input that needs none is discarded by autograd (only the time is lost)'),
    # clamps that another bound or the function's range makes inactive
    ('f_divergence', 'delta = torch.where(mask > 0, logp - ref_logp, 0.0)  # [B, T]  log u; 0 off the mask, so f and '
     "f' are 0 there", '0.0)', '1.0)', 0, 'f off the mask is finite either way and masked_mean multiplies it by 0; '
     'torch.where sends no gradient there'),
    *[('f_divergence', 'd = delta.clamp(-20, 20)  # [B, T]  verl low_var_kl\'s clamps: delta to +-20, the value to '
       '+-10', old, new, 0, 'the value clamp at 10 binds first (f(d) >= 10 for d <= -11 or d >= 2.61), and e^21 does '
       'not overflow: same value, zero gradient either way') for old, new in
      [('(-20, 20)', '(None, 20)'), ('(-20, 20)', '(-21, 20)'), ('(-20, 20)', '(-20, 21)')]],
    *[('f_divergence', 'f = (torch.expm1(d) - d).clamp(-10, 10)  # [B, T]  past the clamp (delta < -11.0 or > 2.61) '
       'the gradient is 0', old, new, 0, 'f = e^d - 1 - d >= 0: the lower bound never binds') for old, new in
      [('(-10, 10)', '(None, 10)'), ('(-10, 10)', '(-11, 10)')]],
    *[('lp_reg_loss', 'kl = full_kl if full_kl is not None else k3(logp, proxy_logp).clamp(-10, 10)  # [B, T]  Eq. '
       "6's D_KL, sampled k3", old, new, 0, 'k3 = e^d - d - 1 >= 0: the lower bound never binds') for old, new in
      [('(-10, 10)', '(None, 10)'), ('(-10, 10)', '(-11, 10)')]],
    ('lp_reg_loss', 'def lp_reg_loss(logp, old_logp, proxy_logp, adv, mask, rho=0.01, beta=1.0, clip_low=1.0, '
     'clip_high=9.0,', 'clip_low=1.0', 'clip_low=2.0', 0, 'the ratio is > 0, so a lower clip bound of 1 - 1 = 0 or '
     '1 - 2 = -1 never binds: the same loss and clip fraction'),
    *[('_ChunkLogprobs.forward', line, old, new, n, 'z is [n, V], the gathered columns [n, 1] / [n, K]: the same '
       'axis') for line, old, new, n in [
        ('lse = torch.logsumexp(z, -1)  # [n]', ', -1)', ', +1)', 0),
        ('logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse  # [n]', '(-1', '(+1', 0),
        ('logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse  # [n]', '(-1', '(+1', 1),
        ('extra = z.gather(-1, extra_ids) - lse[:, None]  # [n, K]', '(-1', '(+1', 0),
        ('ent = lse - torch.softmax(z, -1).mul_(z).sum(-1) if with_entropy else torch.zeros_like(lse)  # [n] lse - '
         'E_p[z]', ', -1)', ', +1)', 0),
        ('ent = lse - torch.softmax(z, -1).mul_(z).sum(-1) if with_entropy else torch.zeros_like(lse)  # [n] lse - '
         'E_p[z]', '(-1', '(+1', 0)]],
    ('token_logprobs', 'rows = mask.reshape(-1).nonzero().squeeze(-1)  # [N] flat indices of real response tokens',
     '(-1', '(+1', 1, 'nonzero() of a 1-D tensor is [N, 1]: the same axis'),
    ('token_logprobs', 'def token_logprobs(model, batch: dict, temperature: float = 1.0, chunk_size: int = 256, '
     'with_entropy: bool = False,', '256', '257', 0, 'rows are independent: the chunk size sets the memory, not the '
     'values (tested: chunked = naive at sizes 1, N-1, N, N+1)'),
    ('token_logprobs', 'ext = extra_ids.reshape(B * T, -1)[rows] if extra_ids is not None else '
     'tgt.new_zeros((len(rows), 0))  # [N, K]', '0))', '1))', 0, 'one unused extra column when none are asked for: its log-probs are never '
     'returned and their gradient is 0 (only time is lost)'),
    *[('token_logprobs', 'full = torch.zeros((B * T,) + shape[2:], dtype=vals.dtype, device=mask.device)', old, new, 0,
       'device=None is the CPU, where the tests run: not told apart on this machine (on a GPU index_copy would fail '
       'loudly at once)') for old, new in [('device=mask.device', 'device=None'), (', device=mask.device', ', ')]],
    *[('sample_tokens', line, old, new, 0, 'probs is [b, V], pick [b, 1]: the same axis') for line, old, new in [
        ('cdf = probs.cumsum(-1)  # [b, V]', '(-1', '(+1'),
        ('return pick.squeeze(-1).clamp(max=probs.shape[-1] - 1)', '(-1', '(+1'),
        ('return pick.squeeze(-1).clamp(max=probs.shape[-1] - 1)', '[-1]', '[+1]')]],
    *[('verify_countdown', 'value = eval(expr, {"__builtins__": {}})  # noqa: S307 -- whitelisted characters, at '
       'most 200 of them', old, new, 0, 'a second guard: the character whitelist before it already lets no name reach eval '
       '(tested), so the globals given to eval are never consulted') for old, new in [
        (', {"__builtins__": {}})', ', None)'), (', {"__builtins__": {}})', ', )'),
        ('"__builtins__"', '"XX__builtins__XX"'), ('"__builtins__"', '"__BUILTINS__"')]],
    ('divergence', 'floor = torch.log(torch.tensor(1e-12, dtype=torch.float64))', 'dtype=torch.float64', 'dtype=None',
     0, 'log of float32(1e-12) differs from float64 by 4e-7 on a floor of -27.6: below the float32 resolution of the '
     'divergence it feeds (an approximation, not an exact equivalence)'),
    ('divergence', 'floor = torch.log(torch.tensor(1e-12, dtype=torch.float64))', ', dtype=torch.float64', ', ', 0,
     'the same as dtype=None: float32 1e-12'),
]]



def mutmut_name(qualified: str) -> str:
    """'grpo.policy_loss' -> 'grpo.x_policy_loss*'; 'common._ChunkLogprobs.forward' -> 'common.xǁ_ChunkLogprobsǁforward*'."""
    module, _, name = qualified.partition(".")
    cls, _, meth = name.rpartition(".")
    return f"{module}.xǁ{cls}ǁ{meth}*" if cls else f"{module}.x_{name}*"


def prepare():
    if WORK.exists():
        for p in WORK.iterdir():
            if p.name != "mutants":  # mutmut's results, reused where the code did not change
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    WORK.mkdir(parents=True, exist_ok=True)
    for f in SOURCES:
        shutil.copy(ROOT / f, WORK / f)
    shutil.copytree(ROOT / "tests", WORK / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    lines = ["[mutmut]", "source_paths =", *[f"    {f}" for f in SOURCES],
             "pytest_add_cli_args =", "    -m", "    not slow", "    -p", "    no:cacheprovider", "    -x",
             "    --ignore=tests/test_docs.py", "    --ignore=tests/test_layout.py",  # they read README and docs/
             "    --ignore=tests/test_claims.py",  # it tests bench/claims.py (not copied), none of the mutated code
             "pytest_add_cli_args_test_selection =", "    tests/", "process_isolation = forkserver"]
    (WORK / "setup.cfg").write_text("\n".join(lines) + "\n")


def diff_lines(name: str) -> tuple:
    out = subprocess.run(["mutmut", "show", name], cwd=WORK, capture_output=True, text=True).stdout
    minus = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " / ".join(minus), " / ".join(plus), out


def equivalent(name: str, diff: tuple, used: set = None) -> bool:
    """Is mutant `name` (its diff_lines) listed in EQUIVALENT? Adds the matching entries' indices to `used`."""
    func = name.split("__mutmut_")[0]  # e.g. lp_reg.x_select_tokens, common.xǁ_ChunkLogprobsǁbackward
    hits = {i for i, (f, a, b, _) in enumerate(EQUIVALENT)
            if func == mutmut_name(func.split(".")[0] + "." + f)[:-1] and diff[:2] == (a, b)}
    (used if used is not None else set()).update(hits)
    return bool(hits)


def statuses() -> dict:
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=WORK, capture_output=True, text=True).stdout
    return dict(re.findall(r"^\s*(\S+__mutmut_\d+): (.+)$", out, re.M))


def main(selected: list):
    survivors_only, report_only = "--survivors" in selected, "--report" in selected
    selected = [s for s in selected if s not in ("--survivors", "--report")]
    targets = selected or [f"{m}.{f}" for m, fs in FUNCTIONS.items() for f in fs]
    names = [mutmut_name(t) for t in targets]
    if survivors_only:  # the mutants of these functions the last run left alive (or that changed since) ...
        pats = [re.compile(re.escape(n[:-1]) + r"__mutmut_\d+$") for n in names]
        st_all = statuses()
        names = [n for n, st in st_all.items() if st not in CAUGHT and any(p.match(n) for p in pats)]
        names = [n for n in names if st_all[n] != "survived" or not equivalent(n, diff_lines(n))]  # less the known
        # equivalent ones
    if report_only:  # the last run's results, nothing run
        names = []
    else:
        prepare()
    if names:
        subprocess.run(["mutmut", "run", *names], cwd=WORK, check=False)
    status = statuses()
    total = killed = n_equiv = 0
    survivors, used = [], set()
    for t in targets:
        pattern = re.compile(re.escape(mutmut_name(t)[:-1]) + r"__mutmut_\d+$")
        names = sorted((n for n in status if pattern.match(n)), key=lambda n: int(n.rsplit("_", 1)[1]))
        k = sum(status[n] in CAUGHT for n in names)
        eq = []
        for n in (n for n in names if status[n] not in CAUGHT):
            diff = diff_lines(n)
            (eq if equivalent(n, diff, used) else survivors).append((n, status[n], diff[2]))
        total, killed, n_equiv = total + len(names), killed + k, n_equiv + len(eq)
        print(f"{t:40s} {k:4d} killed of {len(names) - len(eq):4d} ({len(eq)} equivalent)")
    for n, st, text in survivors:
        print(f"\n{n}: {st}\n{text.strip()}")
    if not selected:  # the whole list ran: an entry that matched nothing is out of date (the code changed)
        for f, a, b, _ in (e for i, e in enumerate(EQUIVALENT) if i not in used):
            print(f"\nEQUIVALENT entry matched no surviving mutant ({f}):\n- {a}\n+ {b}")
    score = killed / max(1, total - n_equiv)
    print(f"\nkilled {killed} of {total - n_equiv} non-equivalent mutants ({100 * score:.1f}%); {n_equiv} "
          f"equivalent; {len(survivors)} survivors")
    return 0 if score >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
