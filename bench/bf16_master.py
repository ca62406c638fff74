"""Why the trainers keep float32 master weights: how many weights a few AdamW steps at a small lr actually change.

python bench/bf16_master.py                       # the stand-in's weights, 3 steps at lr 1e-6
python bench/bf16_master.py --steps 10 --lr 1e-5

The same weights (tests/standin.py, the Qwen-shaped stand-in) and the same random gradients, in two set-ups:
  bf16     weights and AdamW state in bfloat16, as when a model is loaded in bf16 and trained as it is;
  float32  float32 master weights and AdamW state (what the trainers do; the forward runs in bf16 under autocast).
Prints the share of weights that differ from the start after the steps. AdamW's first steps move every weight by
about lr, far below bf16's resolution (2^-8 relative) for most weights, so in bf16 most updates round to nothing.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import standin  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def moved_share(dtype: torch.dtype, steps: int, lr: float, seed: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(standin.standin_path(), dtype=dtype)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)  # the same gradients for both set-ups
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    changed = sum((p.detach() != s).sum().item() for p, s in zip(model.parameters(), start))
    return changed / sum(s.numel() for s in start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"| weights and AdamW state | weights changed after {a.steps} steps at lr {a.lr:g} |\n| --- | --- |")
    for name, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
        print(f"| {name} | {100 * moved_share(dtype, a.steps, a.lr, a.seed):.1f}% |")


if __name__ == "__main__":
    main()
