"""Log-prob memory: common.token_logprobs (chunked lm_head + logsumexp, checkpointed) vs the naive full log_softmax.

python bench/logprob_memory.py                 # V=152,064 (Qwen2.5's padded vocab), H=256, N = 2048 and 8192 tokens
python bench/logprob_memory.py --hidden 896    # Qwen2.5-0.5B's hidden size: same logits, ~3.5x the matmul time
python bench/logprob_memory.py --quick         # V=32,000, H=256, N=512, chunk 128: a few seconds per case

The default H=256 keeps the full run near 5 minutes on 2 CPU cores;
H only changes the matmul time and the size of the weight gradient, not the [N, V] logits the comparison is about.

For every N, logits dtype (float32, or bfloat16 hidden states and weight so the logits come out bf16) and with /
without gradients it measures peak extra memory and wall time of
  ours  -- the real code path: `common.token_logprobs` itself, called on a stub "model" whose forward returns fixed
           final hidden states [1, N+1, H] and whose output embedding is a [V, H] weight. So the mask/row selection,
           the `chunk_size` loop over `common._ChunkLogprobs` (its hand-written backward recomputes each chunk) are
           exactly what the trainers run (default chunk_size 256, temperature 1.0).
  naive  -- logits = h @ W.T kept as one [N, V] tensor (as model(...).logits would be), then
           logits.float().log_softmax(-1).gather(-1, targets).
With gradients, both the hidden states and the [V, H] weight require grad (the lm_head / tied embedding is trained),
the loss is sum(logp * c) for fixed random c, and the time and peak cover forward + backward. The weight gradient
(V*H in the weight dtype) is held by either method; the "excl. dW" column subtracts it.

Each case runs in its own subprocess (this script re-invoked with --case). On CPU the peak is ru_maxrss minus the RSS
just before the computation, with MALLOC_MMAP_THRESHOLD_=1048576 in the child so glibc hands freed chunks back, and the
high-water mark reset (/proc/self/clear_refs) after setup where the kernel allows it. Under CUDA it is
torch.cuda.max_memory_allocated minus memory_allocated before. A naive case whose estimated peak exceeds
--naive_limit_gb (default 10) is skipped; its agreement check then uses the naive formula on row blocks of 1024.
"max |d logp|" is the largest absolute difference between ours and the naive log-probs of the same inputs.
"""
import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-3, "bfloat16": 0.1}  # bf16 logits of magnitude ~10 round in steps of ~0.06


class StubLM(torch.nn.Module):
    """Just enough of a causal LM for common.token_logprobs: its decoder returns fixed final hidden states, and it
    has an output embedding."""

    def __init__(self, hs, weight):
        super().__init__()
        self.hs, self.head = hs, SimpleNamespace(weight=weight)
        self.decoder = _FixedDecoder()

    def forward(self, input_ids, **kw):
        extra = input_ids.shape[1] - self.hs.shape[1]  # response_hidden pads one-token prompts by a column
        self.decoder(torch.nn.functional.pad(self.hs, (0, 0, extra, 0)) if extra > 0 else self.hs)  # read by a hook
        return SimpleNamespace(past_key_values=None)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


class _FixedDecoder(torch.nn.Module):
    def forward(self, hs):
        return (hs,)


