"""Each paper's claim in miniature: a CPU setting where the method's mechanism has something to act on, the method
against GRPO under the identical budget (same task, seeds, steps, prompts x samples, sampler), 3 seeds.

pip install -r bench/requirements.txt
python bench/claims.py dppo      # one experiment (under 15 min on 2 cores); the names are EXPERIMENTS' keys
python bench/claims.py all       # all six, about an hour (runs already in --out are kept)

The settings, and why each gives the paper's mechanism something to act on, are each experiment's `why` below.
Every method keeps its paper's defaults; GRPO keeps grpo.py's. Two runs at a time, one thread each; finished runs
are kept in --out and not redone. Writes docs/claims.md (a section per experiment) and docs/claims_<name>.png, and
prints each section.
"""
import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from methods import ROOT, fmt, plot, run  # noqa: E402


def after(key):
    return lambda recs: next((r[key] for r in reversed(recs) if key in r), None)


def before(key):
    return lambda recs: next((r[key] for r in recs if key in r), None)


def last(key, n=20):  # mean of a per-step metric over the last n steps
    return lambda recs: statistics.mean([r[key] for r in recs if key in r][-n:]) if any(key in r for r in recs) \
        else None


def first(key, n=20):  # mean of a per-step metric over the first n steps
    return lambda recs: statistics.mean([r[key] for r in recs if key in r][:n])


def drop(key):  # the best evaluation minus the last: how far a run fell from its peak
    return lambda recs: max(v) - v[-1] if (v := [r[key] for r in recs if key in r]) else None


PASS_AT_K = dict(  # DPH-RL argues with pass@k: what the two DPH-RL experiments plot and tabulate
    keys=[("eval/pass@1", "held-out pass@1"), ("eval/pass@8", "held-out pass@8"),
          ("eval/pass@16", "held-out pass@16"), ("reward/mean", "training reward")],
    cols=[("pass@1 before", before("eval/pass@1")), ("pass@1 after", after("eval/pass@1")),
          ("pass@8 after", after("eval/pass@8")), ("pass@16 before", before("eval/pass@16")),
          ("pass@16 after", after("eval/pass@16")), ("D_pef prompts", after("pef/prompts"))])

