"""Sampling memory against the number of generated tokens, at Qwen's vocabulary (151,936 embedding rows).

python bench/sampler_memory.py                      # 64 rows (8 prompts x 8), 4 / 16 / 64 / 128 new tokens
python bench/sampler_memory.py --tokens 4 64 --rows 32

Two samplers on the same stand-in (tests/standin.py with 151,936 rows, hidden 256, 4 layers; float32), the same
chat-templated prompts, each case in its own process, peak RSS over the sampling call minus the RSS before it:
  ours      common.HFSampler: the decode loop that keeps the sampled token's log-prob per step (and the top-K
            when asked), so only the KV cache grows with the response;
  generate  transformers `generate(..., output_scores=True)` followed by a log-softmax of the kept scores: what
            the trainers did before (a float32 [rows, V] tensor kept per generated token, plus a copy).
The KV cache of the longest case is printed beside, as the part that must grow.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def case(method: str, rows: int, tokens: int) -> dict:
    import torch

    import common
    import standin

    torch.manual_seed(0)
    path = standin.standin_path(rows=151936)
    model, tok, _ = common.load_model_and_tokenizer(str(path), torch.device("cpu"))
    data = common.load_task("gsm8k")[0] if (common.shared_data_dir() / "gsm8k_train.jsonl").exists() \
        else common.load_task("arithmetic")[0]
    prompts = common.encode_prompts(tok, data[: rows // 8])
    try:  # reset the high-water mark so ru_maxrss measures this call only (where the kernel allows it)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = rss_mb()
    t = time.perf_counter()
    if method == "ours":
        sampler = common.HFSampler(tok, common.stop_ids(tok, model))
        out = sampler.generate(model, prompts, 8, tokens, 1.0, seeds=common.stream_seeds((0,), len(prompts)))
        n = sum(map(len, out.response_ids))
    else:
        from transformers import GenerationConfig

        flat = [p for p in prompts for _ in range(8)]
        width = max(map(len, flat))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in flat])
        attn = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in flat])[:, None]).long()
        cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                               min_new_tokens=tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               return_dict_in_generate=True, output_scores=True)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=attn, generation_config=cfg)
            steps = [torch.log_softmax(s.float(), -1) for s in gen.scores]  # T x [rows, V]
            n = sum(s.shape[0] for s in steps)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * rows * (width_of(prompts) + tokens)
    return {"method": method, "rows": rows, "tokens": tokens, "peak_mb": peak - before, "wall_s": wall,
            "generated": n, "kv_cache_mb": kv / 2**20}


def width_of(prompts) -> int:
    return max(map(len, prompts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4, 16, 64, 128])
    ap.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(case(a.case[0], int(a.case[1]), int(a.case[2]))))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}  # freed big blocks go back to the OS
    subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'tests')]!r}; "
                    "import standin; standin.standin_path(rows=151936)"], check=True, env=env)  # build once
    rows = []
    for tokens in a.tokens:
        for method in ("ours", "generate"):
            p = subprocess.run([sys.executable, __file__, "--case", method, str(a.rows), str(tokens)],
                               capture_output=True, text=True, env=env)
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                        {"method": method, "tokens": tokens, "error": p.stderr.strip().splitlines()[-1][:80]})
    print(f"\n{a.rows} rows, V = 151,936, hidden 256, 4 layers, float32, torch {__import__('torch').__version__}\n")
    print("| new tokens | sampler | peak MB over the call | wall s | KV cache MB |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['tokens']} | {r['method']} | failed: {r['error']} | | |")
        else:
            print(f"| {r['tokens']} | {r['method']} | {r['peak_mb']:.0f} | {r['wall_s']:.1f} | {r['kv_cache_mb']:.0f} |")


if __name__ == "__main__":
    main()
