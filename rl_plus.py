"""RL-PLUS: GRPO with one external solution in every group (Dong et al. 2025, arXiv 2508.00222).

Spec: ../shared/specs/rl_plus.md. What changes from grpo.py:
  1. each group is G-1 on-policy rollouts plus 1 external response, the task's worked solution (+ eos), scored by the
     same verifier; its old log-probs come from a no-grad pass of the pre-update policy (§2, §3);
  2. advantage = reward - mean over all G, the external one included; no std division (§2, §8.2);
  3. internal tokens: plain ratio policy gradient, no clip (§5, §8.3);
  4. external tokens: multiple-importance-sampling weight p / (0.75 p_old + 0.25) times the exploration factor
     (1 - sg(p))^gamma, gamma = 0.5 (§3, §4);
  5. token sum / (N * L_max), minus 0.001 x mean token entropy; no KL (§5).

CPU, embedded tiny model, ~2 minutes:  python rl_plus.py
Past the tiny model's boundary:        python rl_plus.py --task countdown:4   (pass@16 is 0 at step 0)
GPU (pip install vllm):                python rl_plus.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k
Several GPUs, data parallel:           torchrun --nproc_per_node 8 rl_plus.py --model ... --task gsm8k
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

from common import (Samples, Timer, append_metrics, collate, decode, drop_long_prompts, encode_prompts, evaluate,
                    init_distributed, load_model_and_tokenizer, load_task, make_sampler, masked_mean,
                    parse_task_name, pick_device, pick_dtype, resolve_model_path, save_checkpoint, score,
                    token_logprobs, truncate_metrics)  # RL_PLUS: + Samples


@dataclass
class Args:
    model: str = "tiny"  # "tiny" (embedded default, built on first use), a Hugging Face id, or a local folder
    task: str = "countdown"  # countdown[:n numbers], arithmetic[:digits], gsm8k, math500, or a .jsonl path
    backend: str = "auto"  # sampler: hf | vllm | auto (vLLM when it imports and the device is CUDA)
    output_dir: str = "runs/rl_plus"  # metrics.jsonl, checkpoint.pt and final/ go here
    seed: int = 0  # seeds python/numpy/torch; sampling seeds derive from (seed, step)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16
    resume: bool = False  # continue from <output_dir>/checkpoint.pt
    max_steps: int = 200  # RL steps (one rollout batch each)
    prompts_per_step: int = 32  # P: prompts per step, over all ranks
    group_size: int = 8  # G: responses per prompt: G-1 on-policy + 1 external (rl_plus.md §2)
    max_new_tokens: int = 0  # response cap; 0 = 12 for the built-in tasks, 512 otherwise
    max_prompt_len: int = 512  # longer prompts are skipped with a warning
    temperature: float = 1.0  # sampling temperature; the trainer's log-probs use the same
    lr: float = 0.0  # AdamW learning rate; 0 = 3e-4 for the tiny model, 1e-6 otherwise
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient-norm clipping
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass (epochs * mini_batches steps per rollout batch)
    micro_batch_size: int = 0  # sequences per forward/backward (gradient accumulation); 0 = whole mini-batch
    eps_low: float = 0.2  # PPO clip: ratio >= 1 - eps_low (internal tokens, only with --clip_internal)
    eps_high: float = 0.2  # PPO clip: ratio <= 1 + eps_high (internal tokens, only with --clip_internal)
    beta: float = 0.0  # k3 KL to the initial policy; 0 loads no reference model
    scale_std: bool = False  # divide the advantage by the group std; False = the official code (rl_plus.md §8.2)
    agg: str = "seq-mean-token-sum-norm"  # rl_plus.md §5: token sum / (N * L_max); or token-mean | seq-mean-token-mean
    gamma: float = 0.5  # exponent of the exploration factor (1 - sg(p))^gamma on external tokens (rl_plus.md §4)
    mis_u: float = 1.0  # U in pi_omega_hat = (p_old + U) / 2: 1 = official code; 0 = literal uniform 1/|V| (§8.1)
    clip_internal: bool = False  # PPO-clip the internal tokens' ratio (eps_low/eps_high); off in the code (§8.3)
    ent_coef: float = 0.001  # entropy bonus on the token-mean entropy of all response tokens (rl_plus.md §5)
    logprob_chunk: int = 256  # response tokens projected to the vocabulary at a time (memory: bench/logprob_memory.py)
    eval_every: int = 10  # steps between evaluations on held-out prompts (0 = only at the end)
    eval_prompts: int = 128  # held-out prompts per evaluation
    eval_samples: int = 16  # samples per held-out prompt for pass@1/8/16
    log_examples_every: int = 25  # print a few completions every N steps (0 = never)
    save_every: int = 25  # checkpoint every N steps (also at the end and on Ctrl-C)


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
    is_external: bool [B]. Returns (scalar loss, stats dict of floats); the entropy bonus is added by the caller."""
    old_logp = old_logp.detach()  # [B, T]  p_old is data: no gradient path through any denominator (§7.2)
    ext = is_external.bool()[:, None].expand_as(mask)  # [B, T]  every token of an external row, its eos included
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # [B, T]
    a = adv[:, None]  # [B, 1]
    unclipped = -a * ratio  # [B, T]
    internal = unclipped  # [B, T]  rl_plus.md §5 Eq. J first term: plain ratio PG, no clip (code default, §8.3)
    if eps_low is not None:  # optional ablation (--clip_internal): PPO-clip on internal tokens only
        internal = torch.max(unclipped, -a * ratio.clamp(1 - eps_low, 1 + eps_high))  # [B, T]
    p = logp.exp()  # [B, T]  p_theta, with gradient
    # r^m = 2 p / (pi_omega_hat + p_old), pi_omega_hat = (p_old + U) / 2, U = 1 as in the code (§8.1); no clip
    mis = p / (0.75 * old_logp.exp() + 0.25 * mis_u)  # [B, T]  rl_plus.md §3 Eq. r^m, denominator detached
    eaf = (1 - p.detach()).clamp(min=0) ** gamma  # [B, T]  rl_plus.md §4 Eq. C = (1 - sg(p))^gamma, p current (§8.6)
    external = -mis * a * eaf  # [B, T]  rl_plus.md §5 Eq. J second term, r^m * A^c
    token_loss = torch.where(ext, external, internal)  # [B, T]  disjoint: each token gets exactly one of the two
    m_int, m_ext = mask * ~ext, mask * ext  # [B, T]
    stats = {"policy/clipfrac": masked_mean((internal > unclipped).float(), m_int).item(),
             "policy/ratio": masked_mean(ratio.detach(), mask).item(),  # all tokens: 1 at theta_old
             "policy/mis_weight": masked_mean(mis.detach(), m_ext).item(),
             "policy/eaf": masked_mean(eaf, m_ext).item(),
             "policy/external_prob": masked_mean(p.detach(), m_ext).item()}
    if ref_logp is not None and beta > 0:  # off by default: RL-PLUS has no KL (rl_plus.md §5)
        d = (ref_logp - logp).clamp(-20, 20)  # [B, T]
        kl = torch.exp(d) - d - 1  # [B, T]  k3 estimator of KL(pi || pi_ref), >= 0
        token_loss = token_loss + beta * kl
        stats["policy/kl"] = masked_mean(kl.detach(), mask).item()
    return aggregate(token_loss, mask, agg, max_len), stats  # rl_plus.md §5 Eq. L_pg = sum m l / (N * L_max)


