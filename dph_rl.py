"""DPH-RL: GRPO that rehearses the prompts the initial policy already solves with a mass-covering f-divergence.

"The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in RLVR" (arXiv 2509.07430), as grpo.py
except (spec: ../shared/specs/dph_rl.md):
  1. once, before RL: k samples per training prompt from the initial policy; prompts with >= pef_min_correct correct
     (default all k) form D_pef, all others D_exp. Each D_pef prompt gets one more sample, stored with its per-token
     log pi_ref only if it is correct (cached in <output_dir>/pef_cache.pt). No reference model is kept;
  2. rollouts only on D_exp; each step adds a block of stored D_pef samples (1 per 8 rollouts) to the batch;
  3. D_exp rows: PPO-clip with clip-higher (eps 0.2 / 0.28) and dual-clip c = 3, token-mean, no KL;
  4. D_pef rows: the generator-form f-divergence E_{y~pi_ref}[f(pi / pi_ref)] on the stored tokens, JS by default
     (forward KL and alpha as options), token-mean, weight eta;
  5. routed per sample and combined as (N_exp/N) L_exp + eta (N_pef/N) L_pef (`share`, the official code's
     effective weighting) or L_exp + eta L_pef (`paper`).

CPU, embedded tiny model, ~3 minutes:  python dph_rl.py
GPU (pip install vllm):                python dph_rl.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k
Several GPUs, data parallel:           torchrun --nproc_per_node 8 dph_rl.py --model ... --task gsm8k
"""
import contextlib
import math
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (Samples, Timer, append_metrics, collate, decode, drop_long_prompts, encode_prompts, evaluate,
                    init_distributed, load_model_and_tokenizer, load_task, make_sampler, masked_mean,
                    parse_task_name, pick_device, pick_dtype, resolve_model_path, save_checkpoint, score,
                    token_logprobs, truncate_metrics)


