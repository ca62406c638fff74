"""Lp-Reg: GRPO that protects low-probability "reasoning spark" tokens with a min-p proxy forward KL.

Huang et al., "Low-probability Tokens Sustain Exploration in Reinforcement Learning with Verifiable Reward", arXiv
2510.03222 (Section 4: the proxy, Eq. 5; the objective, Eq. 6); details the paper leaves open follow its official code,
github.com/CarlanLark/Lp-Reg-dev (veRL fork): compute_policy_loss_lp_reg (verl/trainer/ppo/core_algos.py).
Deviations from grpo.py:
  1. after sampling, a no-grad forward of the sampling policy pi_old builds the proxy pi_proxy: keep the tokens with
     p >= kappa * max p (min-p, kappa = 0.02), renormalize, store log pi_proxy of each sampled token (chunked);
  2. per optimizer mini-batch (over all ranks), among the valid tokens with advantage < 0 take the rho = 1% with the
     lowest current log-prob, keep those with log pi_theta < log pi_proxy (min-p filtered noise never is): S;
  3. tokens in S get the unclipped policy-gradient term plus beta * clamp(k3(pi_proxy / pi_theta), 10), beta = 1;
  4. every other token gets the PPO min with clip range [0, 10] (eps_low 1, eps_high 9); token-mean over all tokens;
  5. |S| is logged every step (policy/lp_selected): with fewer than 2 / rho negative tokens nothing is selected and
     the step is plain GRPO (the official code's k <= 1 rule).
Logs beside grpo.py's keys: policy/lp_{selected,candidates,kl,active_ranks}, policy/proxy_kept.

CPU, embedded tiny model, ~2 minutes:  python lp_reg.py
GPU (pip install vllm):                python lp_reg.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k
Several GPUs, data parallel:           torchrun --nproc_per_node 8 lp_reg.py --model ... --task gsm8k
A model too big for one GPU (FSDP2):   torchrun --nproc_per_node 8 lp_reg.py --model ... --fsdp true
"""
import contextlib
import copy
import math
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import (ARG_RULES, Timer, Verifier, all_ranks_mean, all_ranks_sum, append_metrics, autocast, check_args,
                    claim_output_dir, collate, decode, default_max_new_tokens, drop_long_prompts, encode_prompts,
                    evaluate, finite_weights, full_state, init_distributed, is_int, is_num, load_full_state,
                    load_model_and_tokenizer, load_task, make_sampler, masked_mean, output_weight, parse_task_name,
                    pick_device, pick_dtype, read_checkpoint, resolve_model_path, response_hidden, save_checkpoint,
                    save_final, stop_ids, stream_seeds, token_logprobs, token_logprobs_nograd, truncate_metrics,
                    wrap_policy)


