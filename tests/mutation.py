"""Mutation testing of the pure functions: would the unit tests notice a small bug planted in a loss, an advantage, an
aggregation, a divergence, a verifier, the log-probs or pass@k? Run it before sending a change to one of them:

    pip install mutmut==3.8.1
    python tests/mutation.py                        # every function below (about 25 minutes on 2 cores)
    python tests/mutation.py grpo.policy_loss       # one function (a minute or two)
    python tests/mutation.py --survivors            # only the mutants the last run did not kill (after a new test)

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
    "common": ["last_boxed", "extract_answer", "verify_countdown", "verify_arithmetic", "verify_math", "score",
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
    ('normaliser',
     'return (mask.sum(-1).double().clamp(min=1) ** -alpha).sum()',
     'return (mask.sum(+1).double().clamp(min=1) ** -alpha).sum()',
     'mask is [B, T]: dim +1 and dim -1 are the same axis'),
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
]


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
             "pytest_add_cli_args_test_selection =", "    tests/", "process_isolation = forkserver"]
    (WORK / "setup.cfg").write_text("\n".join(lines) + "\n")


def diff_lines(name: str) -> tuple:
    out = subprocess.run(["mutmut", "show", name], cwd=WORK, capture_output=True, text=True).stdout
    minus = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " / ".join(minus), " / ".join(plus), out


def statuses() -> dict:
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=WORK, capture_output=True, text=True).stdout
    return dict(re.findall(r"^\s*(\S+__mutmut_\d+): (.+)$", out, re.M))


def main(selected: list):
    survivors_only = "--survivors" in selected
    selected = [s for s in selected if s != "--survivors"]
    targets = selected or [f"{m}.{f}" for m, fs in FUNCTIONS.items() for f in fs]
    names = [mutmut_name(t) for t in targets]
    if survivors_only:  # the mutants of these functions the last run left alive (or that changed since)
        pats = [re.compile(re.escape(n[:-1]) + r"__mutmut_\d+$") for n in names]
        names = [n for n, st in statuses().items() if st != "killed" and any(p.match(n) for p in pats)]
    prepare()
    if names:
        subprocess.run(["mutmut", "run", *names], cwd=WORK, check=False)
    status = statuses()
    total = killed = equivalent = 0
    survivors = []
    for t in targets:
        pattern = re.compile(re.escape(mutmut_name(t)[:-1]) + r"__mutmut_\d+$")
        names = sorted((n for n in status if pattern.match(n)), key=lambda n: int(n.rsplit("_", 1)[1]))
        k = sum(status[n] == "killed" for n in names)
        eq = []
        for n in (n for n in names if status[n] != "killed"):
            minus, plus, text = diff_lines(n)
            why = [w for f, a, b, w in EQUIVALENT if t.endswith(f) and minus == a and plus == b]
            (eq if why else survivors).append((n, status[n], text))
        total, killed, equivalent = total + len(names), killed + k, equivalent + len(eq)
        print(f"{t:40s} {k:4d} killed of {len(names) - len(eq):4d} ({len(eq)} equivalent)")
    for n, st, text in survivors:
        print(f"\n{n}: {st}\n{text.strip()}")
    score = killed / max(1, total - equivalent)
    print(f"\nkilled {killed} of {total - equivalent} non-equivalent mutants ({100 * score:.1f}%); {equivalent} "
          f"equivalent; {len(survivors)} survivors")
    return 0 if score >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
