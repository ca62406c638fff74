"""Where grpo.py's step time goes at real shapes: the FLOPs of each part of one step against the time it took, as a
fraction of this CPU's measured matmul throughput.

python bench/where_time_goes.py                     # 8 prompts x 8 samples, 128 new tokens (3-4 minutes, 2 cores)
python bench/where_time_goes.py --new_tokens 256 --steps 2
python bench/where_time_goes.py --ops                # the operations of one update chunk of the log-prob forward

The step is grpo.py's own calls, in its order (HFSampler.generate, collate, token_logprobs + policy_loss + backward,
clip_grad_norm_, AdamW.step), on the Qwen2.5-shaped stand-in (tests/standin.py: hidden 256, 4 layers, intermediate
1024, 151,936 vocabulary rows) with chat-templated GSM8K prompts, float32, temperature 1. Timers are wrapped around
the parts from outside (forward hooks on the decoder and the LM head, full backward hooks on the decoder, wrappers
on _ChunkLogprobs and the optimizer): the trainer is not changed. The first step is a warm-up; the figures are the
medians of the others.

FLOPs are counted by hand (multiply-adds x 2) from the config and the token counts: "executed" is what the shapes
made the CPU compute (left-padded prompts, finished rows that keep decoding, responses padded to the longest), "real"
what the tokens needed. The matmul throughput is measured at the same shapes (torch.mm, float32, this process's
threads), best of 5, and at 1024 x 1024 x 1024 as this CPU's reference figure.
"""
import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import common  # noqa: E402
import grpo  # noqa: E402
import standin  # noqa: E402


