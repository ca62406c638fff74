"""Run under torchrun by test_grpo.py: train with grpo.main, then check that every rank holds the same weights."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402

args = HfArgumentParser(grpo.Args).parse_args_into_dataclasses()[0]
model = grpo.main(args)
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    (Path(args.output_dir) / "params_equal").write_text(str(all(torch.equal(gathered[0], g) for g in gathered)))
dist.barrier()  # all ranks leave together, then skip the interpreter's teardown: gloo's threads can
os._exit(0)  # abort it ("terminate called without an active exception", torch 2.13)