def micro_weight(mask_micro, mask_mini, agg: str) -> float:
    """Share of a micro-batch in its mini-batch loss, so that accumulated gradients equal the whole-batch one."""
    if agg == "token-mean":
        return (mask_micro.sum() / mask_mini.sum().clamp(min=1)).item()
    return mask_micro.shape[0] / mask_mini.shape[0]


def take(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------------
# External data (RL-PLUS)
# ------------------------------------------------------------------------------------------------------------
def external_ids(tok, examples: list) -> list:
    """rl_plus.md §2: each prompt's worked solution as a response: its tokens + eos (chat-template models too)."""
    return [tok(e.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in examples]


def keep_with_solution(tok, examples: list, max_new: int) -> list:
    """Training prompts whose external solution exists and fits the response cap. Longer ones are dropped, not
    truncated: truncation would cut the answer off (rl_plus.md §8.10)."""
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
    """rl_plus.md §2 group layout: each prompt's n_internal sampled responses, then its external one (G-th). The
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
    # ---- setup: device, distributed, seed, dtype ----
    device = pick_device(args.device)
    rank, world = init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    builtin = parse_task_name(args.task)[1] is not None
    max_new = args.max_new_tokens or (12 if builtin else 512)
    lr = args.lr or (3e-4 if args.model == "tiny" else 1e-6)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts_per_step {args.prompts_per_step} must divide by the {world} ranks")
    n_prompts = args.prompts_per_step // world  # this rank's share; a group never spans ranks
    if args.group_size < 2:  # RL_PLUS: G-1 >= 1 on-policy rollouts + 1 external per group
        raise SystemExit("--group_size must be at least 2: G-1 on-policy rollouts plus 1 external solution")
    out_dir, main_rank = Path(args.output_dir), rank == 0

    # ---- data and model ----
    path = resolve_model_path(args.model, args.task)
    model, tok = load_model_and_tokenizer(path, device, dtype)
    train, test = load_task(args.task)
    max_prompt = min(args.max_prompt_len, getattr(model.config, "max_position_embeddings", 10**9) - max_new)
    train = drop_long_prompts(tok, train, max_prompt, "training")  # prompt + response must fit the context
    train = keep_with_solution(tok, train, max_new)  # RL_PLUS: every training prompt brings its external solution
    mis_u = args.mis_u or 1.0 / model.config.vocab_size  # RL_PLUS: 0 = literal uniform U = 1/|V| (rl_plus.md §8.1)
    clip = (args.eps_low, args.eps_high) if args.clip_internal else (None, None)  # RL_PLUS: no clip by default
    test = drop_long_prompts(tok, test, max_prompt, "test")[: args.eval_prompts]
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.beta > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    start = 0
    if args.resume and (out_dir / "checkpoint.pt").exists():
        ckpt = torch.load(out_dir / "checkpoint.pt", map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        if main_rank:
            truncate_metrics(out_dir / "metrics.jsonl", start)
            print(f"resumed from {out_dir / 'checkpoint.pt'} at step {start}")
    elif main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("")
        append_metrics(out_dir / "metrics.jsonl", {"args": asdict(args), "lr": lr, "max_new_tokens": max_new})
    backend = args.backend if args.backend != "auto" or device.type == "cuda" else "hf"  # HF is faster on CPU
    sampler = make_sampler(backend, path, tok, max_prompt + max_new, dtype, args.seed + rank)
    sampler.push_weights(model)
    policy = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def checkpoint(step):
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise SystemExit(f"step {step}: non-finite weights; stopping without overwriting the last good checkpoint "
                             f"{out_dir / 'checkpoint.pt'}")
        if main_rank:
            save_checkpoint(out_dir / "checkpoint.pt", {"model": model.state_dict(), "step": step,
                                                         "optimizer": optimizer.state_dict(), "args": asdict(args)})

    def run_eval(step):
        res = evaluate(model, tok, sampler, test, n=args.eval_samples, ks=(1, 8, 16), max_new_tokens=max_new,
                       temperature=args.temperature, seed=args.seed * 7919 + step)
        tqdm.write(f"eval step {step}: " + " ".join(f"{k[5:]} {v:.3f}" for k, v in res.items()))
        return res

    if main_rank and start == 0 and args.eval_every:
        append_metrics(out_dir / "metrics.jsonl", {"step": 0, **run_eval(0)})
    stop = []  # Ctrl-C: finish the current step, save, exit (a second Ctrl-C kills)
    signal.signal(signal.SIGINT, lambda *_: (stop.append(1), signal.signal(signal.SIGINT, signal.SIG_DFL)))

    for step in tqdm(range(start, args.max_steps), disable=not main_rank, initial=start, total=args.max_steps):
        timer = Timer()
        rng = np.random.default_rng([args.seed, step, rank])
        # ---- rollout: G-1 samples per prompt from the current policy + 1 external solution (rl_plus.md §2) ----
        examples = [train[i] for i in rng.choice(len(train), n_prompts, replace=False)]
        with timer("sample"):
            samples = sampler.generate(model, encode_prompts(tok, examples), args.group_size - 1, max_new,
                                       temperature=args.temperature, seed=args.seed * 1_000_003 + step * 101 + rank)
            merged = with_external(samples, external_ids(tok, examples), args.group_size - 1)  # RL_PLUS: G per prompt
        with timer("score"):
            texts = decode(tok, merged.response_ids)  # RL_PLUS: the external one is scored by the same verifier
            per_seq = [e for e in examples for _ in range(args.group_size)]
            reward = torch.tensor([score(e, c) for e, c in zip(per_seq, texts)], device=device)  # [B]
        batch = collate(merged, tok.pad_token_id, device)  # input_ids [B, Tp+T]; mask, old_logp [B, T]
        is_ext = torch.arange(len(reward), device=device) % args.group_size == args.group_size - 1  # [B] RL_PLUS
        batch["is_external"] = is_ext  # [B]

        # ---- advantage ----
        batch["adv"] = group_advantages(reward, args.group_size, args.scale_std)  # [B]  rl_plus.md §2: over all G
        with timer("logp"), torch.no_grad():
            # RL_PLUS: p_old of the external tokens from the pre-update policy, which never sampled them (§3)
            ext_rows = is_ext.nonzero().squeeze(-1)  # [P]
            ext_logp = token_logprobs(model, take(batch, ext_rows), args.temperature, args.logprob_chunk)["logp"]
            batch["old_logp"] = batch["old_logp"].index_copy(0, ext_rows, ext_logp)  # [B, T]
            if ref_model is not None:
                batch["ref_logp"] = token_logprobs(ref_model, batch, args.temperature, args.logprob_chunk)["logp"]

        # ---- update: epochs x mini-batches of RL-PLUS steps ----
        policy.train()
        logs = []
        with timer("update"):
            for _ in range(args.epochs):
                for mini_idx in np.array_split(rng.permutation(len(reward)), args.mini_batches):
                    mini = take(batch, torch.as_tensor(mini_idx, device=device))
                    mb = args.micro_batch_size or len(mini_idx)
                    for s in range(0, len(mini_idx), mb):
                        micro = take(mini, slice(s, s + mb))
                        last = s + mb >= len(mini_idx)
                        with contextlib.nullcontext() if last or world == 1 else policy.no_sync():
                            out = token_logprobs(policy, micro, args.temperature, args.logprob_chunk, with_entropy=True)
                            loss, st = rl_plus_loss(out["logp"], micro["old_logp"], micro["adv"], micro["mask"],
                                                    micro["is_external"], args.gamma, max_new, mis_u, *clip,
                                                    args.agg, micro.get("ref_logp"), args.beta)
                            if not torch.isfinite(loss):
                                raise SystemExit(f"step {step}: loss is {loss.item()}; stopping. The last good "
                                                 f"checkpoint is {out_dir / 'checkpoint.pt'}")
                            # RL_PLUS: this micro-batch's share of the token-mean entropy H_bar of the mini-batch
                            ent = (out["entropy"] * micro["mask"]).sum() / mini["mask"].sum().clamp(min=1)
                            (loss * micro_weight(micro["mask"], mini["mask"], args.agg)
                             - args.ent_coef * ent).backward()  # rl_plus.md §5 Eq. L = L_pg - beta_H * H_bar
                        st["loss/policy"] = loss.item()
                        st["policy/entropy"] = masked_mean(out["entropy"].detach(), micro["mask"]).item()
                        logs.append(st)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if not torch.isfinite(grad_norm):
                        raise SystemExit(f"step {step}: gradient norm is {grad_norm.item()}; stopping. The last "
                                         f"good checkpoint is {out_dir / 'checkpoint.pt'}")
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
                    "response/len": lens.mean().item(), "perf/grad_norm": grad_norm.item(),
                    "response/truncated": float(np.mean([f == "length" for f in samples.finish]))})
        rec.update({f"perf/{k}_s": v for k, v in timer.s.items()})
        if world > 1:  # mean over ranks
            vals = torch.tensor(list(rec.values()), device=device)
            torch.distributed.all_reduce(vals)
            rec = dict(zip(rec, (vals / world).tolist()))
        rec["step"] = step + 1  # optimizer updates done
        if main_rank and (args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps):
            rec.update(run_eval(step + 1))
        if main_rank:
            append_metrics(out_dir / "metrics.jsonl", rec)
            tqdm.write(f"step {step + 1:4d} | reward {rec['reward/mean']:.3f} | loss {rec['loss/policy']:+.4f} | "
                       f"mis {rec['policy/mis_weight']:.3f} | eaf {rec['policy/eaf']:.3f} | "  # RL_PLUS
                       f"entropy {rec['policy/entropy']:.3f} | "
                       f"len {rec['response/len']:.1f} | {sum(timer.s.values()):.2f}s")
        if main_rank and args.log_examples_every and step % args.log_examples_every == 0:
            for e, c, r in list(zip(per_seq, texts, reward.tolist()))[:: args.group_size][:3]:
                tqdm.write(f"  {e.prompt!r} -> {c!r} reward {r:.0f}")
        if world > 1:  # a Ctrl-C seen by any rank stops them all after the same step
            flag = torch.tensor([float(len(stop))], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop += [1] if flag.item() and not stop else []
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps or stop:
            checkpoint(step + 1)
        if stop:
            print(f"interrupted: saved {out_dir / 'checkpoint.pt'} at step {step + 1}; continue with --resume")
            break
    if main_rank and not stop:
        model.save_pretrained(out_dir / "final")
        tok.save_pretrained(out_dir / "final")
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
