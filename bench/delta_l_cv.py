"""Coefficient of variation of the policy gradient under each loss aggregation (ΔL normalization, arXiv 2509.07558,
argues with it), measured.

Fixed parameters (the warm-started tiny model), many independently resampled rollout batches (prompts x G samples);
for each batch and each aggregation the flattened gradient of the on-policy PPO-clip loss (old_logp = logp, so the
gradient is -sum_i c_i A_i sum_t grad log pi). Over the batches:
    CV = sqrt(trace Cov[g]) / ||mean g|| = ||per-coordinate std over batches|| / ||mean over batches||
(the usual definition with the Monte-Carlo mean in place of the unknown true one; the mean's norm is inflated by
noise, E||mean||^2 = ||mu||^2 + trace Cov / n, so the table also gives CV with ||mu||^2 estimated as
||mean||^2 - trace Cov / n). CV is scale-free, so M and the different overall gains of the modes do not enter it.

Settings (each on its own warm-started tiny model, common.resolve_model_path("tiny", task)):
  countdown       the tiny task itself at temperature 1: responses are almost all 6 tokens ("7+9-2" + EOS), so the
                  aggregations nearly coincide there (equal lengths make them equal up to a constant);
  countdown_t1.5  the same at temperature 1.5 (sampling and log-probs): ~10% of responses have 4-9 tokens;
  arithmetic      the tiny arithmetic model: sums of two 2-digit numbers, 3 or 4 tokens with EOS (ratio 4:3);
  sum             the tiny sum model: running totals of 1-10 digits, 2 to ~26 tokens with EOS, the one setting with
                  a length spread over 10x (as in real RLVR; tests/test_delta_l.py also covers it synthetically).
M is the task's response cap (12; 32 for sum) unless --max_new_tokens is given.
A few minutes on 2 CPU cores:
    python bench/delta_l_cv.py                       # --batches 40 --prompts 8 --group_size 8
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (HFSampler, collate, decode, default_max_new_tokens, encode_prompts,  # noqa: E402
                    load_model_and_tokenizer, load_task, resolve_model_path, score, stop_ids, stream_seeds,
                    token_logprobs)
from delta_l import group_advantages, policy_loss  # noqa: E402

MODES = [("grpo", 1.0), ("dapo", 1.0), ("dr_grpo", 1.0), ("delta_l", 0.5), ("delta_l", 1.0)]  # (mode, alpha)
SETTINGS = {"countdown": ("countdown", 1.0), "countdown_t1.5": ("countdown", 1.5), "arithmetic": ("arithmetic", 1.0),
            "sum": ("sum", 1.0)}


def measure(task, temperature, args):
    model, tok, _ = load_model_and_tokenizer(resolve_model_path("tiny", task), torch.device("cpu"))
    model.eval()  # fixed parameters for every batch
    train = load_task(task)[0]
    max_new = args.max_new_tokens or default_max_new_tokens(task)
    sampler, params = HFSampler(tok, stop_ids(tok, model)), [p for p in model.parameters() if p.requires_grad]
    n_par = sum(p.numel() for p in params)
    s1 = {m: torch.zeros(n_par, dtype=torch.float64) for m in MODES}  # sum of g over batches
    s2 = {m: torch.zeros(n_par, dtype=torch.float64) for m in MODES}  # sum of g^2
    lens, rewards = [], []
    for b in range(args.batches):
        rng = np.random.default_rng([args.seed, b])
        examples = [train[i] for i in rng.choice(len(train), args.prompts, replace=False)]
        samples = sampler.generate(model, encode_prompts(tok, examples), args.group_size, max_new,
                                   temperature, stream_seeds((args.seed, "cv", b), args.prompts))
        per_seq = [e for e in examples for _ in range(args.group_size)]
        reward = torch.tensor([score(e, c) for e, c in zip(per_seq, decode(tok, samples.response_ids))])  # [B]
        batch = collate(samples, tok.pad_token_id, "cpu")
        adv = group_advantages(reward, args.group_size)  # [B]
        logp = token_logprobs(model, batch, temperature)["logp"]  # [B, T]
        for m in MODES:
            loss, _ = policy_loss(logp, logp.detach(), adv, batch["mask"], agg=m[0], max_len=max_new,
                                  alpha=m[1])
            g = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params, retain_graph=True)]).double()
            s1[m] += g
            s2[m] += g * g
        lens += batch["mask"].sum(-1).tolist()
        rewards += reward.tolist()
    n, out = args.batches, {}
    for m in MODES:
        mean = s1[m] / n
        tr_cov = ((s2[m] - n * mean * mean).clamp(min=0) / (n - 1)).sum().item()  # Bessel-corrected
        mu2 = mean.pow(2).sum().item()
        out[m] = (np.sqrt(tr_cov / mu2), np.sqrt(tr_cov / (mu2 - tr_cov / n)) if mu2 > tr_cov / n else float("nan"))
    L = np.array(lens)
    return out, f"len mean {L.mean():.2f}, std {L.std():.2f}, range {L.min():.0f}-{L.max():.0f}; " \
                f"reward {np.mean(rewards):.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=0)  # M; 0 = the task's cap, as the trainers
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    results, notes = {}, {}
    for name in args.settings.split(","):
        results[name], notes[name] = measure(*SETTINGS[name], args)
        print(f"{name}: {notes[name]}", flush=True)
    names = list(results)
    print(f"\nCV = ||std over {args.batches} batches|| / ||mean||, each batch {args.prompts} prompts x "
          f"{args.group_size} samples, M = the task's cap; (corrected: ||mu||^2 = ||mean||^2 - tr Cov / n)\n")
    print("| aggregation | " + " | ".join(f"CV {n} | CV {n} (corrected)" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for m in MODES:
        label = f"delta_l alpha={m[1]:g}" if m[0] == "delta_l" else m[0]
        print(f"| {label} | " + " | ".join(f"{results[n][m][0]:.3f} | {results[n][m][1]:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