@dataclass
class Args:
    model: str = "tiny"  # "tiny" (embedded default, built on first use), a Hugging Face id, or a local folder
    task: str = "countdown"  # countdown[:numbers], arithmetic[:digits], sum[:terms], gsm8k, math500, a .jsonl path
    backend: str = "auto"  # sampler: hf | vllm | auto (vLLM when it imports and the device is CUDA)
    vllm_gpu_memory: float = 0.3  # share of the GPU's memory vLLM may take beside the trainer
    verify_workers: int = -1  # verifier processes; -1 = 2 for math tasks (math-verify), 0 (in-process) for built-ins
    verify_timeout: float = 60.0  # seconds a step's verification may take; what is left scores 0 (verify/timed_out)
    output_dir: str = "runs/lp_reg"  # metrics.jsonl, checkpoint.pt and final/ go here
    seed: int = 0  # seeds python/numpy/torch; sampling seeds derive from (seed, step, prompt)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    dtype: str = "auto"  # compute dtype: auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16. The weights
    #                      and AdamW state are float32 in every case (bf16 runs under autocast)
    sampler_dtype: str = "auto"  # the sampler's compute dtype; auto = dtype. bfloat16 beside a float32 trainer
    #                              makes a real training-inference mismatch (its log-probs are still the behaviour's)
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2), not DDP
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward: less activation memory
    resume: bool = False  # continue from <output_dir>/checkpoint.pt
    overwrite: bool = False  # start over in an output_dir that holds a run (deletes its checkpoints and final/)
    max_steps: int = 200  # RL steps (one rollout batch each)
    prompts_per_step: int = 32  # P: prompts per step, over all ranks
    group_size: int = 8  # G: responses per prompt
    max_new_tokens: int = 0  # response cap; 0 = the task's (12 countdown/arithmetic, 32 sum), 512 otherwise
    max_prompt_len: int = 512  # longer prompts are skipped with a warning
    temperature: float = 1.0  # sampling temperature; the trainer's log-probs use the same
    lr: float = 0.0  # AdamW learning rate; 0 = 3e-4 for the tiny model, 1e-6 otherwise
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient-norm clipping
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass (epochs * mini_batches steps per rollout batch)
    micro_batch_size: int = 0  # sequences per forward (gradient accumulation; proxy and selection passes too); 0 = all
    eps_low: float = 1.0  # LP_REG: PPO clip: ratio >= 1 - eps_low = 0 (Eq. 6 removes the lower clip bound)
    eps_high: float = 9.0  # LP_REG: PPO clip: ratio <= 1 + eps_high = U = 10 (Eq. 6: for numerical stability)
    beta: float = 0.0  # k3 KL to the initial policy; 0 loads no reference model
    scale_std: bool = True  # divide the advantage by the group std (False: Dr. GRPO's advantage)
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean (original GRPO) | seq-mean-token-sum-norm (Dr. GRPO)
    kappa: float = 0.02  # LP_REG: min-p filter of the proxy: keep tokens with p >= kappa * max p
    rho: float = 0.01  # LP_REG: share of the negative-advantage tokens (lowest current prob) that may be regularized
    lp_beta: float = 1.0  # LP_REG: weight of the proxy KL on the selected tokens (Eq. 6's beta; code: ppo_kl_coef)
    select_scope: str = "mini-batch"  # LP_REG: S over the whole mini-batch, all ranks (Eq. 6's training batch) |
    #   micro-batch: per micro-batch per rank, as the official code (S then depends on micro_batch_size and ranks)
    full_kl_k: int = 0  # LP_REG: 0 = sampled-token k3 (the code's kl_penalty "low_var_kl"); k > 0 = Eq. 6's full
    #                     forward KL over pi_proxy's top-k tokens (not clamped at 10, unlike k3)
    logprob_chunk: int = 256  # response tokens projected to the vocabulary at a time (memory: bench/logprob_memory.py)
    eval_every: int = 10  # steps between evaluations on held-out prompts (0 = only at the end)
    eval_prompts: int = 128  # held-out prompts per evaluation
    eval_samples: int = 16  # samples per held-out prompt: pass@k for k in 1, 8, 16 (where <= n) and n
    log_examples_every: int = 25  # print a few completions every N steps (0 = never)
    save_every: int = 25  # checkpoint every N steps (also at the end and on Ctrl-C)


RULES = {  # Lp-Reg's own arguments: (a test of the value v given all the arguments a, what it must be)
    "kappa": (lambda v, a: is_num(v) and 0 <= v <= 1, "be in [0, 1]: the proxy keeps p >= kappa * max p"),
    "rho": (lambda v, a: is_num(v) and 0 < v <= 1, "be in (0, 1]: a share of the negative-advantage tokens"),
    "lp_beta": (lambda v, a: is_num(v) and v >= 0, "be >= 0"),
    "select_scope": (lambda v, a: v in ("mini-batch", "micro-batch"), "be mini-batch or micro-batch"),
    "full_kl_k": (lambda v, a: is_int(v) and v >= 0, "be >= 0 (0 = the sampled-token k3)"),
}