def make_inputs(n, vocab, hidden, dtype, grad, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hs = torch.empty(1, n + 1, hidden, dtype=dtype, device=device).normal_(generator=g)  # [1, N+1, H]
    w = torch.empty(vocab, hidden, dtype=dtype, device=device).normal_(0, 3 / hidden**0.5, generator=g)  # logits std ~3
    tgt = torch.randint(0, vocab, (1, n), generator=g, device=device)  # [1, N]
    coef = torch.empty(n, device=device).uniform_(-1, 1, generator=g)  # [N]
    hs.requires_grad_(grad)
    w.requires_grad_(grad)
    batch = dict(input_ids=torch.zeros(1, n + 1, dtype=torch.long, device=device),
                 attention_mask=torch.ones(1, n + 1, dtype=torch.long, device=device),
                 response_ids=tgt, mask=torch.ones(1, n, device=device))
    return hs, w, tgt.reshape(-1), coef, batch


def run_ours(hs, w, batch, chunk):
    return common.token_logprobs(StubLM(hs, w), batch, chunk_size=chunk)["logp"].reshape(-1)  # [N]


def run_naive(hs, w, tgt):
    h = hs[0, :-1]  # [N, H]: the same positions response_hidden picks
    logits = h @ w.T  # [N, V] in the model dtype, kept alive like model(...).logits
    return logits.float().log_softmax(-1).gather(-1, tgt[:, None]).squeeze(-1)  # [N]


def run_blocked_ref(hs, w, tgt, block=1024):
    out = [(hs[0, s: s + block] @ w.T).float().log_softmax(-1).gather(-1, tgt[s: s + block, None]).squeeze(-1)
           for s in range(0, hs.shape[1] - 1, block)]
    return torch.cat(out)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(a):
    """One case in this process; prints one JSON line."""
    n, dtype_name, grad, method = a.case.split(",")
    n, grad, dtype = int(n), grad == "grad", DTYPES[dtype_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    # warm-up through the same path on tiny shapes (first-call overhead, kernel/lib loading)
    hs, w, tgt, coef, batch = make_inputs(8, 64, 16, dtype, grad, device, seed=1)
    with torch.set_grad_enabled(grad):
        lp = run_ours(hs, w, batch, 4) if method == "ours" else run_naive(hs, w, tgt)
        if grad:
            (lp * coef).sum().backward()
    del hs, w, tgt, coef, batch, lp
    hs, w, tgt, coef, batch = make_inputs(n, a.vocab, a.hidden, dtype, grad, device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        reset = True
    else:
        reset = reset_hwm()
        base = rss_bytes()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad):
        if method == "ours":
            lp = run_ours(hs, w, batch, a.chunk)
        elif method == "naive":
            lp = run_naive(hs, w, tgt)
        else:
            lp = run_blocked_ref(hs, w, tgt)
        if grad:
            (lp * coef).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    torch.save(lp.detach().float().cpu(), a.out)
    print(json.dumps(dict(peak=peak, secs=secs, hwm_reset=reset, device=str(device))))


def estimate_naive(n, vocab, dtype_name, grad):
    """Bytes the naive version needs: logits in dtype (+ a float32 copy for bf16) + float32 log_softmax output;
    backward adds two more float32 [N, V] buffers (the gradient of the output and of the input)."""
    l32 = 4 * n * vocab
    est = n * vocab * DTYPES[dtype_name].itemsize + l32 + (l32 if dtype_name != "float32" else 0)
    return est + (2 * l32 if grad else 0)


def spawn(a, case, out):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    cmd = [sys.executable, __file__, "--case", case, "--out", out, "--vocab", str(a.vocab),
           "--hidden", str(a.hidden), "--chunk", str(a.chunk)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        return dict(error=f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="N=512, V=32000, H=256, chunk 128")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="response tokens (default 2048 8192)")
    ap.add_argument("--vocab", type=int, default=None, help="default 152064")
    ap.add_argument("--hidden", type=int, default=None, help="default 256 (896 is Qwen2.5-0.5B)")
    ap.add_argument("--chunk", type=int, default=None, help="token_logprobs chunk_size (default 256, the trainers' default)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--naive_limit_gb", type=float, default=10.0)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        return child(a)
    q = a.quick
    a.n = a.n or ([512] if q else [2048, 8192])
    a.vocab = a.vocab or (32000 if q else 152064)
    a.hidden = a.hidden or 256
    a.chunk = a.chunk or (128 if q else 256)
    cuda = torch.cuda.is_available()
    print(f"device {'cuda' if cuda else 'cpu'}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"V={a.vocab}, H={a.hidden}, chunk_size={a.chunk}, N={a.n}, naive limit {a.naive_limit_gb} GB", flush=True)
    rows, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.n:
            for dt in a.dtypes:
                outs = {}
                for grad in ("nograd", "grad"):
                    for method in ("ours", "naive"):
                        case, out = f"{n},{dt},{grad},{method}", f"{tmp}/{n}_{dt}_{grad}_{method}.pt"
                        est = estimate_naive(n, a.vocab, dt, grad == "grad")
                        if method == "naive" and est > a.naive_limit_gb * 1e9:
                            r = dict(skipped=est)
                        else:
                            r = spawn(a, case, out)
                            if "error" not in r:
                                outs[(grad, method)] = out
                        print(f"  {case}: {r}", flush=True)
                        rows.append(dict(n=n, dtype=dt, grad=grad, method=method, **r))
                # agreement: ours vs naive of the same grad mode, else vs the other mode's naive, else row blocks
                ref = outs.get(("nograd", "naive")) or outs.get(("grad", "naive"))
                ref_name = "naive"
                if ref is None:
                    ref, ref_name = f"{tmp}/{n}_{dt}_ref.pt", "naive on row blocks"
                    r = spawn(a, f"{n},{dt},nograd,ref", ref)
                    print(f"  {n},{dt},ref: {r}", flush=True)
                    if "error" in r:
                        ref = None
                for row in rows:
                    if row["n"] != n or row["dtype"] != dt or row["method"] != "ours" or "error" in row:
                        continue
                    other = outs.get((row["grad"], "naive")) or ref
                    if other is not None:
                        d = (torch.load(outs[(row["grad"], "ours")]) - torch.load(other)).abs().max().item()
                        row["diff"], row["diff_ref"] = d, ("naive" if other != ref else ref_name)
    print(f"total {time.perf_counter() - t_all:.0f} s", flush=True)

    mb = lambda x: x / 2**20  # noqa: E731
    print("\n| N | logits dtype | grad | method | peak MB | time s | logits MB | peak / logits | "
          "excl. dW / logits | max abs d logp |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        isz = DTYPES[r["dtype"]].itemsize
        logits_b, dw_b = r["n"] * a.vocab * isz, a.vocab * a.hidden * isz if r["grad"] == "grad" else 0
        head = f"| {r['n']} | {r['dtype']} | {'yes' if r['grad'] == 'grad' else 'no'} | {r['method']} |"
        if "skipped" in r:
            print(f"{head} skipped (would need {r['skipped'] / 1e9:.1f} GB) | | {mb(logits_b):.0f} | | | |")
            continue
        if "error" in r:
            print(f"{head} error: {r['error']} | | {mb(logits_b):.0f} | | | |")
            continue
        ratio = r["peak"] / logits_b
        excl = f"{(r['peak'] - dw_b) / logits_b:.2f}" if dw_b else "-"
        mark = (" (ok)" if ratio <= 1.25 else " (> 1.25)") if r["method"] == "ours" else ""
        if "diff" in r:
            ok = "ok" if r["diff"] <= TOL[r["dtype"]] else "MISMATCH"
            diff = f"{r['diff']:.2e} ({ok}{', vs ' + r['diff_ref'] if r['diff_ref'] != 'naive' else ''})"
        else:
            diff = "-"
        print(f"{head} {mb(r['peak']):.0f} | {r['secs']:.2f} | {mb(logits_b):.0f} | {ratio:.2f}{mark} | {excl} | "
              f"{diff} |")
    print(f"\nlogits MB = N x V x itemsize of the logits dtype; dW = the [V, H] weight gradient "
          f"({mb(a.vocab * a.hidden * 4):.0f} MB float32, {mb(a.vocab * a.hidden * 2):.0f} MB bf16). "
          f"Target for ours: peak / logits <= 1.25. "
          f"Peak is {'CUDA max_memory_allocated' if cuda else 'ru_maxrss - RSS before'} over the computation.")


if __name__ == "__main__":
    main()
