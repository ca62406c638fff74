"""grpo.py against TRL's GRPOTrainer at real shapes: seconds per step, seconds per phase and peak memory (RSS).

pip install -r bench/requirements.txt          # adds trl (and datasets, accelerate)
python bench/vs_trl_real.py                    # 128 and 256 new tokens, 2 alternating rounds of 3 steps each
python bench/vs_trl_real.py --scaling          # response length 64 -> 512 (G = 8), group size 4 -> 16 (128 tokens)
python bench/vs_trl_real.py --small            # a toy configuration (1-2 minutes): does the script work?
python bench/vs_trl_real.py --lengths 128 --rounds 1 --steps 2 --prompts 4    # a quicker, rougher look
On 2 free CPU cores the default run should take about 1-1.5 hours and --scaling about 2 (estimated from one step at
64 new tokens: ~40 s grpo.py, ~115 s TRL); a TRL run that does not fit in memory is reported as such.

Both sides: the Qwen2.5-shaped stand-in (tests/standin.py: hidden 256, 4 layers, tied embedding of 151,936 rows,
Qwen's chat template), chat-templated GSM8K prompts (~120-200 tokens), 8 prompts x 8 samples per step, temperature 1
with nothing filtered (TRL is given top_k 0, top_p 1, repetition_penalty 1 over the stand-in's generation_config.json,
and the logits processors its generate() applies are listed; grpo.py's decode loop ignores that file), responses up
to the length (the random stand-in rarely stops), the math-verify reward, token-mean loss ("dapo"), PPO clip 0.2, no
KL (beta 0), one optimizer step per rollout batch, lr 1e-6, float32 on the CPU, all rows in one forward batch, no
gradient checkpointing (TRL's default is on), HF-side sampling (grpo.py: its `--backend hf` decode loop; TRL:
`model.generate`). Each run is its own process; rounds alternate which side goes first. The first step of each run
is dropped as warm-up; the table gives medians over the remaining steps of all rounds.
Step: grpo.py, the sum of the phases it logs (perf/*_s); TRL, a callback from on_step_begin to on_step_end.
Phases: sample (TRL: its `_generate_single_turn`), score (TRL: the reward function), logp = log-prob passes without
gradient (none on either side here: no reference model, and the sampler's log-probs serve as the old policy's),
update = the rest (TRL: step - the other three): the gradient forward and backward and the optimizer step.
Peak = ru_maxrss after the last optimizer step (before grpo.py's final checkpoint); loaded = RSS after the model is
loaded. A run that dies (e.g. killed for memory) is reported, not fatal.
On a CPU, TRL's fused LM head projects every position, prompt included, to the vocabulary (only on Triton devices
does it keep the response positions), so its update there does more work than on a GPU.
"""
import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WARMUP = 1
SIDES = ("grpo.py", "TRL")


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def ours_worker(c: dict, out: Path) -> dict:
    import common
    import grpo

    rec = {"load_rss_mb": 0.0, "peaks": [], "prompt_len": [], "resp_len": []}
    load, push, gen = grpo.load_model_and_tokenizer, common.HFSampler.push_weights, common.HFSampler.generate

    def timed_load(*a, **k):
        res = load(*a, **k)
        rec["load_rss_mb"] = rss_mb()
        return res

    def generate(self, model, prompt_ids, n, *a, **k):
        if n == c["G"]:  # a training rollout (the final evaluation samples 1 per prompt)
            rec["prompt_len"] += [len(p) for p in prompt_ids]
        return gen(self, model, prompt_ids, n, *a, **k)

    grpo.load_model_and_tokenizer = timed_load
    common.HFSampler.push_weights = lambda self, m: (push(self, m), rec["peaks"].append(peak_mb()))  # after each step
    common.HFSampler.generate = generate
    grpo.main(grpo.Args(model=c["model"], task="gsm8k", backend="hf", device="cpu", dtype="float32",
                        max_steps=c["steps"], prompts_per_step=c["P"], group_size=c["G"], max_new_tokens=c["L"],
                        lr=1e-6, beta=0.0, agg="token-mean", eval_every=0, eval_prompts=1, eval_samples=1,
                        log_examples_every=0, save_every=10**9, verify_workers=0, overwrite=True,
                        output_dir=str(out / "run")))
    recs = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()[1:]]
    recs = [r for r in recs if "perf/sample_s" in r]
    phases = [{k: r.get(f"perf/{k}_s", 0.0) for k in ("sample", "score", "logp", "update")} for r in recs]
    return {"step_s": [sum(p.values()) for p in phases], "phases": phases, "load_rss_mb": rec["load_rss_mb"],
            "peak_mb": rec["peaks"][-1], "prompt_len": statistics.mean(rec["prompt_len"]),
            "resp_len": statistics.mean(r["response/len"] for r in recs)}


