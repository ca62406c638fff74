"""DPH-RL: GRPO that rehearses the prompts the initial policy already solves with a mass-covering f-divergence.

"The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in RLVR" (Li et al. 2025, arXiv
2509.07430; official code github.com/seamoke/DPH-RL, a verl fork), as grpo.py except:
  1. once, before RL: k samples per training prompt from the initial policy; prompts with >= pef_min_correct correct
     (default all k) form D_pef, all others D_exp. Each D_pef prompt gets one more sample, stored with its per-token
     log pi_ref only if it is correct. No reference model is kept. The split is cached by its settings in
     $RLVR_CACHE/dph_split/ (a fresh run with the same settings reuses it) and copied to <output_dir>/pef_cache.pt;
  2. rollouts only on D_exp; each step adds a block of stored D_pef samples (1 per 8 rollouts) to the batch;
  3. D_exp rows: PPO-clip with clip-higher (eps 0.2 / 0.28) and dual-clip c = 3, token-mean, no KL;
  4. D_pef rows: the generator-form f-divergence E_{y~pi_ref}[f(pi / pi_ref)] on the stored tokens, JS by default
     (forward KL and alpha as options), token-mean, weight eta;
  5. routed per sample and combined as (N_exp/N) L_exp + eta (N_pef/N) L_pef (`share`, the official code's
     effective weighting) or L_exp + eta L_pef (`paper`); N and both token-means span the batch of every rank.
Logs beside grpo.py's keys: loss/exp, policy/divergence (L_pef), pef/{prompts,exp_prompts,stored,split_pass@1,block}.

CPU, embedded tiny model, ~3 minutes:  python dph_rl.py  (the first run also splits the 5,000 training prompts)
GPU (pip install vllm):                python dph_rl.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k
Several GPUs, data parallel:           torchrun --nproc_per_node 8 dph_rl.py --model ... --task gsm8k
A model too big for one GPU (FSDP2):   torchrun --nproc_per_node 8 dph_rl.py --model ... --fsdp true
"""
import contextlib
import hashlib
import json
import math
import os
import signal
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (ARG_RULES, Samples, Timer, Verifier, all_ranks_mean, all_ranks_sum, append_metrics, autocast,
                    cache_root, check_args, claim_output_dir, collate, decode, default_max_new_tokens,
                    drop_long_prompts, encode_prompts, evaluate, finite_weights, full_state, init_distributed, is_int,
                    is_num, load_full_state, load_model_and_tokenizer, load_task, make_sampler, masked_mean,
                    parse_task_name, pick_device, pick_dtype, read_checkpoint, resolve_model_path, save_checkpoint,
                    save_final, stop_ids, stream_seeds, token_logprobs, truncate_metrics, wrap_policy)


