"""Peak memory of one training step on the Qwen-shaped stand-in (CPU), against weights + gradients + AdamW state.

python bench/train_memory.py                  # 8 prompts x 8 samples, 128 new tokens, micro-batches of 8, beta 0.1
python bench/train_memory.py --hidden 896 --max_new_tokens 64   # Qwen2.5-0.5B's width

One step of grpo.py's update, done here with the library functions so that the old code can run it too: a reference
pass (beta > 0), then micro-batched forward + backward of the PPO loss, then the AdamW step. Variants, each in its own
process, on the same batch (sampled once, saved):
  before      common.py of commit 5fb0cf9 (the last before this benchmark): every layer's hidden states kept
              (output_hidden_states=True), the reference pass over the whole batch at once;
  after       this checkout's common.py: only the final hidden state, the reference pass by micro-batch;
  after + gc  the same with --gradient_checkpointing (each decoder layer recomputed in backward).
Peak = ru_maxrss over the step minus the RSS after the model, its gradients and the AdamW state exist (the state is
allocated by one zero step first), with MALLOC_MMAP_THRESHOLD_ so freed blocks return to the OS. float32 throughout.
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
BEFORE = "5fb0cf9"


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_common(variant: str):
    if variant == "before":
        src = subprocess.run(["git", "show", f"{BEFORE}:common.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        path = Path(tempfile.mkdtemp()) / "common_before.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("common_before", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    import common
    return common


def step(variant: str, model_path: str, batch_path: str, mb: int) -> dict:
    import copy

    import torch

    import common
    import grpo

    lib = load_common(variant)
    model = common.load_model_and_tokenizer(model_path, torch.device("cpu"))[0]
    if variant == "after+gc":
        model.gradient_checkpointing_enable({"use_reentrant": False})
    ref = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():  # allocate gradients and AdamW's moments before measuring
        p.grad = torch.zeros_like(p)
    opt.step()
    batch = torch.load(batch_path)
    n_params = sum(p.numel() for p in model.parameters())
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = rss_mb()
    with torch.no_grad():  # the reference pass
        if variant == "before":
            batch["ref_logp"] = lib.token_logprobs(ref, batch, 1.0, 256)["logp"]
        else:
            batch["ref_logp"] = lib.token_logprobs_nograd(ref, batch, mb, temperature=1.0, chunk_size=256)["logp"]
    model.train()
    for s in range(0, len(batch["mask"]), mb):
        micro = {k: v[s: s + mb] for k, v in batch.items()}
        out = lib.token_logprobs(model, micro, 1.0, 256, with_entropy=True)
        loss, _ = grpo.policy_loss(out["logp"], micro["old_logp"], micro["adv"], micro["mask"], ref_logp=micro["ref_logp"],
                                   beta=0.1)
        (loss * grpo.micro_weight(micro["mask"], batch["mask"], "token-mean")).backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "peak_over_state_mb": peak - base, "state_mb": 16 * n_params / 2**20,
            "base_rss_mb": base, "rows": len(batch["mask"]), "tokens": int(batch["attention_mask"].sum())}


def make_batch(model_path: str, prompts: int, max_new: int, out: str):
    import torch

    import common

    model, tok, _ = common.load_model_and_tokenizer(model_path, torch.device("cpu"))
    data = common.load_task("gsm8k")[0] if (common.shared_data_dir() / "gsm8k_train.jsonl").exists() \
        else common.load_task("arithmetic")[0]
    s = common.HFSampler(tok, common.stop_ids(tok, model)).generate(
        model, common.encode_prompts(tok, data[:prompts]), 8, max_new, 1.0, seeds=common.stream_seeds((0,), prompts))
    batch = common.collate(s, tok.pad_token_id, "cpu")
    batch["adv"] = torch.randn(len(s.response_ids), generator=torch.Generator().manual_seed(0))  # a live gradient
    torch.save(batch, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--micro_batch_size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256, help="896 = Qwen2.5-0.5B's width (14 heads of 64)")
    ap.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(step(a.case[0], a.case[1], a.case[2], int(a.case[3]))))
        return
    import standin

    shape = {k: v for k, v in (("layers", a.layers), ("hidden", a.hidden)) if v != {"layers": 4, "hidden": 256}[k]}
    if a.hidden != 256:
        shape.update(heads=a.hidden // 64, intermediate=4 * a.hidden)
    path = str(standin.standin_path(rows=151936, **shape))
    batch = Path(tempfile.mkdtemp()) / "batch.pt"
    make_batch(path, a.prompts, a.max_new_tokens, str(batch))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    res = []
    for variant in ("before", "after", "after+gc"):
        p = subprocess.run([sys.executable, __file__, "--case", variant, path, str(batch), str(a.micro_batch_size)],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        res.append(json.loads(p.stdout.strip().splitlines()[-1]))
    r0 = res[0]
    print(f"\nstand-in: V = 151,936, hidden {a.hidden}, {a.layers} layers; {r0['rows']} rows, {r0['tokens']} tokens, "
          f"micro-batches of {a.micro_batch_size}, beta 0.1, float32\n")
    print("| variant | weights + grads + AdamW MB | peak over them MB | ratio |\n| --- | --- | --- | --- |")
    for r in res:
        print(f"| {r['variant']} | {r['state_mb']:.0f} | {r['peak_over_state_mb']:.0f} | "
              f"{r['peak_over_state_mb'] / r['state_mb']:.2f} |")


if __name__ == "__main__":
    main()
