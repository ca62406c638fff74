"""One GPU, one command: the real-model path at Qwen2.5-0.5B's shape, timed and measured.

python bench/gpu_check.py                       # CUDA, bf16 compute, float32 master weights; about 3 minutes
python bench/gpu_check.py --device cpu --small  # what CI can run: the same code at toy sizes (a few seconds)

Needs torch + transformers only (no vLLM, no internet, no math-verify: the task is the built-in `arithmetic`).
It builds a Qwen2.5-0.5B-shaped stand-in (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, tied
embeddings, 151,936 embedding rows, random weights; tests/standin.py), runs `--steps` GRPO steps of grpo.py's own
main() through the decode-loop sampler, and prints one table:
  - sampling tokens/s (generated tokens per second of the sampling phase);
  - training tokens/s (response tokens, plus each distinct prompt once, per second of the update phase) and its
    model-FLOPs utilisation against the card's bf16 peak: 6 * parameters * tokens / time (tied embeddings: the
    lm_head's matmul is the embedding's one use with FLOPs; attention's quadratic term ignored);
  - the measured bf16 matmul peak of this card (an 8192^3 matmul), as a second yardstick for the MFU;
  - peak GPU memory of a training step against weights + gradients + AdamW state (16 bytes per parameter);
  - the per-token memory of common.token_logprobs with gradients at V = 151,936, against bf16 logits (2 V bytes);
  - the bf16 gap between the sampler's behaviour log-probs and the trainer's recomputed ones on the same tokens
    (mean and max |delta logp|, and the first step's mean ratio).
Random weights sample all max_new tokens and earn reward 0, so the update has zero advantages: its forward and
backward cost the same as a real one, which is what is measured here.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
import grpo  # noqa: E402
import standin  # noqa: E402

BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense, datasheets
QWEN_05B = dict(rows=151936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864)
SMALL = dict(rows=0, hidden=64, layers=2, heads=1, kv_heads=1, intermediate=128)  # rows 0: the tokenizer's size


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n=8192, reps=20) -> float:
    """Achieved bf16 FLOP/s of one large square matmul (the card's practical ceiling)."""
    if device.type != "cuda":
        n, reps = 512, 3
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def logprob_memory(model, device, n_tokens: int) -> float:
    """Peak extra bytes per token of token_logprobs with gradients (bf16 autocast), for n_tokens response tokens."""
    V, H = common.output_weight(model).shape
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = {"input_ids": torch.randint(0, V, (1, n_tokens + 1), generator=g).to(device),
             "attention_mask": torch.ones(1, n_tokens + 1, dtype=torch.long, device=device),
             "response_ids": torch.randint(0, V, (1, n_tokens), generator=g).to(device),
             "mask": torch.ones(1, n_tokens, device=device)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with common.autocast(device, torch.bfloat16):
        out = common.token_logprobs(model, batch, 1.0, with_entropy=True)
    (out["logp"].sum() + out["entropy"].sum()).backward()
    model.zero_grad(set_to_none=True)
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated() - before) / n_tokens


def logprob_gap(model, tok, device, n_prompts: int, max_new: int) -> dict:
    """bf16 sampler log-probs against the bf16 trainer's recomputation of the same tokens."""
    train, _ = common.load_task("arithmetic")
    prompts = common.encode_prompts(tok, train[:n_prompts])
    sampler = common.HFSampler(tok, common.stop_ids(tok, model), torch.bfloat16)
    s = sampler.generate(model, prompts, 4, max_new, 1.0, seeds=common.stream_seeds((0, "gap"), n_prompts))
    batch = common.collate(s, tok.pad_token_id, device)
    with common.autocast(device, torch.bfloat16):
        logp = common.token_logprobs_nograd(model, batch, 16, temperature=1.0)["logp"]
    m = batch["mask"].bool()
    d = (logp - batch["old_logp"])[m].abs()
    return {"gap_mean": d.mean().item(), "gap_max": d.max().item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="toy sizes (CI): checks the code path, not the figures")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--micro_batch_size", type=int, default=32)
    ap.add_argument("--logprob_tokens", type=int, default=16384)
    ap.add_argument("--json", default="", help="also write the figures to this file")
    a = ap.parse_args()
    if a.small:
        a.steps, a.prompts, a.group_size, a.max_new_tokens, a.micro_batch_size, a.logprob_tokens = 2, 2, 2, 8, 4, 64
    device = torch.device(a.device)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    t0 = time.perf_counter()
    path = standin.build_standin(work / "standin", **(SMALL if a.small else QWEN_05B))
    build_s = time.perf_counter() - t0

    args = grpo.Args(model=str(path), task="arithmetic", backend="hf", device=a.device, dtype="bfloat16",
                     max_steps=a.steps, prompts_per_step=a.prompts, group_size=a.group_size,
                     max_new_tokens=a.max_new_tokens, micro_batch_size=a.micro_batch_size, eval_every=0,
                     eval_prompts=max(2, a.prompts // 4), eval_samples=2, log_examples_every=0, save_every=10**6,
                     output_dir=str(work / "run"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = grpo.main(args)
    run_s = time.perf_counter() - t0
    peak_train = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    recs = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()[1:]]
    steps = [r for r in recs if "perf/sample_s" in r][1:] or [r for r in recs if "perf/sample_s" in r]  # drop warm-up

    n_params = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    V, H = common.output_weight(model).shape
    tok = common.load_model_and_tokenizer(str(path), torch.device("cpu"))[1]
    prompt_len = sum(map(len, common.encode_prompts(tok, common.load_task("arithmetic")[0][:64]))) / 64
    rows = a.prompts * a.group_size
    gen_tokens = [rows * r["response/len"] for r in steps]
    train_tokens = [rows * r["response/len"] + a.prompts * prompt_len for r in steps]  # each prompt once per group
    sample_tps = sum(gen_tokens) / sum(r["perf/sample_s"] for r in steps)
    train_tps = sum(train_tokens) / sum(r["perf/update_s"] for r in steps)
    flops_per_token = 6 * n_params  # forward + backward; the tied embedding's one use with FLOPs is the lm_head
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), float("nan"))
    measured = matmul_peak(device)
    state_bytes = 16 * n_params  # float32 weights + gradients + AdamW's two moments
    per_token = logprob_memory(model.to(device), device, a.logprob_tokens)
    gap = logprob_gap(model, tok, device, min(16, a.prompts), a.max_new_tokens)

    fig = {"device": name, "params": n_params, "vocab_rows": V, "hidden": H, "steps_timed": len(steps),
           "build_s": build_s, "run_s": run_s, "sample_tokens_per_s": sample_tps, "train_tokens_per_s": train_tps,
           "mfu_vs_datasheet": train_tps * flops_per_token / peak, "measured_bf16_matmul_tflops": measured / 1e12,
           "mfu_vs_measured_matmul": train_tps * flops_per_token / measured,
           "peak_gpu_memory_gb": peak_train / 2**30, "weights_grads_adam_gb": state_bytes / 2**30,
           "logprob_bytes_per_token": per_token, "bf16_logits_bytes_per_token": 2 * V,
           "first_step_ratio": next(r["policy/ratio"] for r in recs if "policy/ratio" in r), **gap,
           "response_len": sum(r["response/len"] for r in steps) / len(steps), "prompt_len": prompt_len}
    print("\n| figure | value |\n| --- | --- |")
    for k, v in fig.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