def matmul_gflops(m: int, k: int, n: int, reps: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * m * k * n / best / 1e9


def chunk_ops(n: int = 256, H: int = 256, V: int = 151936) -> dict:
    """Milliseconds (best of 5) of each operation _ChunkLogprobs.forward runs on one [n, V] chunk."""
    h, w = torch.randn(n, H), torch.randn(V, H) * 0.05
    z = h @ w.T
    lse = torch.logsumexp(z, -1)
    ops = {"matmul h @ W.T": lambda: h @ w.T, "divide by the temperature (in place)": lambda: z.div_(1.0),
           "logsumexp": lambda: torch.logsumexp(z, -1),
           "entropy: softmax(z).mul_(z).sum(-1)": lambda: torch.softmax(z, -1).mul_(z).sum(-1),
           "amax": lambda: z.amax(-1), "subtract and exp": lambda: (z - lse[:, None]).exp_(),
           "row dot product (p . z)": lambda: torch.linalg.vecdot(z, z)}
    out = {}
    for name, fn in ops.items():
        fn()
        out[name] = 1e3 * min(_timed(fn) for _ in range(5))
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Clock:
    """Seconds per named part, accumulated by start/stop pairs (the hooks and wrappers below)."""

    def __init__(self):
        self.s, self.t0 = {}, {}

    def start(self, name):
        self.t0[name] = time.perf_counter()

    def stop(self, name):
        self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - self.t0.pop(name)


def timed(clock: Clock, fn, name: str):
    def wrapper(*a, **k):
        clock.start(name)
        res = fn(*a, **k)
        clock.stop(name)
        return res
    return wrapper


def instrument(model, optimizer, clock: Clock, phase: list):
    """Times the decoder forward and the LM head (forward hooks; `phase` names the phase they run in), the chunked
    log-prob projection's forward and backward, and the optimizer step. The decoder's backward is the rest of
    loss.backward(), timed in main."""
    dec, head = model.get_decoder(), model.get_output_embeddings()
    dec.register_forward_pre_hook(lambda m, a: clock.start(f"{phase[0]}/decoder forward"))
    dec.register_forward_hook(lambda m, a, o: clock.stop(f"{phase[0]}/decoder forward"))
    head.register_forward_pre_hook(lambda m, a: clock.start(f"{phase[0]}/LM head"))
    head.register_forward_hook(lambda m, a, o: clock.stop(f"{phase[0]}/LM head"))
    chunk = common._ChunkLogprobs
    chunk.forward = staticmethod(timed(clock, chunk.forward, "update/vocab projection forward"))
    chunk.backward = staticmethod(timed(clock, chunk.backward, "update/vocab projection backward"))
    optimizer.step = timed(clock, optimizer.step, "update/AdamW step")


def flops(cfg, prompts: list, responses: list, G: int, sample_steps: int) -> dict:
    """Hand-counted FLOPs (2 x multiply-adds) of each part: {part: (executed, real)}."""
    H, L, V, I = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
    per_tok = 2 * L * (H * H + 2 * H * kv + H * H + 3 * H * I)  # q, k, v, o projections and the SwiGLU MLP

    def attn(q_len: float, ctx: float) -> float:  # QK^T and AV over ctx keys, for q_len queries, all layers
        return 4 * L * H * q_len * ctx

    P, Wp = len(prompts), max(map(len, prompts))
    rows = [p for p in prompts for _ in range(G)]  # each response's prompt
    lens = [len(r) for r in responses]
    B, T, n_real = len(responses), max(lens), sum(lens)
    real_p = sum(map(len, prompts))
    # sampling: one prefill of each distinct prompt minus its last token (left-padded to Wp - 1), then each step
    # feeds one token per row (every row, finished or not) and projects it to the vocabulary
    ex_pre = P * (Wp - 1) * per_tok + attn(P * (Wp - 1), Wp / 2)
    re_pre = (real_p - P) * per_tok + sum(attn(len(p) - 1, len(p) / 2) for p in prompts)
    ex_dec = B * sample_steps * per_tok + attn(B * sample_steps, Wp + sample_steps / 2)
    re_dec = n_real * per_tok + sum(attn(n, len(p) + n / 2) for p, n in zip(rows, lens))
    # update: pass 1 = the distinct prompts minus their last token; pass 2 = B rows x (T + 1 - 1) positions; backward
    # of the decoder = 2 x forward; the vocabulary projection of the N response tokens: forward 1, backward 3
    ex_upd = P * (Wp - 1) * per_tok + attn(P * (Wp - 1), Wp / 2) + B * T * per_tok + attn(B * T, Wp + T / 2)
    re_upd = re_pre + n_real * per_tok + sum(attn(n, len(p) + n / 2) for p, n in zip(rows, lens))
    vocab = 2 * H * V
    return {"sample/decoder forward": (ex_pre + ex_dec, re_pre + re_dec),
            "sample/LM head": ((P + B * sample_steps) * vocab, (P + n_real) * vocab),
            "update/decoder forward": (ex_upd, re_upd), "update/decoder backward": (2 * ex_upd, 2 * re_upd),
            "update/vocab projection forward": (n_real * vocab, n_real * vocab),
            "update/vocab projection backward": (3 * n_real * vocab, 3 * n_real * vocab)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps, the first a warm-up (at least 2)")
    ap.add_argument("--rows", type=int, default=151936,
                    help="vocabulary rows of the stand-in (0: its tokenizer's own, for a quick look)")
    ap.add_argument("--ops", action="store_true", help="only time the operations of one update chunk")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.ops:
        for name, ms in chunk_ops().items():
            print(f"{name}: {ms:.0f} ms on [256, 151936]")
        return
    path = standin.standin_path(rows=a.rows)
    model, tok, _ = common.load_model_and_tokenizer(str(path), torch.device("cpu"))
    cfg = model.config
    train, _ = common.load_task("gsm8k")
    sampler = common.HFSampler(tok, common.stop_ids(tok, model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=True)  # as the trainers
    clock, phase = Clock(), ["sample"]
    instrument(model, optimizer, clock, phase)
    rng, steps = np.random.default_rng(0), []
    for step in range(a.steps):
        clock.s.clear()
        examples = [train[i] for i in rng.choice(len(train), a.prompts, replace=False)]
        prompt_ids = common.encode_prompts(tok, examples)
        model.eval()
        phase[0] = "sample"
        t0 = time.perf_counter()
        seeds = [[step, i] for i in range(a.prompts)]
        samples = sampler.generate(model, prompt_ids, a.group, a.new_tokens, seeds=seeds)
        t_sample = time.perf_counter() - t0
        batch = common.collate(samples, tok.pad_token_id, torch.device("cpu"))
        reward = torch.tensor([common.score(e, t) for e, t in zip([e for e in examples for _ in range(a.group)],
                                                                   common.decode(tok, samples.response_ids))])
        batch["adv"] = grpo.group_advantages(reward, a.group)
        model.train()
        phase[0] = "update"
        t0 = time.perf_counter()
        out = common.token_logprobs(model, batch, 1.0, 256, with_entropy=True)
        loss, _ = grpo.policy_loss(out["logp"], batch["old_logp"], batch["adv"], batch["mask"])
        timed(clock, loss.backward, "backward")()
        clock.s["update/decoder backward"] = clock.s.pop("backward") - clock.s["update/vocab projection backward"]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t0
        steps.append({"sample": t_sample, "update": t_update, **clock.s,  # decode steps = the longest response
                      "flops": flops(cfg, prompt_ids, samples.response_ids, a.group,
                                     max(map(len, samples.response_ids)))})
        print(f"step {step}: sample {t_sample:.1f} s, update {t_update:.1f} s", flush=True)
    timed_steps = steps[1:]
    med = lambda k: statistics.median(s.get(k, 0.0) for s in timed_steps)  # noqa: E731
    H, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    B = a.prompts * a.group
    ref = {"1024 x 1024 x 1024 (reference)": matmul_gflops(1024, 1024, 1024),
           f"decode LM head [{B}, {H}] x [{H}, {V}]": matmul_gflops(B, H, V),
           f"decode MLP [{B}, {H}] x [{H}, {I}]": matmul_gflops(B, H, I),
           f"update chunk [256, {H}] x [{H}, {V}]": matmul_gflops(256, H, V),
           f"update MLP [{B * a.new_tokens}, {H}] x [{H}, {I}]": matmul_gflops(B * a.new_tokens, H, I)}
    peak = max(ref.values())
    print("\nMeasured matmul throughput (torch.mm, float32, best of 5):")
    for k, v in ref.items():
        print(f"  {k}: {v:.1f} GFLOP/s")
    print(f"\n| part | s | executed GFLOP | real GFLOP | GFLOP/s (executed) | % of {peak:.0f} GFLOP/s |\n"
          + "| --- " * 6 + "|")
    f = {k: [statistics.median(s["flops"][k][i] for s in timed_steps) for i in (0, 1)] for k in steps[0]["flops"]}
    for ph in ("sample", "update"):
        parts = [k for k in f if k.startswith(ph)] + ([f"{ph}/AdamW step"] if ph == "update" else [])
        for k in parts:
            ex, re_ = f.get(k, (0.0, 0.0))
            s = med(k)
            rate = ex / s / 1e9 if s and ex else 0.0
            print(f"| {k} | {s:.2f} | {ex / 1e9:.1f} | {re_ / 1e9:.1f} | {rate:.1f} | "
                  f"{100 * rate / peak:.0f}% |" if ex else f"| {k} | {s:.2f} | - | - | - | - |")
        rest = med(ph) - sum(med(k) for k in parts)
        print(f"| {ph}/everything else | {rest:.2f} | - | - | - | - |")
        print(f"| **{ph}** | **{med(ph):.2f}** | {sum(f[k][0] for k in parts if k in f) / 1e9:.1f} | "
              f"{sum(f[k][1] for k in parts if k in f) / 1e9:.1f} | | |")
    resp = [len(r) for s in [samples] for r in s.response_ids]
    print(f"\n{datetime.datetime.now():%Y-%m-%d %H:%M}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.prompts} prompts x {a.group}, {a.new_tokens} new tokens (last step: mean response "
          f"{statistics.mean(resp):.0f}, mean prompt {statistics.mean(map(len, prompt_ids)):.0f} tokens); "
          f"medians of {len(timed_steps)} step(s) after 1 warm-up.")


if __name__ == "__main__":
    main()