@dataclass
class Args:
    model: str = "tiny"  # "tiny" (embedded default, built on first use), a Hugging Face id, or a local folder
    task: str = "countdown"  # countdown[:n numbers], arithmetic[:digits], gsm8k, math500, or a .jsonl path
    backend: str = "auto"  # sampler: hf | vllm | auto (vLLM when it imports and the device is CUDA)
    output_dir: str = "runs/dph_rl"  # metrics.jsonl, checkpoint.pt and final/ go here
    seed: int = 0  # seeds python/numpy/torch; sampling seeds derive from (seed, step)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16
    resume: bool = False  # continue from <output_dir>/checkpoint.pt
    max_steps: int = 200  # RL steps (one rollout batch each)
    prompts_per_step: int = 32  # P: prompts per step, over all ranks
    group_size: int = 8  # G: responses per prompt
    max_new_tokens: int = 0  # response cap; 0 = 12 for the built-in tasks, 512 otherwise
    max_prompt_len: int = 512  # longer prompts are skipped with a warning
    temperature: float = 1.0  # sampling temperature; the trainer's log-probs use the same
    lr: float = 0.0  # AdamW learning rate; 0 = 3e-4 for the tiny model, 1e-6 otherwise
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient-norm clipping
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass (epochs * mini_batches steps per rollout batch)
    micro_batch_size: int = 0  # sequences per forward/backward (gradient accumulation); 0 = whole mini-batch
    eps_low: float = 0.2  # PPO clip: ratio >= 1 - eps_low
    eps_high: float = 0.28  # PPO clip: ratio <= 1 + eps_high. DPH-RL: clip-higher 0.28 (dph_rl.md §3a, §6)
    scale_std: bool = True  # divide the advantage by the group std (False = Dr. GRPO)
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean (original GRPO) | seq-mean-token-sum-norm (Dr. GRPO)
    logprob_chunk: int = 256  # response tokens projected to the vocabulary at a time (memory: bench/logprob_memory.py)
    eval_every: int = 10  # steps between evaluations on held-out prompts (0 = only at the end)
    eval_prompts: int = 128  # held-out prompts per evaluation
    eval_samples: int = 16  # samples per held-out prompt for pass@1/8/16
    log_examples_every: int = 25  # print a few completions every N steps (0 = never)
    save_every: int = 25  # checkpoint every N steps (also at the end and on Ctrl-C)
    # DPH-RL (dph_rl.md §2-§3); the spec's recommended defaults
    divergence: str = "js"  # f-divergence on D_pef: js (2 JS, the code's generator) | forward_kl (k3, clamped) | alpha
    alpha: float = 0.2  # alpha-divergence order, in (0, 1): ->1 forward KL, ->0 reverse KL
    eta: float = -1.0  # weight of the D_pef loss; < 0 = the spec's default per divergence: js 0.2, forward_kl 0.05,
    #                    alpha 0.05 (§3c); 0 = DAPO on D_exp
    pef_weighting: str = "share"  # share: (N_exp/N) L_exp + eta (N_pef/N) L_pef (code) | paper: L_exp + eta L_pef
    pef_k: int = 8  # samples per training prompt in the offline split (§2.1)
    pef_min_correct: int = 8  # a prompt joins D_pef with at least this many correct of pef_k (§6: all 8 of 8)
    pef_split_prompts: int = 2000  # CPU-time cap: split only the first N training prompts, the others stay in D_exp
    #                                (0 = all, as the paper; use 0 on a GPU)
    pef_per_step: int = 0  # stored D_pef sequences per step, all ranks; 0 = prompts_per_step * group_size / 8 (§2.5)
    dual_clip: float = 3.0  # for adv < 0 the token loss is at most -adv * dual_clip (verl's default, §3a); 0 = off


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
    """PPO-clip on the token ratio with dual-clip, no KL (dph_rl.md §3a). logp, old_logp, mask: [B, T]; adv: [B].
    Returns (scalar loss, stats dict of floats)."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # [B, T]
    a = adv[:, None]  # [B, 1]
    unclipped = -a * ratio  # [B, T]
    clipped = -a * ratio.clamp(1 - eps_low, 1 + eps_high)  # [B, T]
    token_loss = torch.max(unclipped, clipped)  # [B, T]  PPO: the pessimistic of the two (dph_rl.md §3a)
    if dual_clip:  # DPH-RL: dual-clip, adv < 0: at most -adv * c (dph_rl.md §3a, verl clip_ratio_c = 3)
        token_loss = torch.where(a < 0, torch.minimum(token_loss, -a * dual_clip), token_loss)  # [B, T]
    stats = {"policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "policy/ratio": masked_mean(ratio.detach(), mask).item()}
    return aggregate(token_loss, mask, agg, max_len), stats  # L_exp, dph_rl.md §3a


def micro_weight(mask_micro, mask_mini, agg: str) -> float:
    """Share of a micro-batch in its mini-batch loss, so that accumulated gradients equal the whole-batch one."""
    if agg == "token-mean":
        return (mask_micro.sum() / mask_mini.sum().clamp(min=1)).item()
    return mask_micro.shape[0] / mask_mini.shape[0]


def f_divergence(logp, ref_logp, mask, kind="js", alpha=0.2):
    """Token-mean over `mask` of the generator f(u), u = pi / pi_ref = exp(logp - ref_logp) on tokens sampled from
    pi_ref; its expectation under pi_ref is the divergence (dph_rl.md §3b table). Gradients flow through logp only.
    logp, ref_logp, mask: [B, T] -> scalar."""
    delta = torch.where(mask > 0, logp - ref_logp, 0.0)  # [B, T]  log u; 0 off the mask, so f and f' are 0 there
    if kind == "forward_kl":  # u - 1 - log u: KL(pi_ref || pi), k3 with the roles swapped (dph_rl.md §3b, §6)
        d = delta.clamp(-20, 20)  # [B, T]  verl low_var_kl's clamps: delta to +-20, the value to +-10
        f = (torch.expm1(d) - d).clamp(-10, 10)  # [B, T]  past the clamp (delta < -11.0 or > 2.61) the gradient is 0
    elif kind == "js":  # u log u - (u+1) log((u+1)/2) = 2 JS(pi, pi_ref), the code's scale (dph_rl.md §3b, §6)
        log2 = math.log(2.0)  # stable form of the same f: u (log 2 - softplus(-delta)) - (softplus(delta) - log 2)
        f = torch.exp(delta) * (log2 - F.softplus(-delta)) - (F.softplus(delta) - log2)  # [B, T]  no clamps (code)
    elif kind == "alpha":  # (u^(1-a) - (1-a) u - a) / (a (a-1)), written with expm1 (dph_rl.md §3b)
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        f = (torch.expm1((1 - alpha) * delta) - (1 - alpha) * torch.expm1(delta)) / (alpha * (alpha - 1))  # [B, T]
    else:
        raise ValueError(f"unknown divergence {kind!r}: js | forward_kl | alpha")
    return masked_mean(f, mask)  # L_pef = TM(f(u)), dph_rl.md §3b


def dph_loss(logp, old_logp, ref_logp, adv, mask, is_pef, eta, divergence="js", alpha=0.2, weighting="share",
             eps_low=0.2, eps_high=0.28, dual_clip=3.0, agg="token-mean", max_len=None, mini=None):
    """Per-sample routing (dph_rl.md §3c): D_exp rows (is_pef False) get PPO-clip with `adv`, D_pef rows get
    eta * f-divergence toward their stored ref_logp, and nothing else. logp, old_logp, ref_logp, mask: [B, T];
    adv, is_pef: [B]. `mini` = (mask, is_pef) of the whole mini-batch when this is one micro-batch of it: the loss
    returned is then this micro-batch's share, and the shares add up to the mini-batch loss."""
    mini_mask, mini_pef = mini if mini is not None else (mask, is_pef)
    e, p = ~is_pef, is_pef  # [B]
    if weighting == "share":  # (N_exp/N) L_exp + eta (N_pef/N) L_pef, N in sequences (dph_rl.md §3c, official code)
        s_exp, s_pef = (~mini_pef).float().mean().item(), mini_pef.float().mean().item()
    elif weighting == "paper":  # L_exp + eta L_pef (dph_rl.md §3c, paper)
        s_exp, s_pef = 1.0, 1.0
    else:
        raise ValueError(f"unknown pef_weighting {weighting!r}: share | paper")
    loss_exp, stats = logp.new_zeros(()), {"policy/clipfrac": 0.0, "policy/ratio": 1.0}
    if e.any():  # L_exp, dph_rl.md §3a
        loss_exp, stats = policy_loss(logp[e], old_logp[e], adv[e], mask[e], eps_low, eps_high, agg, max_len, dual_clip)
    loss_pef = f_divergence(logp[p], ref_logp[p], mask[p], divergence, alpha) if p.any() else logp.new_zeros(())
    w_exp = micro_weight(mask[e], mini_mask[~mini_pef], agg) if e.any() else 0.0  # this micro-batch's share of
    w_pef = micro_weight(mask[p], mini_mask[mini_pef], "token-mean") if p.any() else 0.0  # each token-mean
    loss = s_exp * w_exp * loss_exp + eta * s_pef * w_pef * loss_pef  # L_DPH, dph_rl.md §3c
    stats.update({"loss/exp": loss_exp.item(), "policy/divergence": loss_pef.item(),
                  "loss/policy": s_exp * loss_exp.item() + eta * s_pef * loss_pef.item()})
    return loss, stats