EXPERIMENTS = {
    "delta_l": dict(
        title="ΔL on sum (answers 2-26 tokens)",
        why="ΔL (arXiv 2509.07558) is about aggregating per-token gradients over responses of very different lengths. "
            "The `sum` task (running totals of 1-10 digits, `Q:3,5,2 A:` -> `3,8,10`) has answers of 2 to ~26 tokens "
            "with EOS, a 13x spread, and its tiny model (1,000 warm-start steps) solves ~1/3 at the start (pass@1 "
            "before, below). Also measured: the gradient's coefficient of variation under each aggregation at "
            "the warm start, the quantity the paper's argument is about.",
        arms={"grpo_sum": ("grpo", ["--task", "sum"]), "delta_l_sum": ("delta_l", ["--task", "sum"])},
        steps=150, eval_every=50,
        keys=[("reward/mean", "training reward"), ("eval/pass@1", "held-out pass@1"),
              ("response/len", "response length"), ("perf/grad_norm", "gradient norm (before clipping)")],
        cols=[("pass@1 before", before("eval/pass@1")), ("pass@1 after", after("eval/pass@1")),
              ("pass@16 after", after("eval/pass@16")), ("reward, last 20", last("reward/mean")),
              ("length, last 20", last("response/len")), ("grad norm, last 20", last("perf/grad_norm"))]),
    "lp_reg": dict(
        title="Lp-Reg on sum",
        why="Lp-Reg (arXiv 2510.03222) regularises the lowest-probability rho = 1% of the negative-advantage tokens "
            "that its min-p proxy keeps. On countdown that is 0.3-0.4 tokens a step (nothing to act on); `sum`'s "
            "~18-token answers at ~1/3 reward give ~20 candidates a step and ~8 kept by the proxy filter "
            "(policy/lp_candidates, policy/lp_selected). GRPO's entropy falls over the run (0.17 -> 0.12).",
        arms={"grpo_sum": ("grpo", ["--task", "sum"]), "lp_reg_sum": ("lp_reg", ["--task", "sum"])},
        steps=150, eval_every=50,
        keys=[("policy/entropy", "policy entropy"), ("eval/pass@1", "held-out pass@1"),
              ("eval/pass@16", "held-out pass@16"), ("policy/lp_selected", "Lp-Reg: regularised tokens a step")],
        cols=[("pass@1 after", after("eval/pass@1")), ("pass@16 after", after("eval/pass@16")),
              ("entropy, first 20", first("policy/entropy")),
              ("entropy, last 20", last("policy/entropy")), ("pass@1 peak - last", drop("eval/pass@1")),
              ("|S| a step", last("policy/lp_selected", 10**9))]),
    "lp_reg_wide": dict(
        title="Lp-Reg on countdown, 128 prompts a step",
        why="The same claim where exploration visibly collapses: GRPO's held-out pass@16 on countdown falls from 0.91 "
            "to 0.69 in 200 steps (docs/methods.md), since many different expressions are correct and GRPO keeps "
            "few. At 32 prompts a step rho = 1% selects under one token a step there; 128 prompts x 8 samples (the "
            "batch, not a method setting: both arms get it) give ~6,000 tokens a step, several thousand of them with "
            "a negative advantage.",
        arms={"grpo_p128": ("grpo", ["--prompts_per_step", "128"]),
              "lp_reg_p128": ("lp_reg", ["--prompts_per_step", "128"])},
        steps=150, eval_every=50,
        keys=[("policy/entropy", "policy entropy"), ("eval/pass@1", "held-out pass@1"),
              ("eval/pass@16", "held-out pass@16"), ("policy/lp_selected", "Lp-Reg: regularised tokens a step")],
        cols=[("pass@1 after", after("eval/pass@1")), ("pass@16 before", before("eval/pass@16")),
              ("pass@16 after", after("eval/pass@16")),
              ("entropy, first 20", first("policy/entropy")),
              ("entropy, last 20", last("policy/entropy")), ("|S| a step", last("policy/lp_selected", 10**9))]),
    "dph_rl": dict(
        title="DPH-RL on countdown, split rule 4 of 4 (official code)",
        why="DPH-RL (arXiv 2509.07430) rehearses, with a mass-covering divergence to the initial policy, the prompts "
            "that policy already solves every time. The paper's rule (8 of 8 samples correct) holds for 7 of 2,000 "
            "countdown prompts with the tiny model, so it rehearses almost nothing; the official code's split script "
            "(scripts/llama/offline_sampling.sh) keeps prompts whose first 4 of 4 samples are correct, the rule used "
            "here: faithful to the official implementation, not to the paper's text.",
        arms={"grpo": ("grpo", []), "dph_rl_4of4": ("dph_rl", ["--pef_k", "4", "--pef_min_correct", "4"])},
        steps=200, eval_every=25,
        **PASS_AT_K),
    "dph_rl_strong": dict(
        title="DPH-RL on countdown from a stronger warm start (2,000 supervised steps), the paper's 8 of 8 rule",
        why="The paper's own rule with a policy that meets it as often as the paper's did: the tiny countdown model "
            "warm-started for 2,000 supervised steps instead of 500 (held-out pass@1 0.46, pass@16 0.98: the "
            "'before' columns) solves 8 of 8 samples on ~8% of the 5,000 training prompts (D_pef prompts), the "
            "share of D_pef the paper reports. Both arms start from that model (built once into the cache, "
            "~1.5 min) at the tiny model's learning rate.",
        warm_start=("countdown", 2000),
        arms={"grpo_strong": ("grpo", ["--lr", "3e-4"]), "dph_rl_strong": ("dph_rl", ["--lr", "3e-4"])},
        steps=200, eval_every=25,
        **PASS_AT_K),
    "dppo": dict(
        title="DPPO on countdown, bf16 sampler vs float32 trainer, 4 optimizer steps a batch",
        why="DPPO (arXiv 2602.04879) anchors its trust region to the rollout policy mu and argues that ratio "
            "clipping misbehaves under a training-inference mismatch and many optimizer steps a batch. Here the "
            "sampler computes in bf16 (`--sampler_dtype bfloat16`) beside the float32 trainer, a real mismatch whose "
            "log-probs are recorded as mu (both arms' ratios are pi / mu), with 4 optimizer steps a rollout batch "
            "(the paper's sanity test) and 400 steps. Evaluations also sample in bf16.",
        arms={"grpo_mb4_bf16": ("grpo", ["--sampler_dtype", "bfloat16", "--mini_batches", "4"]),
              "dppo_bf16": ("dppo", ["--sampler_dtype", "bfloat16", "--mini_batches", "4"])},
        steps=400, eval_every=50,
        keys=[("reward/mean", "training reward"), ("eval/pass@1", "held-out pass@1"),
              ("policy/ratio", "mean ratio pi / mu"), ("policy/entropy", "policy entropy")],
        cols=[("pass@1 after", after("eval/pass@1")), ("pass@1 peak - last", drop("eval/pass@1")),
              ("pass@16 after", after("eval/pass@16")), ("reward, last 20", last("reward/mean")),
              ("PPO would clip", lambda recs: last("policy/ppo_clipfrac", 10**9)(recs)
               or last("policy/clipfrac", 10**9)(recs)),
              ("DPPO masks", last("policy/masked_frac", 10**9))]),
}


