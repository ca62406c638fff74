"""Delta-L normalization: GRPO with an unbiased, minimum-variance aggregation of the loss over response lengths.

He et al. 2025, "Delta-L Normalization: Rethink Loss Aggregation in RLVR" (v2: "VL Norm"), arXiv 2509.07558; official
code github.com/zerolllin/Delta-L-Normalization (a verl fork). Everything is grpo.py except how the per-token loss
becomes one scalar:
  1. each response i contributes c_i * sum_t l_{i,t}: its summed token loss times one weight (not a token mean);
  2. c_i = (1/M) L_i^(-alpha) / sum_j L_j^(-alpha), the sum over the optimizer step's responses on every rank (the
     official code: the whole rollout batch; the same at the default --mini_batches 1), L_i = response length
     with EOS, M = the configured max response length; the exponent is NEGATIVE (the official code scales each
     advantage by 1 / (L_i / mean L)^alpha; a widely shared summary drops the minus sign);
  3. why: if every response's gradient g_i estimates the same grad J with Var(g_i) ~ L_i, then sum_i c_i = 1/M
     (independent of the sampled lengths) makes the update unbiased, and c_i ~ 1/L_i minimises its variance
     (inverse-variance weighting); alpha = 1 is that optimum, alpha = 0 is exactly Dr. GRPO's constant 1/(B*M);
  4. --agg keeps GRPO (seq-mean), DAPO (token-mean) and Dr. GRPO (constant) for comparison in one function;
     bench/delta_l_cv.py measures the gradient's coefficient of variation under each.
Logs beside grpo.py's keys: loss/gain (sum_i c_i * M, 1 when unbiased) and policy/dl_weight_spread.

CPU, embedded tiny model, ~2 minutes:  python delta_l.py
GPU (pip install vllm):                python delta_l.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --alpha 0.75
Several GPUs, data parallel:           torchrun --nproc_per_node 8 delta_l.py --model ... --task gsm8k
A model too big for one GPU (FSDP2):   torchrun --nproc_per_node 8 delta_l.py --model ... --fsdp true
"""
import contextlib
import copy
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import (ARG_RULES, Timer, Verifier, all_ranks_mean, all_ranks_sum, append_metrics, autocast, check_args,
                    claim_output_dir, collate, decode, default_max_new_tokens, drop_long_prompts, encode_prompts,
                    evaluate, finite_weights, full_state, init_distributed, is_num, load_full_state,
                    load_model_and_tokenizer, load_task, make_sampler, masked_mean, parse_task_name, pick_device,
                    pick_dtype, read_checkpoint, resolve_model_path, save_checkpoint, save_final, stop_ids,
                    stream_seeds, token_logprobs, token_logprobs_nograd, truncate_metrics, wrap_policy)


@dataclass
class Args:
    model: str = "tiny"  # "tiny" (embedded default, built on first use), a Hugging Face id, or a local folder
    task: str = "countdown"  # countdown[:numbers], arithmetic[:digits], sum[:terms], gsm8k, math500, a .jsonl path
    backend: str = "auto"  # sampler: hf | vllm | auto (vLLM when it imports and the device is CUDA)
    vllm_gpu_memory: float = 0.3  # share of the GPU's memory vLLM may take beside the trainer
    verify_workers: int = -1  # verifier processes; -1 = 2 for math tasks (math-verify), 0 (in-process) for built-ins
    verify_timeout: float = 60.0  # seconds a step's verification may take; what is left scores 0 (verify/timed_out)
    output_dir: str = "runs/delta_l"  # metrics.jsonl, checkpoint.pt and final/ go here
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
    eps_high: float = 0.2  # PPO clip: ratio <= 1 + eps_high (DAPO's clip-higher uses 0.28)
    beta: float = 0.0  # k3 KL to the initial policy; 0 loads no reference model
    scale_std: bool = True  # divide the advantage by the group std (False: Dr. GRPO's advantage)
    agg: str = "delta_l"  # delta_l | grpo (seq-mean-token-mean) | dapo (token-mean) | dr_grpo (token sum / (B * M))
    alpha: float = 1.0  # Delta-L exponent, c_i ~ L_i^(-alpha): 1 = minimum variance; the official train_scripts use
    #                     1 on CountDown and 0.75 on Math (countdown-3b-delta-l-norm-alpha-1.sh, math-3b-...-0.75.sh)
    logprob_chunk: int = 256  # response tokens projected to the vocabulary at a time (memory: bench/logprob_memory.py)
    eval_every: int = 10  # steps between evaluations on held-out prompts (0 = only at the end)
    eval_prompts: int = 128  # held-out prompts per evaluation
    eval_samples: int = 16  # samples per held-out prompt: pass@k for k in 1, 8, 16 (where <= n) and n
    log_examples_every: int = 25  # print a few completions every N steps (0 = never)
    save_every: int = 25  # checkpoint every N steps (also at the end and on Ctrl-C)