def split_pef(correct, min_correct: int):
    """correct: BoolTensor [P, k] -> [P]: True (D_pef) where at least min_correct are correct (dph_rl.md §2.2)."""
    return correct.sum(-1) >= min_correct


def build_pef(model, tok, sampler, examples: list, index: list, k: int, min_correct: int, max_new: int,
              temperature: float, seed: int) -> dict:
    """dph_rl.md §2: k samples per prompt from the initial policy -> D_pef / D_exp; one more sample per D_pef prompt,
    stored only if correct, with its per-token log pi_ref: the sampler's behaviour log-probs at the training
    temperature (top_p 1, §6). `index`: the examples' positions in the training set."""
    prompts = encode_prompts(tok, examples)
    s = sampler.generate(model, prompts, k, max_new, temperature=temperature, seed=seed)
    per_seq = [e for e in examples for _ in range(k)]
    correct = torch.tensor([score(e, c) == 1.0 for e, c in zip(per_seq, decode(tok, s.response_ids))])
    pef = split_pef(correct.reshape(len(examples), k), min_correct).tolist()  # [P]
    sel = [i for i in range(len(examples)) if pef[i]]
    x = sampler.generate(model, [prompts[i] for i in sel], 1, max_new, temperature=temperature, seed=seed + 1) \
        if sel else Samples([], [], [], [])  # M = 1 extra sample per D_pef prompt (§2.3)
    ok = [score(examples[i], c) == 1.0 for i, c in zip(sel, decode(tok, x.response_ids))]  # kept only if correct
    keep = lambda xs: [v for v, o in zip(xs, ok) if o]  # noqa: E731
    return {"pef_idx": [index[i] for i in sel], "n_correct": correct.reshape(len(examples), k).sum(-1).tolist(),
            "prompt_ids": keep(x.prompt_ids), "response_ids": keep(x.response_ids), "ref_logp": keep(x.logp)}


