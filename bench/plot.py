"""Plot learning curves from one or more runs' metrics.jsonl.

python bench/plot.py runs/grpo --out docs/grpo_curve.png
python bench/plot.py grpo=runs/grpo dph_rl=runs/dph_rl --out docs/dph_vs_grpo.png
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(run: str):
    label, _, path = run.rpartition("=")
    path = Path(path)
    recs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()[1:] if x.strip()]
    return label or path.name, recs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run folders, optionally as label=folder")
    ap.add_argument("--out", default="docs/curve.png")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window for the training reward")
    a = ap.parse_args()
    panels = [("reward/mean", "training reward (moving avg)"), ("eval/pass@1", "held-out pass@1"),
              ("eval/pass@8", "held-out pass@8"), ("eval/greedy_acc", "held-out greedy accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for run in a.runs:
        label, recs = load(run)
        for ax, (key, title) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if key == "reward/mean":
                w = a.smooth
                ys = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, label=label, marker="" if key == "reward/mean" else "o", ms=3)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