RULES = {  # Delta-L's own arguments: (a test of the value v given all the arguments a, what it must be)
    "agg": (lambda v, a: v in ("delta_l", "grpo", "dapo", "dr_grpo", "token-mean", "seq-mean-token-mean",
                               "seq-mean-token-sum-norm"), "be delta_l, grpo, dapo or dr_grpo (or their long names)"),
    "alpha": (lambda v, a: is_num(v) and v >= 0, "be >= 0 (1 = minimum variance)"),
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


def delta_l_weights(lengths, alpha: float = 1.0, max_len: float = 1.0):
    """c_i = (1/M) L_i^(-alpha) / sum_j L_j^(-alpha), M = max_len: [B] -> [B], summing to 1/M (arXiv 2509.07558).
    Computed in float32 on L / mean(L), as the official compute_grpo_outcome_advantage (use_grpopp) does: the scale
    cancels, and the powers stay in range for long responses. L >= 1, so empty rows cannot divide by zero."""
    L = lengths.float().clamp(min=1)  # [B]
    w = (L / L.mean()) ** -alpha  # [B]  NEGATIVE exponent: inverse-variance weights, Var(g_i) ~ L_i
    return w / (w.sum() * max_len)  # [B]  c_i, sum_i c_i = 1/M


def aggregate(token_loss, mask, mode: str = "delta_l", alpha: float = 1.0, max_len: int = None):
    """Reduce a [B, T] per-token loss to a scalar over the response tokens (mask == 1): sum_i c_i sum_t l_{i,t},
    c_i per mode below. max_len = M, the configured response cap (the padded width if None)."""
    if mode in ("dapo", "token-mean"):  # DAPO (arXiv 2503.14476): every token weighs the same, c_i = 1 / sum_j L_j
        return (token_loss * mask).sum() / mask.sum().clamp(min=1)
    if mode in ("grpo", "seq-mean-token-mean"):  # original GRPO: mean over each response, c_i = 1 / (B L_i)
        return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if mode in ("dr_grpo", "seq-mean-token-sum-norm"):  # Dr. GRPO (arXiv 2503.20783): c_i = 1 / (B M), a constant
        return (token_loss * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    if mode == "delta_l":  # Delta-L: c_i over these rows; micro_weight rescales a micro-batch's sum to the optimizer
        # step's rows on every rank. The official code weighs the whole rollout batch before splitting it (the same at
        # the default --mini_batches 1); with more, each step is renormalised, so sum_i c_i = 1/M on every step
        c = delta_l_weights(mask.sum(-1), alpha, max_len or mask.shape[1])  # [B]  sum_i c_i = 1/M
        return (c * (token_loss * mask).sum(-1)).sum()  # LOSS = sum_i c_i sum_t m_{i,t} l_{i,t}
    raise ValueError(f"unknown agg {mode!r}")


def policy_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, agg="delta_l", max_len=None,
                ref_logp=None, beta=0.0, alpha=1.0):
    """PPO-clip on the token ratio, plus beta * k3 KL to the reference. logp, old_logp, ref_logp, mask: [B, T];
    adv: [B]. Returns (scalar loss, stats dict of floats)."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # [B, T]
    a = adv[:, None]  # [B, 1]
    unclipped = -a * ratio  # [B, T]
    clipped = -a * ratio.clamp(1 - eps_low, 1 + eps_high)  # [B, T]
    token_loss = torch.max(unclipped, clipped)  # [B, T]  PPO: the pessimistic of the two
    stats = {"policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "policy/ratio": masked_mean(ratio.detach(), mask).item()}
    if ref_logp is not None and beta > 0:
        d = (ref_logp - logp).clamp(-20, 20)  # [B, T]
        kl = torch.exp(d) - d - 1  # [B, T]  k3 estimator of KL(pi || pi_ref), >= 0
        token_loss = token_loss + beta * kl  # DELTA_L: kept inside the weighted sum (the official runs: no KL loss)
        stats["policy/kl"] = masked_mean(kl.detach(), mask).item()
    return aggregate(token_loss, mask, agg, alpha, max_len), stats  # DELTA_L: LOSS = sum_i c_i sum_t l_{i,t}


def normaliser(mask, agg: str, alpha: float = 1.0):
    """What a mode divides a batch's summed loss by, as a float64 0-dim tensor: the token count (dapo),
    sum_i L_i^(-alpha) (delta_l), or the row count (grpo, dr_grpo: a mean over rows). mask: [B, T]."""
    if agg in ("dapo", "token-mean"):
        return mask.sum().double()
    if agg == "delta_l":
        return (mask.sum(-1).double().clamp(min=1) ** -alpha).sum()
    return torch.tensor(float(mask.shape[0]), dtype=torch.float64, device=mask.device)


def micro_weight(mask_micro, mask_mini, agg: str, alpha: float = 1.0, total=None) -> float:
    """Share of a micro-batch in its mini-batch loss, so that accumulated gradients equal the whole-batch one:
    normaliser(micro) / normaliser(mini), never a mean of per-micro-batch means. total: the mini-batch's normaliser
    averaged over ranks (default: this mini-batch's). DDP and FSDP average the ranks' gradients, so dividing by it
    makes the result the loss over every rank's rows: for delta_l, sum_j L_j^(-alpha) runs over all ranks."""
    den = normaliser(mask_mini, agg, alpha) if total is None else total
    return (normaliser(mask_micro, agg, alpha) / den).item() if den > 0 else 0.0  # den 0: no tokens, loss 0


def length_metrics(lengths, agg: str, alpha: float, max_len: int) -> dict:
    """What an aggregation makes of these response lengths [N]: the gain M sum_i c_i (1 for delta_l and dr_grpo
    whatever the lengths, the unbiasedness claim; length-dependent for grpo and dapo) and the spread max/min of the
    delta_l weights (1 = equal lengths, where every mode is the same up to a constant)."""
    L = lengths.float()  # [N]
    mask = (torch.arange(max(1, int(L.max().item())), device=L.device) < L[:, None]).float()  # [N, max L]
    gain = aggregate(mask / L.clamp(min=1)[:, None], mask, agg, alpha, max_len)  # each row's loss 1/L_i sums to 1
    c = delta_l_weights(L, alpha, max_len)  # [N]
    return {"loss/gain": max_len * gain.item(), "policy/dl_weight_spread": (c.max() / c.min()).item()}


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

        # ---- update: epochs x mini-batches of PPO-clip steps ----
        policy.train()
        logs = []
        with timer("update"):
            for _ in range(args.epochs):
                for mini_idx in np.array_split(rng.permutation(len(reward)), args.mini_batches):
                    mini = take(batch, torch.as_tensor(mini_idx, device=device))
                    total = all_ranks_sum(normaliser(mini["mask"], args.agg, args.alpha)) / world  # DELTA_L: over
                    #   every rank: sum_j L_j^(-alpha) for delta_l (the official code weighs the whole rollout batch)
                    mb = args.micro_batch_size or len(mini_idx)
                    for s in range(0, len(mini_idx), mb):
                        micro = take(mini, slice(s, s + mb))
                        sync = s + mb >= len(mini_idx) or world == 1 or args.fsdp  # DDP: all-reduce on the last
                        with contextlib.nullcontext() if sync else policy.no_sync(), autocast(device, dtype):
                            out = token_logprobs(policy, micro, args.temperature, args.logprob_chunk, with_entropy=True)
                            loss, st = policy_loss(out["logp"], micro["old_logp"], micro["adv"], micro["mask"],
                                                   args.eps_low, args.eps_high, args.agg, max_new,
                                                   micro.get("ref_logp"), args.beta, args.alpha)  # DELTA_L: M = max_new
                            share = micro_weight(micro["mask"], mini["mask"], args.agg, args.alpha, total)  # DELTA_L
                            (loss * share).backward()
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
        rec.update({"reward/mean": reward.mean().item(), "reward/std": reward.std().item(),
                    "reward/solved_groups": (reward.reshape(-1, args.group_size).amax(-1) > 0).float().mean().item(),
                    "reward/zero_std_groups": (reward.reshape(-1, args.group_size).std(-1) == 0).float().mean().item(),
                    "response/len": lens.mean().item(), "perf/grad_norm": grad_norm,
                    "response/truncated": float(np.mean([f == "length" for f in samples.finish])), **verifier.last})
        rec.update({f"perf/{k}_s": v for k, v in timer.s.items()})
        pad = (rank * len(lens), (world - 1 - rank) * len(lens))  # DELTA_L: zeros around this rank's slot, so the
        lens_all = all_ranks_sum(torch.nn.functional.pad(lens.float(), pad))  # sum is [world * B]: all ranks' lengths
        rec.update(length_metrics(lens_all, args.agg, args.alpha, max_new))  # DELTA_L: gain, spread over all ranks
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
