"""AdamW steps on the Qwen2.5-shaped stand-in's parameters (tied 151,936 x 256 embedding + 4 layers: 43M floats):
the fused implementation (what the trainers pass), foreach, or torch's default, which on a CPU is a Python loop over
the tensors (foreach is its default on CUDA only). Prints the mean time of a step; compare in separate processes:

python bench/optimizer_step.py --impl fused
python bench/optimizer_step.py --impl default
"""
import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["fused", "foreach", "default"], default="fused")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    layer = [(256, 256), (256,), (128, 256), (128,), (128, 256), (128,), (256, 256),  # q, k, v (+ biases), o
             (1024, 256), (1024, 256), (256, 1024), (256,), (256,)]  # gate, up, down, 2 norms
    shapes = [(151936, 256)] + layer * 4 + [(256,)]  # the tied embedding, 4 layers, the final norm
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    kw = {"foreach": dict(foreach=True), "default": {}, "fused": dict(fused=True)}[a.impl]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, **kw)
    t = time.perf_counter()
    for _ in range(a.steps):
        opt.step()
    dt = (time.perf_counter() - t) / a.steps
    print(f"{a.impl}: {dt * 1e3:.0f} ms per step over {sum(p.numel() for p in params) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