@dataclass
class Args:
    model: str = "tiny"  # "tiny" (embedded default, built on first use), a Hugging Face id, or a local folder
    task: str = "countdown"  # countdown[:numbers], arithmetic[:digits], sum[:terms], gsm8k, math500, a .jsonl path
    backend: str = "auto"  # sampler: hf | vllm | auto (vLLM when it imports and the device is CUDA)
    vllm_gpu_memory: float = 0.3  # share of the GPU's memory vLLM may take beside the trainer
    verify_workers: int = -1  # verifier processes; -1 = 2 for math tasks (math-verify), 0 (in-process) for built-ins
    verify_timeout: float = 60.0  # seconds a step's verification may take; what is left scores 0 (verify/timed_out)
    output_dir: str = "runs/dph_rl"  # metrics.jsonl, checkpoint.pt and final/ go here
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
    micro_batch_size: int = 0  # sequences per forward (gradient accumulation; reference pass too); 0 = all
    eps_low: float = 0.2  # PPO clip: ratio >= 1 - eps_low
    eps_high: float = 0.28  # PPO clip: ratio <= 1 + eps_high. DPH-RL: clip-higher 0.28 (official scripts/llama/*.sh)
    scale_std: bool = True  # divide the advantage by the group std (False: Dr. GRPO's advantage)
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean (original GRPO) | seq-mean-token-sum-norm (Dr. GRPO)
    logprob_chunk: int = 256  # response tokens projected to the vocabulary at a time (memory: bench/logprob_memory.py)
    eval_every: int = 10  # steps between evaluations on held-out prompts (0 = only at the end)
    eval_prompts: int = 128  # held-out prompts per evaluation
    eval_samples: int = 16  # samples per held-out prompt: pass@k for k in 1, 8, 16 (where <= n) and n
    log_examples_every: int = 25  # print a few completions every N steps (0 = never)
    save_every: int = 25  # checkpoint every N steps (also at the end and on Ctrl-C)
    # DPH-RL (arXiv 2509.07430; where a default is a detail of the official code, the comment names its source)
    divergence: str = "js"  # f-divergence on D_pef: js (2 JS, the code's js_low_var) | forward_kl (k3) | alpha
    alpha: float = 0.2  # alpha-divergence order, in (0, 1): ->1 forward KL, ->0 reverse KL (official alpha.sh: 0.2)
    eta: float = -1.0  # D_pef loss weight; < 0: js 0.2 (the paper), forward_kl / alpha 0.05 (top of the official
    #                   README's ranges: our pick); 0 = DAPO
    pef_weighting: str = "share"  # share: (N_exp/N) L_exp + eta (N_pef/N) L_pef (code) | paper: L_exp + eta L_pef
    pef_k: int = 8  # samples per training prompt in the offline split (official scripts/llama/offline_sampling.sh)
    pef_min_correct: int = 8  # D_pef: at least this many correct of pef_k ("perfect": all k; the paper, while the
    #                          official split script keeps 4 of the first 4)
    pef_split_prompts: int = 0  # split only the first N training prompts (the others stay in D_exp); 0 = all
    pef_per_step: int = 0  # stored D_pef rows per step, all ranks; 0 = P * G / 8 (official ray_trainer.py fit)
    dual_clip: float = 3.0  # for adv < 0 the token loss is at most -adv * dual_clip (verl's clip_ratio_c); 0 = off


