"""Seconds for one decode of the HF sampler (common.HFSampler) at Qwen's vocabulary: 8 GSM8K chat prompts x 8
samples x 24 new tokens on the Qwen2.5-shaped stand-in with 151,936 embedding rows (tests/standin.py).

python bench/decode_speed.py                      # prints the seconds and the tokens drawn
Compare two versions of common.py by running it, alternating, in a checkout of each (whole-process timing).
"""
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import torch  # noqa: E402

import common  # noqa: E402
import standin  # noqa: E402


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    path = str(standin.standin_path(rows=151936))
    model, tok, _ = common.load_model_and_tokenizer(path, torch.device("cpu"))
    _, test = common.load_task("gsm8k")
    prompts = common.encode_prompts(tok, test[:8])
    sampler = common.HFSampler(tok, common.stop_ids(tok, model))
    t = time.perf_counter()
    with torch.no_grad():
        out = sampler.generate(model, prompts, 8, 24, 1.0, seeds=list(range(8)))
    print(f"decode: {time.perf_counter() - t:.2f} s, {sum(map(len, out.response_ids))} tokens")


if __name__ == "__main__":
    main()