def take(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


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
    eta = args.eta if args.eta >= 0 else {"js": 0.2, "forward_kl": 0.05, "alpha": 0.05}[args.divergence]  # DPH-RL: §3c
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts_per_step {args.prompts_per_step} must divide by the {world} ranks")
    n_prompts = args.prompts_per_step // world  # this rank's share; a group never spans ranks
    out_dir, main_rank = Path(args.output_dir), rank == 0

    # ---- data and model ----
    path = resolve_model_path(args.model, args.task)
    model, tok = load_model_and_tokenizer(path, device, dtype)
    train, test = load_task(args.task)
    max_prompt = min(args.max_prompt_len, getattr(model.config, "max_position_embeddings", 10**9) - max_new)
    train = drop_long_prompts(tok, train, max_prompt, "training")  # prompt + response must fit the context
    test = drop_long_prompts(tok, test, max_prompt, "test")[: args.eval_prompts]
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
        append_metrics(out_dir / "metrics.jsonl", {"args": asdict(args), "lr": lr, "max_new_tokens": max_new,
                                                     "eta": eta})  # DPH-RL: eta
    backend = args.backend if args.backend != "auto" or device.type == "cuda" else "hf"  # HF is faster on CPU
    sampler = make_sampler(backend, path, tok, max_prompt + max_new, dtype, args.seed + rank)
    sampler.push_weights(model)

    # ---- DPH-RL: offline split into D_pef / D_exp and the stored rehearsal samples, once, before RL (§2) ----
    cache = out_dir / "pef_cache.pt"
    if start > 0:  # resumed: reuse the split of the initial policy, never redo it with the trained one
        if not cache.exists():
            raise SystemExit(f"--resume needs {cache} (the D_pef split written by the first run)")
        pef = torch.load(cache, weights_only=False)
        if main_rank:
            print(f"loaded the D_pef split from {cache}")
    else:
        index = list(range(rank, min(len(train), args.pef_split_prompts or len(train)), world))  # this rank's share
        pef = build_pef(model, tok, sampler, [train[i] for i in index], index, args.pef_k, args.pef_min_correct,
                        max_new, args.temperature, seed=10**9 + args.seed * 1000 + 2 * rank)  # apart from rollouts
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, pef)
            pef = {k: sum((q[k] for q in parts), []) for k in pef}
        if main_rank:
            save_checkpoint(cache, pef)
    in_pef = set(pef["pef_idx"])
    exp_train = [e for i, e in enumerate(train) if i not in in_pef]  # D_exp: all other prompts, the unsplit ones too
    n_stored = len(pef["ref_logp"])
    n_block = (args.pef_per_step or args.prompts_per_step * args.group_size // 8) // world  # Bp: per step and rank
    pef_stats = {"pef/prompts": len(in_pef), "pef/exp_prompts": len(exp_train), "pef/stored": n_stored,
                 "pef/split_pass@1": float(np.mean(pef["n_correct"])) / args.pef_k}
    if main_rank:
        print(f"D_pef: {len(in_pef)} of {len(pef['n_correct'])} split prompts ({n_stored} stored samples); "
              f"D_exp: {len(exp_train)} prompts; {n_block if n_stored else 0} D_pef sequences per step and rank")
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
        # ---- rollout: G samples per prompt from the current policy ----
        examples = [exp_train[i] for i in rng.choice(len(exp_train), n_prompts, replace=False)]  # DPH-RL: D_exp only
        with timer("sample"):
            samples = sampler.generate(model, encode_prompts(tok, examples), args.group_size, max_new,
                                       temperature=args.temperature, seed=args.seed * 1_000_003 + step * 101 + rank)
        with timer("score"):
            texts = decode(tok, samples.response_ids)
            per_seq = [e for e in examples for _ in range(args.group_size)]
            reward = torch.tensor([score(e, c) for e, c in zip(per_seq, texts)], device=device)  # [B]
        # DPH-RL: a block of stored D_pef samples joins the batch, after the rollouts (§2.5: a random block per step;
        # the official code tiles and shuffles the stored set), with the stored log pi_ref in place of old_logp
        blk = np.random.default_rng([args.seed, step, rank, 1]).choice(n_stored, n_block, replace=n_stored < n_block) \
            if n_stored else []
        pick = lambda key: [pef[key][i] for i in blk]  # noqa: E731
        both = Samples(samples.prompt_ids + pick("prompt_ids"), samples.response_ids + pick("response_ids"),
                       samples.logp + pick("ref_logp"), samples.finish + ["stop"] * len(blk))
        batch = collate(both, tok.pad_token_id, device)  # input_ids [B+Bp, Tp+T]; mask, old_logp [B+Bp, T]
        batch["is_pef"] = torch.arange(len(both.finish), device=device) >= len(reward)  # [B+Bp]  DPH-RL: routing
        batch["ref_logp"] = batch["old_logp"] * batch["is_pef"][:, None]  # [B+Bp, T]  DPH-RL: stored log pi_ref

        # ---- advantage ----
        batch["adv"] = group_advantages(reward, args.group_size, args.scale_std)  # [B]  GRPO Eq. 3
        batch["adv"] = torch.cat([batch["adv"], reward.new_zeros(len(blk))])  # [B+Bp]  DPH-RL: none on D_pef rows

        # ---- update: epochs x mini-batches of PPO-clip steps ----
        policy.train()
        logs = []
        with timer("update"):
            for _ in range(args.epochs):
                for mini_idx in np.array_split(rng.permutation(len(batch["adv"])), args.mini_batches):
                    mini = take(batch, torch.as_tensor(mini_idx, device=device))
                    mb = args.micro_batch_size or len(mini_idx)
                    for s in range(0, len(mini_idx), mb):
                        micro = take(mini, slice(s, s + mb))
                        last = s + mb >= len(mini_idx)
                        with contextlib.nullcontext() if last or world == 1 else policy.no_sync():
                            out = token_logprobs(policy, micro, args.temperature, args.logprob_chunk, with_entropy=True)
                            loss, st = dph_loss(out["logp"], micro["old_logp"], micro["ref_logp"], micro["adv"],
                                                micro["mask"], micro["is_pef"], eta, args.divergence, args.alpha,
                                                args.pef_weighting, args.eps_low, args.eps_high, args.dual_clip,
                                                args.agg, max_new, mini=(mini["mask"], mini["is_pef"]))  # DPH-RL
                            if not torch.isfinite(loss):
                                raise SystemExit(f"step {step}: loss is {loss.item()}; stopping. The last good "
                                                 f"checkpoint is {out_dir / 'checkpoint.pt'}")
                            loss.backward()  # DPH-RL: dph_loss already returns this micro-batch's share
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
        lens = batch["mask"][: len(reward)].sum(-1)  # [B]  DPH-RL: rollouts only
        rec = {k: float(np.mean([d[k] for d in logs])) for k in logs[0]}
        rec.update({"reward/mean": reward.mean().item(), "reward/std": reward.std().item(),
                    "reward/solved_groups": (reward.reshape(-1, args.group_size).amax(-1) > 0).float().mean().item(),
                    "reward/zero_std_groups": (reward.reshape(-1, args.group_size).std(-1) == 0).float().mean().item(),
                    "response/len": lens.mean().item(), "perf/grad_norm": grad_norm.item(),
                    "response/truncated": float(np.mean([f == "length" for f in samples.finish])),
                    "pef/block": float(len(blk)), **pef_stats})  # DPH-RL
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
                       f"clip {rec['policy/clipfrac']:.3f} | entropy {rec['policy/entropy']:.3f} | "
                       f"div {rec['policy/divergence']:.4f} | "  # DPH-RL
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