RULES = {  # DPH-RL's own arguments: (a test of the value v given all the arguments a, what it must be)
    "divergence": (lambda v, a: v in ("js", "forward_kl", "alpha"), "be js, forward_kl or alpha"),
    "alpha": (lambda v, a: is_num(v) and 0 < v < 1, "be in (0, 1)"),
    "eta": (lambda v, a: is_num(v), "be a finite weight (< 0: the divergence's default)"),
    "pef_weighting": (lambda v, a: v in ("share", "paper"), "be share or paper"),
    "pef_k": (lambda v, a: is_int(v) and v >= 1, "be at least 1"),
    "pef_min_correct": (lambda v, a: is_int(v) and 1 <= v <= a.pef_k, "be between 1 and --pef_k"),
    "pef_split_prompts": (lambda v, a: is_int(v) and v >= 0, "be >= 0 (0 = all)"),
    "pef_per_step": (lambda v, a: is_int(v) and v >= 0, "be >= 0 (0 = P * G / 8)"),
    "dual_clip": (lambda v, a: is_num(v) and (v == 0 or v > 1), "be 0 (off) or > 1, as verl's clip_ratio_c"),
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


def policy_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28, agg="token-mean", max_len=None, dual_clip=3.0):
    """PPO-clip on the token ratio with dual-clip, no KL: the official code's D_exp loss (verl core_algos.py
    compute_policy_loss). logp, old_logp, mask: [B, T]; adv: [B]. Returns (scalar loss, stats dict of floats)."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # [B, T]
    a = adv[:, None]  # [B, 1]
    unclipped = -a * ratio  # [B, T]
    clipped = -a * ratio.clamp(1 - eps_low, 1 + eps_high)  # [B, T]
    token_loss = torch.max(unclipped, clipped)  # [B, T]  PPO: the pessimistic of the two
    if dual_clip:  # DPH-RL: dual-clip, adv < 0: at most -adv * c (verl compute_policy_loss, clip_ratio_c = 3)
        token_loss = torch.where(a < 0, torch.minimum(token_loss, -a * dual_clip), token_loss)  # [B, T]
    stats = {"policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "policy/ratio": masked_mean(ratio.detach(), mask).item()}
    return aggregate(token_loss, mask, agg, max_len), stats  # L_exp


def f_divergence(logp, ref_logp, mask, kind="js", alpha=0.2):
    """Token-mean over `mask` of the generator f(u), u = pi / pi_ref = exp(logp - ref_logp), on tokens sampled from
    pi_ref (the official core_algos.py's kl_penalty "low_var_kl" with swapped arguments, js_low_var,
    alpha_divergence_f): its expectation under pi_ref is the divergence. logp, ref_logp, mask: [B, T] -> scalar."""
    delta = torch.where(mask > 0, logp - ref_logp, 0.0)  # [B, T]  log u; 0 off the mask, so f and f' are 0 there
    if kind == "forward_kl":  # u - 1 - log u: KL(pi_ref || pi), k3 with the roles swapped
        d = delta.clamp(-20, 20)  # [B, T]  verl low_var_kl's clamps: delta to +-20, the value to +-10
        f = (torch.expm1(d) - d).clamp(-10, 10)  # [B, T]  past the clamp (delta < -11.0 or > 2.61) the gradient is 0
    elif kind == "js":  # u log u - (u+1) log((u+1)/2) = 2 JS(pi, pi_ref): js_low_var has no 1/2 and no clamps
        log2 = math.log(2.0)  # stable form of the same f: u (log 2 - softplus(-delta)) - (softplus(delta) - log 2)
        f = torch.exp(delta) * (log2 - F.softplus(-delta)) - (F.softplus(delta) - log2)  # [B, T]
    elif kind == "alpha":  # (u^(1-a) - (1-a) u - a) / (a (a-1)), written with expm1
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        f = (torch.expm1((1 - alpha) * delta) - (1 - alpha) * torch.expm1(delta)) / (alpha * (alpha - 1))  # [B, T]
    else:
        raise ValueError(f"unknown divergence {kind!r}: js | forward_kl | alpha")
    return masked_mean(f, mask)  # L_pef = TM(f(u))


def route_counts(mask, is_pef):
    """[4]: response tokens of the D_exp rows, of the D_pef rows, then their numbers of rows (dph_loss's normalisers).
    mask: [B, T]; is_pef: [B]."""
    tokens = mask.sum(-1)  # [B]
    return torch.stack([tokens[~is_pef].sum(), tokens[is_pef].sum(), (~is_pef).sum().float(), is_pef.sum().float()])


def dph_loss(logp, old_logp, ref_logp, adv, mask, is_pef, eta, divergence="js", alpha=0.2, weighting="share",
             eps_low=0.2, eps_high=0.28, dual_clip=3.0, agg="token-mean", max_len=None, counts=None):
    """Per-sample routing (the official code routes whole micro-batches by their first row): D_exp rows get PPO-clip
    with `adv`, D_pef rows eta * f-divergence toward their stored ref_logp, nothing else. logp, old_logp, ref_logp,
    mask: [B, T]; adv, is_pef: [B]. `counts`: route_counts of the whole mini-batch, summed over ranks / world, when
    this is a micro-batch of it: the loss is then its share, and the shares (averaged over ranks) add up to it."""
    n_exp_tok, n_pef_tok, n_exp, n_pef = (route_counts(mask, is_pef) if counts is None else counts).tolist()
    e, p = ~is_pef, is_pef  # [B]
    if weighting == "share":  # (N_exp/N) L_exp + eta (N_pef/N) L_pef, N in rows: official dp_actor.py update_policy
        s_exp, s_pef = n_exp / (n_exp + n_pef), n_pef / (n_exp + n_pef)
    elif weighting == "paper":  # L_exp + eta L_pef (the paper's objective)
        s_exp, s_pef = 1.0, 1.0
    else:
        raise ValueError(f"unknown pef_weighting {weighting!r}: share | paper")
    loss_exp, stats = logp.new_zeros(()), {"policy/clipfrac": 0.0, "policy/ratio": 1.0}
    if e.any():  # L_exp
        loss_exp, stats = policy_loss(logp[e], old_logp[e], adv[e], mask[e], eps_low, eps_high, agg, max_len, dual_clip)
    loss_pef = f_divergence(logp[p], ref_logp[p], mask[p], divergence, alpha) if p.any() else logp.new_zeros(())
    if agg == "token-mean":  # this micro-batch's share of each mean: its tokens of the whole's
        w_exp = mask[e].sum().item() / max(n_exp_tok, 1)
    else:  # the sequence-mean aggregations: its rows of the whole's
        w_exp = e.sum().item() / max(n_exp, 1)
    w_pef = mask[p].sum().item() / max(n_pef_tok, 1)  # L_pef is always a token-mean
    loss = s_exp * w_exp * loss_exp + eta * s_pef * w_pef * loss_pef  # L_DPH
    stats.update({"loss/exp": loss_exp.item(), "policy/divergence": loss_pef.item(),
                  "loss/policy": s_exp * loss_exp.item() + eta * s_pef * loss_pef.item()})
    return loss, stats


def split_pef(correct, min_correct: int):
    """correct: BoolTensor [P, k] -> [P]: True (D_pef) where at least min_correct are correct."""
    return correct.sum(-1) >= min_correct


def build_pef(model, tok, sampler, examples: list, index: list, k: int, min_correct: int, max_new: int,
              temperature: float, seed: int, chunk: int = 64, progress: bool = False, verifier=None) -> dict:
    """k samples per prompt from the initial policy -> D_pef / D_exp; one more sample per D_pef prompt, stored only
    if correct, with its per-token log pi_ref: the sampler's log-probs at the training temperature (top_p 1).
    `index`: the examples' positions in the training set. A prompt's streams derive from (seed, purpose, position)
    alone: the split does not depend on the ranks or chunks computing it, and the extra sample replays no split
    sample. `chunk` prompts per generate call (a progress-bar step). `verifier`: a common.Verifier (default: in this
    process, no worker)."""
    verifier = verifier or Verifier()
    n = max(index, default=-1) + 1
    split_seeds, extra_seeds = stream_seeds((seed, "pef_split"), n), stream_seeds((seed, "pef_extra"), n)
    res = {"pef_idx": [], "n_correct": [], "prompt_ids": [], "response_ids": [], "ref_logp": []}
    for c in tqdm(range(0, len(examples), chunk), desc="D_pef split", unit="chunk", disable=not progress):
        ex, idx = examples[c: c + chunk], index[c: c + chunk]
        prompts = encode_prompts(tok, ex)
        s = sampler.generate(model, prompts, k, max_new, temperature, [split_seeds[i] for i in idx])
        texts = decode(tok, s.response_ids)
        correct = torch.tensor([r == 1.0 for r in verifier([e for e in ex for _ in range(k)], texts)])
        correct = correct.reshape(len(ex), k)  # [p, k]
        sel = split_pef(correct, min_correct).nonzero().flatten().tolist()  # the chunk's D_pef prompts
        x = sampler.generate(model, [prompts[i] for i in sel], 1, max_new, temperature,
                             [extra_seeds[idx[i]] for i in sel]) if sel else Samples([], [], [], [])  # M = 1
        ok = [r == 1.0 for r in verifier([ex[i] for i in sel], decode(tok, x.response_ids))]  # kept if correct
        res["pef_idx"] += [idx[i] for i in sel]
        res["n_correct"] += correct.sum(-1).tolist()
        for key, vals in (("prompt_ids", x.prompt_ids), ("response_ids", x.response_ids), ("ref_logp", x.logp)):
            res[key] += [v for v, o in zip(vals, ok) if o]
    return res


def split_cache_file(model_path: str, examples: list, settings: dict) -> Path:
    """Where a split is cached: $RLVR_CACHE/dph_split/<hash of its key>.pt. The key is the model (a local folder
    also by its config.json's mtime: a model rebuilt or retrained in the same folder is another model), a
    fingerprint of the split prompts and their answers, and every setting that changes the samples."""
    config = Path(model_path).expanduser() / "config.json"
    key = dict(settings, model=str(config.parent.resolve()) if config.exists() else model_path,
               config_mtime=config.stat().st_mtime_ns if config.exists() else None,
               prompts=zlib.crc32("\n".join(f"{e.prompt}\t{e.question}\t{e.gold}" for e in examples).encode()))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "dph_split" / f"{digest}.pt"


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
    eta = args.eta if args.eta >= 0 else {"js": 0.2, "forward_kl": 0.05, "alpha": 0.05}[args.divergence]  # DPH-RL
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
    sampler_dtype = dtype if args.sampler_dtype == "auto" else pick_dtype(args.sampler_dtype, device)
    sampler = make_sampler(args.backend, path, tok, stop_ids(tok, model), max_prompt + max_new, sampler_dtype, device,
                           args.vllm_gpu_memory, replicate=model if args.fsdp else None)
    policy = wrap_policy(model, world, args.fsdp, dtype)  # the model itself, DDP, or FSDP2 (then model is sharded)
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
        append_metrics(out_dir / "metrics.jsonl", {"args": asdict(args), "lr": lr, "max_new_tokens": max_new,
                                                     "eta": eta})  # DPH-RL: eta
    sampler.push_weights(model)

    # ---- DPH-RL: offline split into D_pef / D_exp and the stored rehearsal samples, once, before RL ----
    n_split = min(len(train), args.pef_split_prompts or len(train))
    shared = split_cache_file(path, train[:n_split], dict(  # every setting that changes the split's samples
        task=args.task, k=args.pef_k, min_correct=args.pef_min_correct, max_new=max_new, temperature=args.temperature,
        seed=args.seed, n_prompts=n_split, backend=sampler.name, dtype=str(dtype)))
    cache = out_dir / "pef_cache.pt"  # the run's copy: resumed, it reuses the initial policy's split, never redoes it
    if start > 0 and not cache.exists():
        raise SystemExit(f"--resume needs {cache} (the D_pef split written by the first run)")
    source = cache if start > 0 else shared
    found = [torch.load(source, weights_only=False) if main_rank and source.exists() else None]
    if world > 1:  # rank 0's copy, so that every rank takes the same branch
        torch.distributed.broadcast_object_list(found)
    pef = found[0]
    if pef is None:  # each rank splits a contiguous share, so the gathered lists are in training-set order
        index = np.array_split(np.arange(n_split), world)[rank].tolist()
        pef = build_pef(model, tok, sampler, [train[i] for i in index], index, args.pef_k, args.pef_min_correct,
                        max_new, args.temperature, args.seed, progress=main_rank, verifier=verifier)
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, pef)
            pef = {k: sum((q[k] for q in parts), []) for k in pef}
    if main_rank:
        print(f"loaded the D_pef split from {source}" if found[0] is not None else f"cached the split in {shared}")
        if found[0] is None:
            save_checkpoint(shared, pef)  # a fresh run with the same model, data and split settings reuses it
        if start == 0:
            save_checkpoint(cache, pef)  # the copy --resume reads
    in_pef = set(pef["pef_idx"])
    exp_train = [e for i, e in enumerate(train) if i not in in_pef]  # D_exp: all other prompts, the unsplit ones too
    if len(exp_train) < args.prompts_per_step:
        raise SystemExit(f"D_exp has only {len(exp_train)} prompts (the initial policy solves the other "
                         f"{len(in_pef)}), fewer than --prompts_per_step {args.prompts_per_step}: use more data or "
                         f"fewer prompts per step")
    n_stored = len(pef["ref_logp"])
    n_block = args.pef_per_step or max(1, args.prompts_per_step * args.group_size // 8 // world) * world  # all ranks
    n_block = n_block if n_stored else 0
    if n_block % world:  # equal shares: every rank must make as many forward calls (DDP and FSDP sync in each)
        raise SystemExit(f"--pef_per_step {n_block} must divide by the {world} ranks")
    pef_stats = {"pef/prompts": len(in_pef), "pef/exp_prompts": len(exp_train), "pef/stored": n_stored,
                 "pef/split_pass@1": float(np.mean(pef["n_correct"])) / args.pef_k, "pef/block": n_block}
    if main_rank:
        print(f"D_pef: {len(in_pef)} of {len(pef['n_correct'])} split prompts ({n_stored} stored samples); "
              f"D_exp: {len(exp_train)} prompts; {n_block} D_pef sequences per step")

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
        examples = [exp_train[i] for i in rng.choice(len(exp_train), args.prompts_per_step, replace=False)[mine]]
        with timer("sample"):
            samples = sampler.generate(model, encode_prompts(tok, examples), args.group_size, max_new,
                                       args.temperature, stream_seeds((args.seed, "rollout", step),
                                                                      args.prompts_per_step)[mine])
        with timer("score"):
            texts = decode(tok, samples.response_ids)
            per_seq = [e for e in examples for _ in range(args.group_size)]
            reward = torch.tensor(verifier(per_seq, texts), device=device)  # [B]
        # DPH-RL: a block of stored D_pef samples joins the batch after the rollouts, with the stored log pi_ref in
        # place of old_logp: a random block per step (the official code tiles and shuffles the stored set), drawn
        # for all ranks at once, each rank taking its share, so that N ranks train on the rows 1 process would
        blk = rng.choice(n_stored, n_block, replace=n_stored < n_block).reshape(world, -1)[rank] if n_block else []
        pick = lambda key: [pef[key][i] for i in blk]  # noqa: E731
        both = Samples(samples.prompt_ids + pick("prompt_ids"), samples.response_ids + pick("response_ids"),
                       samples.logp + pick("ref_logp"), samples.finish + ["stop"] * len(blk))
        batch = collate(both, tok.pad_token_id, device)  # input_ids [B+Bp, Tp+T]; mask, old_logp [B+Bp, T]
        batch["is_pef"] = torch.arange(len(both.finish), device=device) >= len(reward)  # [B+Bp]  DPH-RL: routing
        batch["ref_logp"] = batch["old_logp"] * batch["is_pef"][:, None]  # [B+Bp, T]  DPH-RL: stored log pi_ref

        # ---- advantage ----
        batch["adv"] = group_advantages(reward, args.group_size, args.scale_std)  # [B]  GRPO's outcome advantage
        batch["adv"] = torch.cat([batch["adv"], reward.new_zeros(len(blk))])  # [B+Bp]  DPH-RL: none on D_pef rows

        # ---- update: epochs x mini-batches of PPO-clip steps ----
        policy.train()
        logs = []
        with timer("update"):
            for _ in range(args.epochs):
                for mini_idx in np.array_split(rng.permutation(len(batch["adv"])), args.mini_batches):
                    mini = take(batch, torch.as_tensor(mini_idx, device=device))
                    counts = all_ranks_sum(route_counts(mini["mask"], mini["is_pef"])) / world  # DPH-RL: all ranks
                    mb = args.micro_batch_size or len(mini_idx)
                    for s in range(0, len(mini_idx), mb):
                        micro = take(mini, slice(s, s + mb))
                        sync = s + mb >= len(mini_idx) or world == 1 or args.fsdp  # DDP: all-reduce on the last
                        with contextlib.nullcontext() if sync else policy.no_sync(), autocast(device, dtype):
                            out = token_logprobs(policy, micro, args.temperature, args.logprob_chunk, with_entropy=True)
                            loss, st = dph_loss(out["logp"], micro["old_logp"], micro["ref_logp"], micro["adv"],
                                                micro["mask"], micro["is_pef"], eta, args.divergence, args.alpha,
                                                args.pef_weighting, args.eps_low, args.eps_high, args.dual_clip,
                                                args.agg, max_new, counts)  # DPH-RL
                            loss.backward()  # DPH-RL: dph_loss already returns this micro-batch's share
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
        lens = batch["mask"][: len(reward)].sum(-1)  # [B]  DPH-RL: rollouts only
        rec = {k: float(np.mean([d[k] for d in logs])) for k in logs[0]}
        rec.update({"reward/mean": reward.mean().item(), "reward/std": reward.std().item(),
                    "reward/solved_groups": (reward.reshape(-1, args.group_size).amax(-1) > 0).float().mean().item(),
                    "reward/zero_std_groups": (reward.reshape(-1, args.group_size).std(-1) == 0).float().mean().item(),
                    "response/len": lens.mean().item(), "perf/grad_norm": grad_norm,
                    "response/truncated": float(np.mean([f == "length" for f in samples.finish])), **verifier.last,
                    **pef_stats})  # DPH-RL
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
                       f"div {rec['policy/divergence']:.4f} | "  # DPH-RL
                       f"len {rec['response/len']:.1f} | {sum(timer.s.values()):.2f}s")
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
