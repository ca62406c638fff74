"""RL-PLUS: GRPO with one external solution in every group (Dong et al. 2025, arXiv 2508.00222).

The paper names two components, Multiple Importance Sampling (MIS) for the external data and an Exploration-Based
Advantage Function (EAF). Their defaults follow the official code, which produced the paper's numbers:
github.com/YihongDong/RL-PLUS, exp_scripts/train_RL-PLUS.sh and rlplus_core_alg.compute_token_on_off_policy_loss.
What changes from grpo.py:
  1. each group is G-1 on-policy rollouts plus 1 external response, the task's worked solution (+ eos), scored by the
     same verifier; its old log-probs come from a no-grad pass of the pre-update policy;
  2. advantage = reward - mean over all G, the external one included; no std division (the code's grpo_use_std=False);
  3. internal tokens: plain ratio policy gradient, no clip (the code's loss_remove_clip=True);
  4. external tokens: the MIS weight p / (0.75 p_old + 0.25) times the EAF factor (1 - sg(p))^gamma, gamma = 0.5;
  5. token sum / (N * L_max), L_max the response cap (the code's loss_remove_token_mean=True), minus 0.001 x the
     mean token entropy (entropy_coeff=0.001); no KL (use_kl_loss=False).
Logs beside grpo.py's keys: policy/mis_weight, policy/eaf, policy/external_prob.

CPU, embedded tiny model, ~2 minutes:  python rl_plus.py
Past the tiny model's boundary:        python rl_plus.py --task countdown:4   (pass@16 is 0 at step 0)
GPU (pip install vllm):                python rl_plus.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k
Several GPUs, data parallel:           torchrun --nproc_per_node 8 rl_plus.py --model ... --task gsm8k
A model too big for one GPU (FSDP2):   torchrun --nproc_per_node 8 rl_plus.py --model ... --fsdp true
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

from common import (ARG_RULES, Samples, Timer, Verifier, all_ranks_mean, all_ranks_sum, append_metrics, autocast,
                    check_args, claim_output_dir, collate, decode, default_max_new_tokens, drop_long_prompts,
                    encode_prompts, evaluate, finite_weights, flag, full_state, init_distributed, is_num,
                    load_full_state, load_model_and_tokenizer, load_task, make_sampler, masked_mean, parse_task_name,
                    pick_device, pick_dtype, read_checkpoint, resolve_model_path, save_checkpoint, save_final,
                    stop_ids, stream_seeds, token_logprobs, token_logprobs_nograd, truncate_metrics,
                    wrap_policy)  # RL_PLUS: + Samples, flag, is_num


@dataclass
class Args:
    model: str = "tiny"  # "tiny" (embedded default, built on first use), a Hugging Face id, or a local folder
    task: str = "countdown"  # countdown[:numbers], arithmetic[:digits], sum[:terms], gsm8k, math500, a .jsonl path
    backend: str = "auto"  # sampler: hf | vllm | auto (vLLM when it imports and the device is CUDA)
    vllm_gpu_memory: float = 0.3  # share of the GPU's memory vLLM may take beside the trainer
    verify_workers: int = -1  # verifier processes; -1 = 2 for math tasks (math-verify), 0 (in-process) for built-ins
    verify_timeout: float = 60.0  # seconds a step's verification may take; what is left scores 0 (verify/timed_out)
    output_dir: str = "runs/rl_plus"  # metrics.jsonl, checkpoint.pt and final/ go here
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
    group_size: int = 8  # G: responses per prompt: G-1 on-policy + 1 external (the code: rollout.n=8, n_prefix=1)
    max_new_tokens: int = 0  # response cap; 0 = the task's (12 countdown/arithmetic, 32 sum), 512 otherwise
    max_prompt_len: int = 512  # longer prompts are skipped with a warning
    temperature: float = 1.0  # sampling temperature; the trainer's log-probs use the same
    lr: float = 0.0  # AdamW learning rate; 0 = 3e-4 for the tiny model, 1e-6 otherwise
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient-norm clipping
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass (epochs * mini_batches steps per rollout batch)
    micro_batch_size: int = 0  # sequences per forward (gradient accumulation; p_old, reference passes); 0 = all
    eps_low: float = 0.2  # PPO clip: ratio >= 1 - eps_low (internal tokens, only with --clip_internal)
    eps_high: float = 0.2  # PPO clip: ratio <= 1 + eps_high (internal tokens, only with --clip_internal)
    beta: float = 0.0  # k3 KL to the initial policy; 0 loads no reference model
    scale_std: bool = False  # divide the advantage by the group std: the paper's form; False = the code (grpo_use_std)
    agg: str = "seq-mean-token-sum-norm"  # sum / (N * L_max), the code's loss_remove_token_mean; or token-mean
    gamma: float = 0.5  # exponent of the exploration factor (1 - sg(p))^gamma on external tokens (0.5 in the code)
    mis_u: float = 1.0  # U in pi_omega_hat = (p_old + U) / 2: 1 = the official code; 0 = the paper's U read as 1/|V|
    clip_internal: bool = False  # PPO-clip the internal tokens' ratio (eps_low/eps_high); off in the code
    ent_coef: float = 0.001  # entropy bonus on the token-mean entropy of the response tokens (the code's entropy_coeff
    #                         value; its normalisation differs: docs/rl_plus.md)
    logprob_chunk: int = 256  # response tokens projected to the vocabulary at a time (memory: bench/logprob_memory.py)
    eval_every: int = 10  # steps between evaluations on held-out prompts (0 = only at the end)
    eval_prompts: int = 128  # held-out prompts per evaluation
    eval_samples: int = 16  # samples per held-out prompt: pass@k for k in 1, 8, 16 (where <= n) and n
    log_examples_every: int = 25  # print a few completions every N steps (0 = never)
    save_every: int = 25  # checkpoint every N steps (also at the end and on Ctrl-C)


RULES = {  # RL-PLUS's own arguments: (a test of the value v given all the arguments a, what it must be)
    "gamma": (lambda v, a: is_num(v) and v >= 0, "be >= 0"),
    "mis_u": (lambda v, a: is_num(v) and v >= 0, "be >= 0"),
    "clip_internal": (flag, "be true or false"),
    "ent_coef": (lambda v, a: is_num(v) and v >= 0, "be >= 0"),
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


def rl_plus_loss(logp, old_logp, adv, mask, is_external, gamma=0.5, max_len=None, mis_u=1.0, eps_low=None,
                 eps_high=None, agg="seq-mean-token-sum-norm", ref_logp=None, beta=0.0):
    """Internal tokens: -ratio * A (no clip unless eps_low/eps_high are given); external tokens: -r^m * A * C with
    r^m = p / (0.75 p_old + 0.25 U) and C = (1 - sg(p))^gamma. logp, old_logp, ref_logp, mask: [B, T]; adv: [B];
    is_external: bool [B]. Returns (scalar loss, stats dict of floats); the entropy bonus is added by the caller.
    As the official code's rlplus_core_alg.compute_token_on_off_policy_loss with off_policy_strategy="RL-PLUS"."""
    old_logp = old_logp.detach()  # [B, T]  p_old is data: no gradient path through any denominator
    ext = is_external.bool()[:, None].expand_as(mask)  # [B, T]  every token of an external row, its eos included
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # [B, T]
    a = adv[:, None]  # [B, 1]
    unclipped = -a * ratio  # [B, T]
    internal = unclipped  # [B, T]  the objective's on-policy term: plain ratio PG, no clip (loss_remove_clip=True)
    if eps_low is not None:  # optional ablation (--clip_internal): PPO-clip on internal tokens only
        internal = torch.max(unclipped, -a * ratio.clamp(1 - eps_low, 1 + eps_high))  # [B, T]
    p = logp.exp()  # [B, T]  p_theta, with gradient
    # Multiple Importance Sampling: r^m = 2 p / (pi_omega_hat + p_old) with pi_omega_hat = (p_old + U) / 2. The paper
    # calls U uniform; the code uses U = 1 (omiga_prob = 0.5 * (p_old + 1)), which keeps r^m <= 4 p. No clip.
    mis = p / (0.75 * old_logp.exp() + 0.25 * mis_u)  # [B, T]  r^m, denominator detached
    eaf = (1 - p.detach()).clamp(min=0) ** gamma  # [B, T]  Exploration-Based Advantage Function: C = (1 - sg(p))^gamma
    external = -mis * a * eaf  # [B, T]  the objective's external term: r^m * A^c with A^c = A * C
    token_loss = torch.where(ext, external, internal)  # [B, T]  disjoint: each token gets exactly one of the two
    m_int, m_ext = mask * ~ext, mask * ext  # [B, T]
    stats = {"policy/clipfrac": masked_mean((internal > unclipped).float(), m_int).item(),
             "policy/ratio": masked_mean(ratio.detach(), mask).item(),  # all tokens: 1 at theta_old
             "policy/mis_weight": masked_mean(mis.detach(), m_ext).item(),
             "policy/eaf": masked_mean(eaf, m_ext).item(),
             "policy/external_prob": masked_mean(p.detach(), m_ext).item()}
    if ref_logp is not None and beta > 0:  # off by default: RL-PLUS has no KL (the code: use_kl_loss=False)
        d = (ref_logp - logp).clamp(-20, 20)  # [B, T]
        kl = torch.exp(d) - d - 1  # [B, T]  k3 estimator of KL(pi || pi_ref), >= 0
        token_loss = token_loss + beta * kl
        stats["policy/kl"] = masked_mean(kl.detach(), mask).item()
    # L_pg = sum m l / (N * L_max). L_max = max_len, a constant: the code divides the token sum by the padded response
    # width, which verl pads to max_response_length. N = this micro-batch's rows here; micro_weight makes it the
    # mini-batch's, and the ranks' gradient average (every rank holds as many rows) the mini-batch's over all ranks.
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
# External data (RL-PLUS)
# ------------------------------------------------------------------------------------------------------------
def external_ids(tok, examples: list) -> list:
    """Each prompt's worked solution as a response: its tokens + eos, as the code appends eos to each target
    (rlplus_vllm_rollout.RLPlusvLLMRollout.generate_sequences); chat-template models too."""
    return [tok(e.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in examples]


def keep_with_solution(tok, examples: list, max_new: int) -> list:
    """Training prompts whose external solution exists and fits the response cap. Longer ones are dropped, not
    truncated: truncation would cut the answer off and turn a correct demonstration into a reward-0 one."""
    if not any(e.solution for e in examples):
        raise SystemExit("RL-PLUS needs an external (worked) solution for every training prompt and this task has "
                         "none: use a built-in task, gsm8k, math500, or a .jsonl whose rows have a 'solution' field")
    keep = [e for e, ids in zip(examples, external_ids(tok, examples)) if e.solution and len(ids) <= max_new]
    if len(keep) < len(examples):
        print(f"warning: skipped {len(examples) - len(keep)} of {len(examples)} training prompts without a "
              f"solution or with one longer than {max_new} tokens")
    if not keep:
        raise SystemExit(f"every external solution is longer than {max_new} tokens: raise --max_new_tokens")
    return keep


def with_external(samples: Samples, ext_ids: list, n_internal: int) -> Samples:
    """The group layout: each prompt's n_internal sampled responses, then its external one (G-th). The
    external log-probs are placeholders (0) until the no-grad pass of the current policy fills them."""
    out = Samples([], [], [], [])
    for i, ext in enumerate(ext_ids):
        for j in range(i * n_internal, (i + 1) * n_internal):
            for field, v in zip((out.prompt_ids, out.response_ids, out.logp, out.finish),
                                (samples.prompt_ids, samples.response_ids, samples.logp, samples.finish)):
                field.append(v[j])
        out.prompt_ids.append(samples.prompt_ids[i * n_internal])
        out.response_ids.append(list(ext))
        out.logp.append([0.0] * len(ext))
        out.finish.append("external")
    return out


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
    train = keep_with_solution(tok, train, max_new)  # RL_PLUS: every training prompt brings its external solution
    train = drop_long_prompts(tok, train, max_prompt, "training", args.prompts_per_step)  # prompt + response fit
    test = drop_long_prompts(tok, test, max_prompt, "test", world)[: args.eval_prompts]
    mis_u = args.mis_u or 1.0 / model.config.vocab_size  # RL_PLUS: 0 = the paper's uniform U read as 1/|V|
    clip = (args.eps_low, args.eps_high) if args.clip_internal else (None, None)  # RL_PLUS: no clip by default
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
        # ---- rollout: G-1 samples per prompt from the current policy + 1 external solution ----
        examples = [train[i] for i in rng.choice(len(train), args.prompts_per_step, replace=False)[mine]]
        with timer("sample"):
            samples = sampler.generate(model, encode_prompts(tok, examples), args.group_size - 1, max_new,
                                       args.temperature, stream_seeds((args.seed, "rollout", step),
                                                                      args.prompts_per_step)[mine])
            merged = with_external(samples, external_ids(tok, examples), args.group_size - 1)  # RL_PLUS: G per prompt
        with timer("score"):
            texts = decode(tok, merged.response_ids)  # RL_PLUS: the external one is scored by the same verifier
            per_seq = [e for e in examples for _ in range(args.group_size)]
            reward = torch.tensor(verifier(per_seq, texts), device=device)  # [B]
        batch = collate(merged, tok.pad_token_id, device)  # input_ids [B, Tp+T]; mask, old_logp [B, T]
        is_ext = torch.arange(len(reward), device=device) % args.group_size == args.group_size - 1  # [B] RL_PLUS
        batch["is_external"] = is_ext  # [B]  a group never spans ranks, so neither does its external row

        # ---- advantage ----
        batch["adv"] = group_advantages(reward, args.group_size, args.scale_std)  # [B]  over all G, external included
        with timer("logp"), autocast(device, dtype):
            # RL_PLUS: p_old of the external tokens from the pre-update policy, which never sampled them; micro-batch
            # by micro-batch, the same number of forwards on every rank (under FSDP each is a collective)
            ext_rows = is_ext.nonzero().squeeze(-1)  # [P / world]
            ext_logp = token_logprobs_nograd(model, take(batch, ext_rows), args.micro_batch_size,
                                             temperature=args.temperature, chunk_size=args.logprob_chunk)["logp"]
            batch["old_logp"] = batch["old_logp"].index_copy(0, ext_rows, ext_logp)  # [B, T]
            if ref_model is not None:
                batch["ref_logp"] = token_logprobs_nograd(ref_model, batch, args.micro_batch_size,
                                                          temperature=args.temperature,
                                                          chunk_size=args.logprob_chunk)["logp"]  # [B, T]

        # ---- update: epochs x mini-batches of RL-PLUS steps ----
        policy.train()
        logs = []
        with timer("update"):
            for _ in range(args.epochs):
                for mini_idx in np.array_split(rng.permutation(len(reward)), args.mini_batches):
                    mini = take(batch, torch.as_tensor(mini_idx, device=device))
                    n_tokens = all_ranks_sum(mini["mask"].sum()) / world  # the token-mean spans every rank
                    mb = args.micro_batch_size or len(mini_idx)
                    for s in range(0, len(mini_idx), mb):
                        micro = take(mini, slice(s, s + mb))
                        sync = s + mb >= len(mini_idx) or world == 1 or args.fsdp  # DDP: all-reduce on the last
                        with contextlib.nullcontext() if sync else policy.no_sync(), autocast(device, dtype):
                            out = token_logprobs(policy, micro, args.temperature, args.logprob_chunk, with_entropy=True)
                            loss, st = rl_plus_loss(out["logp"], micro["old_logp"], micro["adv"], micro["mask"],
                                                    micro["is_external"], args.gamma, max_new, mis_u, *clip,
                                                    args.agg, micro.get("ref_logp"), args.beta)
                            # RL_PLUS: this micro-batch's share of H_bar, the token-mean entropy over all ranks' tokens
                            ent = (out["entropy"] * micro["mask"]).sum() / n_tokens.clamp(min=1)
                            (loss * micro_weight(micro["mask"], mini["mask"], args.agg, n_tokens)
                             - args.ent_coef * ent).backward()  # L = L_pg - beta_H * H_bar (the code's entropy_coeff)
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
        lens = batch["mask"][~is_ext].sum(-1)  # [P * (G-1)]  RL_PLUS: on-policy responses only
        rec = {k: float(np.mean([d[k] for d in logs])) for k in logs[0]}
        r_int = reward[~is_ext]  # [P * (G-1)]  RL_PLUS: reward/mean, std and solved_groups are on-policy only
        rec.update({"reward/mean": r_int.mean().item(), "reward/std": r_int.std().item(),
                    "reward/solved_groups": (r_int.reshape(-1, args.group_size - 1).amax(-1) > 0).float().mean().item(),
                    "reward/zero_std_groups": (reward.reshape(-1, args.group_size).std(-1) == 0).float().mean().item(),
                    "reward/external": reward[is_ext].mean().item(),  # RL_PLUS: the external solutions' reward
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
                       f"mis {rec['policy/mis_weight']:.3f} | eaf {rec['policy/eaf']:.3f} | "  # RL_PLUS
                       f"entropy {rec['policy/entropy']:.3f} | "
                       f"len {rec['response/len']:.1f} | {sum(timer.s.values()):.2f}s")
        if main_rank and args.log_examples_every and step % args.log_examples_every == 0:
            for p, c, r in list(zip(merged.prompt_ids, texts, reward.tolist()))[:: args.group_size][:3]:
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