# ------------------------------------------------------------------------------------------------------------
# Advantage and loss
# ------------------------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size: int, scale_std: bool = True, eps: float = 1e-6):
    """(r - group mean) / (group std + eps); groups with equal rewards get exactly 0. rewards: [B] -> [B]."""
    r = rewards.float().reshape(-1, group_size)  # [P, G]
    adv = r - r.mean(-1, keepdim=True)  # [P, G]
    if scale_std and group_size > 1:
        adv = adv / (r.std(-1, keepdim=True) + eps)  # Bessel-corrected std, as TRL and verl
    return adv.reshape(-1)  # [B]


def aggregate(token_loss, mask, agg: str = "token-mean", max_len: int = None):
    """Reduce a [B, T] per-token loss to a scalar over the response tokens (mask == 1)."""
    if agg == "token-mean":  # DAPO: every token of the batch weighs the same
        return (token_loss * mask).sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":  # original GRPO: mean over each response, then over responses
        return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if agg == "seq-mean-token-sum-norm":  # Dr. GRPO: token sum / (B * max_len), a constant normalizer
        return (token_loss * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    raise ValueError(f"unknown agg {agg!r}")


def minp_proxy_logp(logits, tokens, kappa: float = 0.02):
    """log pi_proxy(token) under the min-p proxy of softmax(logits) (arXiv 2510.03222 Eq. 5): tokens with
    p >= kappa * max p are kept and renormalized (log pi_proxy = log p - log Z, Z = kept mass), the others get -1e4
    (as the official code's apply_min_p, not -inf; it keeps ties with >=, Eq. 5 writes >).
    logits: [N, V] (already / temperature), tokens: [N] -> [N]."""
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  # [N, V]
    keep = lp >= lp.amax(-1, keepdim=True) + math.log(kappa) if kappa > 0 else torch.ones_like(lp, dtype=torch.bool)
    log_z = lp.masked_fill(~keep, float("-inf")).logsumexp(-1)  # [N]  log of the kept mass, <= 0
    log_z = log_z.masked_fill(keep.all(-1), 0.0)  # [N]  nothing filtered: pi_proxy = p exactly, no rounding
    tok_lp = lp.gather(-1, tokens[:, None]).squeeze(-1)  # [N]
    return torch.where(keep.gather(-1, tokens[:, None]).squeeze(-1), tok_lp - log_z, torch.full_like(tok_lp, -1e4))


def minp_proxy_topk(logits, kappa: float, k: int):
    """Full-KL option: pi_proxy's k most likely tokens and their log-probs renormalized over those k (exact when the
    min-p set has <= k tokens; filtered slots get -1e4). logits: [N, V] -> ids [N, k], logp [N, k]."""
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  # [N, V]
    top, ids = lp.topk(min(k, lp.shape[-1]), -1)  # [N, k]
    keep = top >= top[:, :1] + math.log(kappa) if kappa > 0 else torch.ones_like(top, dtype=torch.bool)
    top = top.masked_fill(~keep, float("-inf"))  # [N, k]
    return ids, (top - top.logsumexp(-1, keepdim=True)).masked_fill(~keep, -1e4)  # [N, k], [N, k]


@torch.no_grad()
def proxy_logprobs(model, batch: dict, micro_batch_size: int = 0, temperature: float = 1.0, kappa: float = 0.02,
                   chunk_size: int = 256, full_k: int = 0) -> dict:
    """The data-generating policy's proxy (Eq. 5) at every response token, `micro_batch_size` rows per forward
    (0 = all), `chunk_size` rows projected to the vocabulary at a time: token_logprobs_nograd's memory bound (it gives
    log pi of given ids only, not the max and kept mass min-p needs). {"proxy_logp": [B, T]} (0 off the mask) and,
    if full_k, "proxy_ids" / "proxy_topk_logp" [B, T, k]."""
    B = batch["mask"].shape[0]
    mb = micro_batch_size or B
    parts = [_proxy_micro(model, take(batch, slice(s, s + mb)), temperature, kappa, chunk_size, full_k)
             for s in range(0, B, mb)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _proxy_micro(model, batch: dict, temperature: float, kappa: float, chunk_size: int, full_k: int) -> dict:
    mask = batch["mask"]  # [b, T]
    B, T = mask.shape
    h = response_hidden(model, batch["input_ids"], batch["attention_mask"], T).reshape(B * T, -1)  # [b*T, H]
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # [N]
    tgt, weight = batch["response_ids"].reshape(-1)[rows], output_weight(model)  # [N], [V, H]
    if torch.is_autocast_enabled(h.device.type):  # project in the compute dtype, as the sampler did; cast once
        weight = weight.to(torch.get_autocast_dtype(h.device.type))
    out = {"proxy_logp": torch.zeros(B * T, device=mask.device)}  # [b*T]; 0 off the mask
    if full_k:
        K = min(full_k, weight.shape[0])
        out["proxy_ids"] = torch.zeros(B * T, K, dtype=torch.long, device=mask.device)  # [b*T, K]
        out["proxy_topk_logp"] = torch.full((B * T, K), -1e4, device=mask.device)  # [b*T, K]
    for s in range(0, len(rows), chunk_size):
        r = rows[s: s + chunk_size]
        logits = (h[r] @ weight.T).float() / temperature  # [n, V]: filter what was sampled (the code: before / T)
        out["proxy_logp"][r] = minp_proxy_logp(logits, tgt[s: s + chunk_size], kappa)  # [n]
        if full_k:
            out["proxy_ids"][r], out["proxy_topk_logp"][r] = minp_proxy_topk(logits, kappa, full_k)  # [n, K]
    return {k: v.reshape(B, T, *v.shape[1:]) for k, v in out.items()}


def all_ranks_cat(x):
    """Every rank's x (the same shape on each), concatenated in rank order; x itself on one process."""
    if not torch.distributed.is_initialized():
        return x
    y = x.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    parts = [torch.empty_like(y) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, y.contiguous())
    return torch.cat(parts).to(x.device)


def select_tokens(logp, adv, mask, rho: float = 0.01, across_ranks: bool = False):
    """S: the k = floor(rho * N) tokens with the smallest logp among the N valid tokens with adv < 0; empty if
    k <= 1 (compute_policy_loss_lp_reg's population and k rule; Eq. 6 takes the percentile over all tokens).
    across_ranks: N and the k smallest over every rank's tokens (a mini-batch spans the ranks; the ranks' own k
    smallest hold the k smallest overall), else over this batch. Ties with the k-th smallest are all selected (topk
    takes any): a tie is the same token after the same prefix in two samples of a group, and S then does not depend
    on how rows fall on ranks or micro-batches. logp, mask: [B, T]; adv: [B] -> [B, T] bool."""
    neg = (mask > 0) & (adv[:, None] < 0)  # [B, T]
    n_neg = all_ranks_sum(neg.sum()) if across_ranks else neg.sum()  # N
    k = int(rho * n_neg.item() + 1e-9)
    if k <= 1:
        return torch.zeros_like(neg)
    vals = logp.detach().masked_fill(~neg, float("inf")).reshape(-1)  # [B*T]
    low = vals.topk(min(k, len(vals)), largest=False).values  # [<=k]  inf past this rank's own negatives
    if across_ranks:
        low = all_ranks_cat(torch.nn.functional.pad(low, (0, k - len(low)), value=float("inf")))  # [world * k]
    return (vals <= low.kthvalue(k).values).reshape(neg.shape) & neg  # [B, T]


def k3(logp, proxy_logp):
    """Sampled-token k3 with ratio pi_proxy / pi_theta (the code's kl_penalty "low_var_kl"): exp(d) - d - 1,
    d = proxy_logp - logp, [B, T] -> [B, T]. Its expected gradient over o ~ pi_theta is that of Eq. 6's forward
    KL(pi_proxy || pi_theta). d is capped at 20 (no overflow); a filtered token (-1e4) stays finite."""
    d = (proxy_logp - logp).clamp(max=20)  # [B, T]
    return torch.exp(d) - d - 1  # [B, T]  >= 0, 0 iff logp = proxy_logp


def full_proxy_kl(topk_logp, proxy_topk_logp):
    """Eq. 6's KL(pi_proxy || pi_theta) over the full distribution, here over pi_proxy's stored top-k tokens.
    topk_logp: log pi_theta of those ids [B, T, k]; proxy_topk_logp: [B, T, k] (-1e4 = filtered) -> [B, T]."""
    w = proxy_topk_logp.exp()  # [B, T, k]  0 on filtered slots
    return (w * (proxy_topk_logp - topk_logp)).sum(-1)  # [B, T]


def lp_reg_loss(logp, old_logp, proxy_logp, adv, mask, rho=0.01, beta=1.0, clip_low=1.0, clip_high=9.0,
                agg="token-mean", max_len=None, ref_logp=None, ref_beta=0.0, select=None, full_kl=None,
                across_ranks=False):
    """Lp-Reg loss in the official code's form (compute_policy_loss_lp_reg): PPO-clip with range
    [1 - clip_low, 1 + clip_high] on unselected tokens, unclipped PG + beta * clamp(k3) on the selected ones; plus
    ref_beta * k3 KL to the reference. logp, old_logp, proxy_logp, ref_logp, mask: [B, T]; adv: [B]; select: [B, T]
    bool (None = select here, over this batch, on every rank if across_ranks); full_kl: [B, T] (replaces k3 when
    given). Returns (scalar loss, stats dict of floats)."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # [B, T]
    a = adv[:, None]  # [B, 1]
    unclipped = -a * ratio  # [B, T]
    clipped = -a * ratio.clamp(1 - clip_low, 1 + clip_high)  # [B, T]
    token_loss = torch.max(unclipped, clipped)  # [B, T]  the code's PPO min, range [0, 10]; Eq. 6: clip(r, 0, U) * A
    if select is None:
        select = select_tokens(logp, adv, mask, rho, across_ranks)  # [B, T]  Eq. 6: low probability, A < 0
    m = select & (mask > 0) & (logp.detach() < proxy_logp)  # [B, T]  Eq. 6's pi_proxy > 0 (not noise), as the code
    kl = full_kl if full_kl is not None else k3(logp, proxy_logp).clamp(-10, 10)  # [B, T]  Eq. 6's D_KL, sampled k3
    token_loss = torch.where(m, unclipped + beta * kl, token_loss)  # [B, T]  Eq. 6: PG - beta * D_KL on S
    stats = {"policy/clipfrac": masked_mean(((clipped > unclipped) & ~m).float(), mask).item(),  # S: never clipped
             "policy/ratio": masked_mean(ratio.detach(), mask).item(),
             "policy/lp_selected": m.sum().item(), "policy/lp_candidates": select.sum().item(),
             "policy/lp_kl": masked_mean(kl.detach(), m.float()).item()}
    if ref_logp is not None and ref_beta > 0:
        d = (ref_logp - logp).clamp(-20, 20)  # [B, T]
        kl = torch.exp(d) - d - 1  # [B, T]  k3 estimator of KL(pi || pi_ref), >= 0
        token_loss = token_loss + ref_beta * kl
        stats["policy/kl"] = masked_mean(kl.detach(), mask).item()
    return aggregate(token_loss, mask, agg, max_len), stats


def micro_weight(mask_micro, mask_mini, agg: str, n_tokens=None) -> float:
    """Share of a micro-batch in its mini-batch loss, so that accumulated gradients equal the whole-batch one.
    n_tokens: the mini-batch's token count averaged over ranks (default: this mini-batch's). DDP and FSDP average
    the ranks' gradients, so dividing by it makes the result the token-mean over every rank's tokens."""
    if agg == "token-mean":
        return (mask_micro.sum() / (mask_mini.sum() if n_tokens is None else n_tokens).clamp(min=1)).item()
    return mask_micro.shape[0] / mask_mini.shape[0]


def take(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------
def main(args: Args):
    # ---- setup: arguments, device, distributed, output folder, seed, dtype ----
    check_args(args, {**ARG_RULES, **RULES})  # before any work: a bad setting fails in one sentence
    device = pick_device(args.device)
    rank, world = init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dtype = pick_dtype(args.dtype, device)  # compute dtype; weights and AdamW state stay float32
    torch.manual_seed(args.seed)
    builtin = parse_task_name(args.task)[1] is not None
    max_new = args.max_new_tokens or default_max_new_tokens(args.task)
    lr = args.lr or (3e-4 if args.model == "tiny" else 1e-6)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts_per_step {args.prompts_per_step} must divide by the {world} ranks")
    n_prompts = args.prompts_per_step // world  # this rank's share; a group never spans ranks
    mine = slice(rank * n_prompts, (rank + 1) * n_prompts)  # this rank's prompts of the step's P
    out_dir, main_rank = Path(args.output_dir), rank == 0
    claim_output_dir(out_dir, args.resume, args.overwrite, main_rank)  # never write over a run by accident
    ckpt = read_checkpoint(out_dir, args) if args.resume else None  # before the model: a bad one fails in seconds

    # ---- data and model ----
    path = resolve_model_path(args.model, args.task)
    model, tok, stored_dtype = load_model_and_tokenizer(path, device)  # float32 master weights
    train, test = load_task(args.task)
    verifier = Verifier(args.verify_workers if args.verify_workers >= 0 else 0 if builtin else 2, args.verify_timeout)
    max_prompt = min(args.max_prompt_len, getattr(model.config, "max_position_embeddings", 10**9) - max_new)
    train = drop_long_prompts(tok, train, max_prompt, "training", args.prompts_per_step)  # prompt + response fit
    test = drop_long_prompts(tok, test, max_prompt, "test", world)[: args.eval_prompts]
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.beta > 0 else None
    sampler_dtype = dtype if args.sampler_dtype == "auto" else pick_dtype(args.sampler_dtype, device)
    sampler = make_sampler(args.backend, path, tok, stop_ids(tok, model), max_prompt + max_new, sampler_dtype, device,
                           args.vllm_gpu_memory, replicate=model if args.fsdp else None)
    policy = wrap_policy(model, world, args.fsdp, dtype)  # the model itself, DDP, or FSDP2 (then model is sharded)
    ref_model = wrap_policy(ref_model, world, True, dtype) if args.fsdp and ref_model is not None else ref_model
    # fused: one kernel for the whole update (torch's CPU default loops over the tensors in Python: 5x slower)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=True)
    start = 0
    if ckpt is not None:
        load_full_state(model, optimizer, ckpt)
        start = ckpt["step"]
        if main_rank:
            truncate_metrics(out_dir / "metrics.jsonl", start)
            print(f"resumed from {out_dir / 'checkpoint.pt'} at step {start}")
    elif main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("")
        append_metrics(out_dir / "metrics.jsonl", {"args": asdict(args), "lr": lr, "max_new_tokens": max_new})
    sampler.push_weights(model)

    def checkpoint(step):
        if not finite_weights(model):
            raise SystemExit(f"step {step}: non-finite weights; stopping without overwriting the last good checkpoint "
                             f"{out_dir / 'checkpoint.pt'}")
        state = full_state(model, optimizer)  # float32, gathered from the shards under FSDP
        if main_rank:
            save_checkpoint(out_dir / "checkpoint.pt", {**state, "step": step, "args": asdict(args)},
                            keep_previous=True)  # the one before stays as checkpoint.prev.pt

    def run_eval(step):  # every rank evaluates its share of the held-out prompts
        seeds = stream_seeds((args.seed, "eval", step), len(test))[rank::world]
        res = evaluate(model, tok, sampler, test[rank::world], args.eval_samples, max_new, args.temperature, seeds,
                       verifier)
        res = all_ranks_mean(res, weight=len(seeds))
        if main_rank:
            tqdm.write(f"eval step {step}: " + " ".join(f"{k[5:]} {v:.3f}" for k, v in res.items()))
        return res

    if start == 0 and args.eval_every:
        res = run_eval(0)
        if main_rank:
            append_metrics(out_dir / "metrics.jsonl", {"step": 0, **res})
    stop = []  # Ctrl-C or SIGTERM (a scheduler's preemption): finish the current step, save, exit; a second one kills
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: (stop.append(1), signal.signal(s, signal.SIG_DFL)))

    for step in tqdm(range(start, args.max_steps), disable=not main_rank, initial=start, total=args.max_steps):
        timer = Timer()
        rng = np.random.default_rng([args.seed, step])  # the same on every rank: each takes its slice
        # ---- rollout: G samples per prompt from the current policy ----
        examples = [train[i] for i in rng.choice(len(train), args.prompts_per_step, replace=False)[mine]]
        with timer("sample"):
            samples = sampler.generate(model, encode_prompts(tok, examples), args.group_size, max_new,
                                       args.temperature, stream_seeds((args.seed, "rollout", step),
                                                                      args.prompts_per_step)[mine])
        with timer("score"):
            texts = decode(tok, samples.response_ids)
            per_seq = [e for e in examples for _ in range(args.group_size)]
            reward = torch.tensor(verifier(per_seq, texts), device=device)  # [B]
        batch = collate(samples, tok.pad_token_id, device)  # input_ids [B, Tp+T]; mask, old_logp [B, T]

        # ---- advantage ----
        batch["adv"] = group_advantages(reward, args.group_size, args.scale_std)  # [B]  GRPO's outcome advantage
        with timer("logp"), autocast(device, dtype):
            if ref_model is not None:
                batch["ref_logp"] = token_logprobs_nograd(ref_model, batch, args.micro_batch_size,
                                                          temperature=args.temperature,
                                                          chunk_size=args.logprob_chunk)["logp"]  # [B, T]
            # LP_REG: the proxy from the data-generating policy (weights not yet updated), Eq. 5
            batch.update(proxy_logprobs(model, batch, args.micro_batch_size, args.temperature, args.kappa,
                                        args.logprob_chunk, args.full_kl_k))  # proxy_logp [B, T]

        # ---- update: epochs x mini-batches of PPO-clip steps ----
        policy.train()
        logs = []
        with timer("update"):
            for _ in range(args.epochs):
                for mini_idx in np.array_split(rng.permutation(len(reward)), args.mini_batches):
                    mini = take(batch, torch.as_tensor(mini_idx, device=device))
                    n_tokens = all_ranks_sum(mini["mask"].sum()) / world  # the token-mean spans every rank
                    mb = args.micro_batch_size or len(mini_idx)
                    select = None  # LP_REG: S over the whole mini-batch, all ranks (in the loss if one micro-batch)
                    if args.select_scope == "mini-batch" and mb < len(mini_idx):
                        with autocast(device, dtype):
                            cur = token_logprobs_nograd(model, mini, args.micro_batch_size,
                                                        temperature=args.temperature,
                                                        chunk_size=args.logprob_chunk)["logp"]  # [b, T]
                        select = select_tokens(cur, mini["adv"], mini["mask"], args.rho, across_ranks=True)  # [b, T]
                    for s in range(0, len(mini_idx), mb):
                        micro = take(mini, slice(s, s + mb))
                        sync = s + mb >= len(mini_idx) or world == 1 or args.fsdp  # DDP: all-reduce on the last
                        with contextlib.nullcontext() if sync else policy.no_sync(), autocast(device, dtype):
                            out = token_logprobs(policy, micro, args.temperature, args.logprob_chunk, with_entropy=True,
                                                 extra_ids=micro.get("proxy_ids"))  # LP_REG: pi_proxy's top-k ids
                            full_kl = full_proxy_kl(out["extra_logp"], micro["proxy_topk_logp"]) if args.full_kl_k \
                                else None  # LP_REG: Eq. 6's full forward KL (option)
                            loss, st = lp_reg_loss(out["logp"], micro["old_logp"], micro["proxy_logp"], micro["adv"],
                                                   micro["mask"], args.rho, args.lp_beta, args.eps_low, args.eps_high,
                                                   args.agg, max_new, micro.get("ref_logp"), args.beta,
                                                   None if select is None else select[s: s + mb], full_kl,
                                                   across_ranks=args.select_scope == "mini-batch")  # LP_REG
                            (loss * micro_weight(micro["mask"], mini["mask"], args.agg, n_tokens)).backward()
                        st["loss/policy"] = loss.item()
                        st["policy/entropy"] = masked_mean(out["entropy"].detach(), micro["mask"]).item()
                        logs.append(st)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                    if not np.isfinite(grad_norm):  # a NaN/inf loss ends here too, on every rank at once
                        raise SystemExit(f"step {step + 1}: gradient norm is {grad_norm} (a non-finite loss or "
                                         f"gradient); stopping. The last good checkpoint is "
                                         f"{out_dir / 'checkpoint.pt'}")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        policy.eval()
        sampler.push_weights(model)

        # ---- log, evaluate, checkpoint ----
        lens = batch["mask"].sum(-1)  # [B]
        rec = {k: float(np.mean([d[k] for d in logs])) for k in logs[0]}
        n_opt = args.epochs * args.mini_batches  # LP_REG: |S| per optimizer step, over its micro-batches and ranks
        lp = {k: sum(d[k] for d in logs) / n_opt for k in ("policy/lp_selected", "policy/lp_candidates")}
        rec.update({k: all_ranks_sum(torch.tensor(v, dtype=torch.float64)).item() for k, v in lp.items()})
        rec["policy/lp_active_ranks"] = float(lp["policy/lp_selected"] > 0)  # LP_REG: share of ranks with S not empty
        valid = batch["mask"] > 0  # LP_REG: share of sampled tokens that survive the min-p filter, over all ranks
        kept = all_ranks_sum(torch.stack([(batch["proxy_logp"][valid] > -1e3).sum(), valid.sum()]).double())
        rec["policy/proxy_kept"] = (kept[0] / kept[1].clamp(min=1)).item()
        rec.update({"reward/mean": reward.mean().item(), "reward/std": reward.std().item(),
                    "reward/solved_groups": (reward.reshape(-1, args.group_size).amax(-1) > 0).float().mean().item(),
                    "reward/zero_std_groups": (reward.reshape(-1, args.group_size).std(-1) == 0).float().mean().item(),
                    "response/len": lens.mean().item(), "perf/grad_norm": grad_norm,
                    "response/truncated": float(np.mean([f == "length" for f in samples.finish])), **verifier.last})
        rec.update({f"perf/{k}_s": v for k, v in timer.s.items()})
        rec = all_ranks_mean(rec)  # mean over ranks
        rec["step"] = step + 1  # optimizer updates done
        if world > 1:  # a Ctrl-C seen by any rank stops them all after the same step
            stop += [1] if all_ranks_sum(torch.tensor(float(len(stop)))).item() and not stop else []
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps or stop:
            checkpoint(step + 1)  # before evaluating: a failing evaluation never costs the run
        if args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            rec.update(run_eval(step + 1))
        if main_rank:
            append_metrics(out_dir / "metrics.jsonl", rec)
            tqdm.write(f"step {step + 1:4d} | reward {rec['reward/mean']:.3f} | loss {rec['loss/policy']:+.4f} | "
                       f"clip {rec['policy/clipfrac']:.3f} | entropy {rec['policy/entropy']:.3f} | "
                       f"len {rec['response/len']:.1f} | |S| {rec['policy/lp_selected']:.0f} | "  # LP_REG
                       f"{sum(timer.s.values()):.2f}s")
        if main_rank and args.log_examples_every and step % args.log_examples_every == 0:
            for p, c, r in list(zip(samples.prompt_ids, texts, reward.tolist()))[:: args.group_size][:3]:
                tqdm.write(f"  {tok.decode(p)!r} -> {c!r} reward {r:.0f}")  # the prompt as the model saw it
        if stop:
            print(f"interrupted: saved {out_dir / 'checkpoint.pt'} at step {step + 1}; continue with --resume")
            break
    if not stop:
        weights = full_state(model)["model"]  # gathered on rank 0 under FSDP
        if main_rank:
            save_final(model, tok, out_dir / "final", weights, stored_dtype)
    verifier.close()
    return model


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # all ranks leave together
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.destroy_process_group()
        else:  # gloo's threads can abort the interpreter's exit (torch 2.13); everything is saved: leave at once
            print(end="", flush=True)
            os._exit(0)