def trl_worker(c: dict, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import common

    model, tok, _ = common.load_model_and_tokenizer(c["model"], torch.device("cpu"))
    load_rss = rss_mb()
    train, _ = common.load_task("gsm8k")
    by_q = {e.question: e for e in train}
    cur, rec = {}, {"step_s": [], "phases": [], "peaks": [], "prompt_len": [], "resp_len": [], "processors": set()}

    def timed(name, fn, when=lambda: True):
        def wrapper(*a, **k):
            t = time.perf_counter()
            res = fn(*a, **k)
            if when():
                cur[name] = cur.get(name, 0.0) + time.perf_counter() - t
            return res
        return wrapper

    def reward(prompts, completions, **kw):
        return [common.score(by_q[p[-1]["content"]], c[0]["content"]) for p, c in zip(prompts, completions)]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            cur.clear()
            cur["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            step = time.perf_counter() - cur.pop("t0")
            ph = {k: cur.get(k, 0.0) for k in ("sample", "score", "logp")}
            rec["step_s"].append(step)
            rec["phases"].append({**ph, "update": step - sum(ph.values())})
            rec["peaks"].append(peak_mb())

    neutral = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)  # not the stand-in's 0.7/20/0.8/1.1
    cfg = GRPOConfig(output_dir=str(out / "run"), max_steps=c["steps"], per_device_train_batch_size=c["P"] * c["G"],
                     num_generations=c["G"], gradient_accumulation_steps=1, max_completion_length=c["L"], **neutral,
                     generation_kwargs=neutral, loss_type="dapo", beta=0.0, epsilon=0.2, learning_rate=1e-6,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     num_iterations=1, use_cpu=True, bf16=False, logging_steps=1, report_to="none",
                     save_strategy="no", disable_tqdm=True, seed=0, gradient_checkpointing=False)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": e.question}]} for e in train])
    trainer = GRPOTrainer(model=model, reward_funcs=timed("score", reward), args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    single_turn = trainer._generate_single_turn

    def sample(prompt_ids, *a, **k):
        res = single_turn(prompt_ids, *a, **k)
        rec["prompt_len"] += [len(p) for p in prompt_ids]
        rec["resp_len"] += [len(r) for r in res[0]]
        return res

    get_proc = model._get_logits_processor

    def processors(*a, **k):  # which logits processors generate() really applies
        res = get_proc(*a, **k)
        rec["processors"].update(type(x).__name__ for x in res)
        return res

    model._get_logits_processor = processors
    trainer._generate_single_turn = timed("sample", sample)
    trainer._get_per_token_logps_and_entropies = timed("logp", trainer._get_per_token_logps_and_entropies,
                                                       lambda: not torch.is_grad_enabled())
    trainer.train()
    return {"step_s": rec["step_s"], "phases": rec["phases"], "load_rss_mb": load_rss, "peak_mb": rec["peaks"][-1],
            "prompt_len": statistics.mean(rec["prompt_len"]), "resp_len": statistics.mean(rec["resp_len"]),
            "processors": sorted(rec["processors"])}


def run(side: str, c: dict, out: Path) -> dict:
    """One run in its own process -> the worker's result, or {"error": why}."""
    out.mkdir(parents=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, __file__, "--worker", side, "--config", json.dumps(c), "--out", str(out)],
                       capture_output=True, text=True, env=env)
    shutil.rmtree(out / "run", ignore_errors=True)  # grpo.py's checkpoint and final model: ~0.7 GB a run
    if p.returncode == 0 and (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    oom = p.returncode in (-9, 137) or "MemoryError" in p.stderr or "out of memory" in p.stderr.lower()
    why = "out of memory (killed)" if oom else f"failed, exit code {p.returncode}"
    print(f"{side} L={c['L']} G={c['G']}: {why}\n{p.stderr[-2000:]}", file=sys.stderr, flush=True)
    return {"error": why}


def merge(runs: list) -> dict:
    """Runs of one side and configuration -> medians over their timed steps (the first WARMUP dropped per run)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    steps = [s for r in ok for s in r["step_s"][WARMUP:]]
    phases = [p for r in ok for p in r["phases"][WARMUP:]]
    return {"step": statistics.median(steps), "min": min(steps), "max": max(steps), "n": len(steps),
            **{k: statistics.median(p[k] for p in phases) for k in ("sample", "score", "logp", "update")},
            "loaded": statistics.median(r["load_rss_mb"] for r in ok), "peak": max(r["peak_mb"] for r in ok),
            "prompt_len": statistics.mean(r["prompt_len"] for r in ok),
            "resp_len": statistics.mean(r["resp_len"] for r in ok), "processors": ok[0].get("processors")}


def ratio(res: dict, key: str) -> str:
    a, b = res["grpo.py"], res["TRL"]
    return "n/a" if "error" in a or "error" in b else f"{a[key] / b[key]:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scaling", action="store_true", help="the scaling table instead of the comparison")
    ap.add_argument("--small", action="store_true", help="a toy configuration, for a smoke test")
    ap.add_argument("--lengths", type=str, help="response lengths, comma-separated")
    ap.add_argument("--groups", type=str, help="group sizes (--scaling), comma-separated")
    ap.add_argument("--group_length", type=int, help="response length of the group-size sweep (--scaling)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 2; --scaling: 1)")
    ap.add_argument("--steps", type=int, help="steps per run, the first dropped as warm-up (default 3, at least 2)")
    ap.add_argument("--prompts", type=int, help="prompts per step (default 8)")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:  # a child process: the OOM killer should pick it, never the parent or anything else
        Path("/proc/self/oom_score_adj").write_text("1000")
        res = (ours_worker if a.worker == "grpo.py" else trl_worker)(json.loads(a.config), Path(a.out))
        return (Path(a.out) / "result.json").write_text(json.dumps(res))
    d = ({"lengths": "4,8", "groups": "2,4", "group_length": 4, "rounds": 1, "steps": 2, "prompts": 2} if a.small else
         {"lengths": "64,128,256,512" if a.scaling else "128,256", "groups": "4,8,16" if a.scaling else "8",
          "group_length": 128, "rounds": 1 if a.scaling else 2, "steps": 3, "prompts": 8})
    if a.small and not a.scaling:
        d.update(lengths="8", groups="2")
    for k, v in d.items():
        setattr(a, k, getattr(a, k) if getattr(a, k) is not None else v)
    lengths, groups = [int(x) for x in a.lengths.split(",")], [int(x) for x in a.groups.split(",")]
    if a.steps <= WARMUP:
        raise SystemExit(f"--steps must be more than the {WARMUP} warm-up step(s)")
    if a.scaling:  # lengths at the middle group size (8 by default), group sizes at group_length
        g0 = 8 if 8 in groups else groups[len(groups) // 2]
        sweep = {(L, g0): "length" for L in lengths}
        for G in groups:
            sweep[a.group_length, G] = "both" if (a.group_length, G) in sweep else "group"
    else:
        sweep = {(L, G): "" for G in groups for L in lengths}
    configs = list(sweep)
    import standin

    model = str(standin.standin_path(rows=151936))  # built once (cached), outside the timed runs
    runs = {(cfg, s): [] for cfg in configs for s in SIDES}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for L, G in configs:
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:  # alternate which side goes first
                    c = {"model": model, "L": L, "G": G, "P": a.prompts, "steps": a.steps}
                    res = run(side, c, Path(tmp) / f"{side}-{L}-{G}-{r}")
                    runs[(L, G), side].append(res)
                    print(f"round {r} L={L} G={G} {side}: " + (res.get("error") or
                          f"median {statistics.median(res['step_s'][WARMUP:] or res['step_s']):.2f} s/step, "
                          f"peak {res['peak_mb']:.0f} MB") + f" ({time.time() - t_start:.0f} s so far)", flush=True)
    res = {cfg: {s: merge(runs[cfg, s]) for s in SIDES} for cfg in configs}
    ok = {s: [rr[s] for rr in res.values() if "error" not in rr[s]] for s in SIDES}
    if not ok["grpo.py"] + ok["TRL"]:
        raise SystemExit("no run finished")
    cell = lambda m, k, digits: m["error"] if "error" in m else f"{m[k]:.{digits}f}"  # noqa: E731
    if a.scaling:
        print("\n| sweep | new tokens | group | grpo.py s/step | TRL s/step | ratio | grpo.py peak MB | TRL peak MB | "
              "ratio |\n" + "| --- " * 9 + "|")
        for (L, G), rr in res.items():
            o, t = rr["grpo.py"], rr["TRL"]
            print(f"| {sweep[L, G]} | {L} | {G} | {cell(o, 'step', 2)} | {cell(t, 'step', 2)} | {ratio(rr, 'step')} | "
                  f"{cell(o, 'peak', 0)} | {cell(t, 'peak', 0)} | {ratio(rr, 'peak')} |")
    else:
        print("\n| new tokens x group | trainer | median s/step | min | max | steps | sample s | score s | logp s | "
              "update s | loaded MB | peak MB | peak - loaded MB |\n" + "| --- " * 13 + "|")
        for (L, G), rr in res.items():
            for s, m in rr.items():
                if "error" in m:
                    print(f"| {L} x {G} | {s} | {m['error']} |" + " |" * 10)
                    continue
                print(f"| {L} x {G} | {s} | {m['step']:.2f} | {m['min']:.2f} | {m['max']:.2f} | {m['n']} | "
                      f"{m['sample']:.2f} | {m['score']:.2f} | {m['logp']:.2f} | {m['update']:.2f} | "
                      f"{m['loaded']:.0f} | {m['peak']:.0f} | {m['peak'] - m['loaded']:.0f} |")
        print()
        for (L, G), rr in res.items():
            print(f"{L} new tokens x {G}: step time grpo.py / TRL = {ratio(rr, 'step')} (target <= 0.7), "
                  f"peak memory grpo.py / TRL = {ratio(rr, 'peak')} (target <= 0.8)")
    import torch
    import transformers
    import trl

    mean = lambda ms, k: f"{statistics.mean(m[k] for m in ms):.1f}" if ms else "-"  # noqa: E731
    procs = sorted({p for m in ok["TRL"] for p in m["processors"]})
    print(f"\n{datetime.datetime.now():%Y-%m-%d %H:%M}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}; {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs; {a.rounds} round(s) x {a.steps} steps per side and configuration, the first "
          f"{WARMUP} of each run dropped; {a.prompts} prompts x group; stand-in {model} (151,936 embedding rows); "
          f"float32, lr 1e-6, beta 0, token-mean, clip 0.2, temperature 1; mean prompt "
          f"{mean(ok['grpo.py'] + ok['TRL'], 'prompt_len')} tokens; mean response grpo.py "
          f"{mean(ok['grpo.py'], 'resp_len')}, TRL {mean(ok['TRL'], 'resp_len')} tokens; logits processors TRL's "
          f"generate() applied: {', '.join(procs) or 'none'}; {time.time() - t_start:.0f} s in all.")
    print("Step = sample + score + logp + update; TRL's update = its step - the other three (advantages, the "
          "gradient forward and backward, the optimizer step). Peak = ru_maxrss after the last optimizer step.")

if __name__ == "__main__":
    main()