HEAD = """# Each paper's claim in miniature (written by `python bench/claims.py all`)

Each method against GRPO in a CPU setting where its paper's mechanism has something to act on, under the identical
budget (task, seeds, steps, prompts x 8 samples a step, optimizer steps a batch, sampler). The methods keep their
papers' defaults; GRPO keeps grpo.py's. The verdicts are in the README. `docs/methods.md` is the other comparison:
every trainer at its defaults on countdown.

"""


def cv_table(out: Path) -> str:
    """ΔL's own argument: the gradient's coefficient of variation under each aggregation, on the sum task."""
    cmd = [sys.executable, str(ROOT / "bench" / "delta_l_cv.py"), "--settings", "sum"]
    f = out / "delta_l_cv.txt"
    if not f.exists():
        print("running bench/delta_l_cv.py --settings sum ...", flush=True)
        f.write_text(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    return f.read_text()


def prompts(ex: dict) -> int:
    extra = next(iter(ex["arms"].values()))[1]
    return int(extra[extra.index("--prompts_per_step") + 1]) if "--prompts_per_step" in extra else 32


def warm_started(family: str, steps: int) -> str:
    """The tiny model of a task family warm-started for `steps` supervised steps, built once into the cache."""
    from common import build_tiny, cache_root

    path = cache_root() / f"tiny-{family}-sft{steps}-v1"
    if not path.exists():
        print(f"building {path} ...", flush=True)
        build_tiny(family, path, sft_steps=steps)
    return str(path)


def experiment(name: str, seeds: list, out: Path, docs: Path) -> str:
    ex = EXPERIMENTS[name]
    if "warm_start" in ex:  # both arms start from the same stronger model
        path = warm_started(*ex["warm_start"])
        ex = {**ex, "arms": {k: (f, ["--model", path, *extra]) for k, (f, extra) in ex["arms"].items()}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs at a time on two cores
    jobs = [(arm, s) for s in seeds for arm in ex["arms"]]
    with ThreadPoolExecutor(2) as pool:
        recs = list(pool.map(lambda j: run(j[0], j[1], ex["steps"], ex["eval_every"], out, ex["arms"], env),
                             jobs))
    curves = {arm: [r for (a, _), r in zip(jobs, recs) if a == arm] for arm in ex["arms"]}
    names = [c for c, _ in ex["cols"]]
    lines = [f"| arm | {' | '.join(names)} |", "| --- |" + " --- |" * len(names)]
    for arm, runs in curves.items():
        cells = []
        for _, fn in ex["cols"]:
            vals = [fn(r) for r in runs]
            cells.append("–" if any(v is None for v in vals) else fmt(vals))
        flags = " ".join(EXPERIMENTS[name]["arms"][arm][1]) or "defaults"  # as listed (without a built --model)
        lines.append(f"| {arm} ({flags}) | " + " | ".join(cells) + " |")
    text = (f"## {name}: {ex['title']}\n\n{ex['why']}\n\n`python bench/claims.py {name}`: {len(seeds)} seeds "
            f"({', '.join(map(str, seeds))}), {ex['steps']} steps x {prompts(ex)} prompts x 8 samples, evaluations "
            f"every {ex['eval_every']} steps on 128 held-out prompts x 16 samples; mean ± std over seeds.\n\n"
            + "\n".join(lines) + f"\n\n![{name}](claims_{name}.png)\n")
    if name == "delta_l":
        text += "\nGradient CV at the warm start (`python bench/delta_l_cv.py --settings sum`):\n\n```\n" \
                + cv_table(out) + "```\n"
    try:
        plot(curves, docs / f"claims_{name}.png", ex["keys"], ex["title"])
    except ImportError:
        print("matplotlib not installed: no plot")
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=0)  # 0 = the experiment's; a quick look: --seeds 0 --steps 10
    ap.add_argument("--out", default="runs/bench_claims")
    ap.add_argument("--docs", default="docs")
    a = ap.parse_args()
    out, docs = ROOT / a.out, ROOT / a.docs
    docs.mkdir(exist_ok=True)
    (out).mkdir(parents=True, exist_ok=True)
    for name in EXPERIMENTS if a.experiment == "all" else [a.experiment]:
        if a.steps:
            EXPERIMENTS[name].update(steps=a.steps, eval_every=min(a.steps, EXPERIMENTS[name]["eval_every"]))
        text = experiment(name, a.seeds, out, docs)
        (out / f"{name}.md").write_text(text)
        print(text, flush=True)
    sections = [(out / f"{n}.md").read_text() for n in EXPERIMENTS if (out / f"{n}.md").exists()]
    (docs / "claims.md").write_text(HEAD + "\n".join(sections))


if __name__ == "__main__":
    main()
