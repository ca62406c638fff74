"""The paper table in miniature: all six trainers on the embedded countdown task, same seeds, same sample budget.

pip install -r bench/requirements.txt
python bench/methods.py                                # 6 trainers x 3 seeds x 200 steps, ~25 min on 2 cores
python bench/methods.py --seeds 0 --steps 50           # a quick look

Each run is `python <file> --seed S --max_steps N` with the file's own defaults (32 prompts x 8 samples per step for
every method, so the same number of sampled responses), in its own process, one at a time; `grpo_mb4` is grpo.py at
DPPO's default of 4 optimizer steps per rollout batch. Finished runs are kept in
--out and not redone. Writes docs/methods.md (the table) and docs/methods.png (curves averaged over seeds), and prints
the table last: held-out pass@1/8/16 (128 prompts x 16 samples) at step 0 and at the end, entropy and response length
over the last 10 steps, median seconds per step (sampling + scoring + log-probs + updates, the method's one-off
preparation excluded), each as mean ± std over seeds.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["grpo", "dph_rl", "lp_reg", "rl_plus", "delta_l", "dppo", "grpo_mb4"]
VARIANTS = {"grpo_mb4": ("grpo", ["--mini_batches", "4"])}  # GRPO at DPPO's 4 optimizer steps per rollout batch


def run(method: str, seed: int, steps: int, eval_every: int, out: Path, arms: dict = VARIANTS, env=None) -> list:
    """One run of `method` (a trainer's name, or a key of `arms`: name -> (trainer, extra flags)), kept in out."""
    d = out / f"{method}_s{seed}"
    f = d / "metrics.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
    if not recs or recs[-1].get("step") != steps or "eval/pass@1" not in recs[-1]:
        print(f"running {method} seed {seed} ...", flush=True)
        file, extra = arms.get(method, (method, []))
        res = subprocess.run([sys.executable, str(ROOT / f"{file}.py"), "--seed", str(seed), "--max_steps",
                              str(steps), "--eval_every", str(eval_every), "--log_examples_every", "0", "--save_every",
                              "100000", "--output_dir", str(d), "--overwrite", "true", *extra],  # unfinished: anew
                             capture_output=True, text=True, cwd=ROOT, env=env)
        if res.returncode:
            raise SystemExit(f"{method} seed {seed} failed:\n{res.stderr[-3000:]}")
        recs = [json.loads(x) for x in f.read_text().splitlines()]
    return recs[1:]


def summary(recs: list) -> dict:
    steps = [r for r in recs if "reward/mean" in r]
    first, last = recs[0], recs[-1]
    out = {f"{k} before": first[f"eval/{k}"] for k in ("pass@1", "pass@8", "pass@16")}
    out.update({f"{k} after": last[f"eval/{k}"] for k in ("pass@1", "pass@8", "pass@16")})
    out["entropy"] = statistics.mean(r["policy/entropy"] for r in steps[-10:])
    out["length"] = statistics.mean(r["response/len"] for r in steps[-10:])
    out["s/step"] = statistics.median(sum(v for k, v in r.items() if k.startswith("perf/") and k.endswith("_s"))
                                      for r in steps)
    return out


def fmt(vals: list) -> str:
    m = statistics.mean(vals)
    return f"{m:.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{m:.3f}"


KEYS = [("reward/mean", "training reward (10-step avg)"), ("eval/pass@1", "held-out pass@1"),
        ("eval/pass@8", "held-out pass@8"), ("policy/entropy", "policy entropy (10-step avg)")]


def plot(curves: dict, path: Path, keys: list = KEYS, title: str = None):
    """One panel per (metric, label): the mean over seeds of each method (evaluations with a mean +- std band over
    seeds; metrics logged every step smoothed over 10 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.25 * len(keys), 3.6))
    for method, runs in curves.items():
        for ax, (key, label) in zip(axes, keys):
            by_step = {}
            for recs in runs:
                for r in recs:
                    if key in r:
                        by_step.setdefault(r["step"], []).append(r[key])
            xs = sorted(by_step)
            ys = [statistics.mean(by_step[x]) for x in xs]
            if not key.startswith("eval"):
                ys = [statistics.mean(ys[max(0, i - 9): i + 1]) for i in range(len(ys))]
            line, = ax.plot(xs, ys, label=method, marker="o" if key.startswith("eval") else "", ms=3)
            if key.startswith("eval") and len(runs) > 1:  # the spread between seeds: mean +- std
                sd = [statistics.stdev(by_step[x]) if len(by_step[x]) > 1 else 0.0 for x in xs]
                ax.fill_between(xs, [y - d for y, d in zip(ys, sd)], [y + d for y, d in zip(ys, sd)],
                                color=line.get_color(), alpha=0.15)
            ax.set_title(label)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--out", default="runs/bench_methods")
    ap.add_argument("--docs", default="docs")
    a = ap.parse_args()
    out, docs = ROOT / a.out, ROOT / a.docs
    curves = {m: [run(m, s, a.steps, a.eval_every, out) for s in a.seeds] for m in a.methods}
    cols = ["pass@1 before", "pass@1 after", "pass@8 before", "pass@8 after", "pass@16 before", "pass@16 after",
            "entropy", "length", "s/step"]
    lines = [f"| method | {' | '.join(cols)} |", "| --- |" + " --- |" * len(cols)]
    for m, runs in curves.items():
        sums = [summary(r) for r in runs]
        lines.append(f"| {m} | " + " | ".join(fmt([s[c] for s in sums]) for c in cols) + " |")
    table = (f"{len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}), {a.steps} steps x 32 prompts x 8 samples, "
             f"embedded tiny model on countdown; mean ± std over seeds.\n\n" + "\n".join(lines) + "\n")
    docs.mkdir(exist_ok=True)
    (docs / "methods.md").write_text("# The methods side by side (written by `python bench/methods.py`)\n\n" + table)
    try:
        plot(curves, docs / "methods.png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(table)


if __name__ == "__main__":
    main()
