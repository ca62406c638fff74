"""grpo.py against TRL's GRPOTrainer: seconds per training step, same model, prompts and settings, on this machine.

pip install -r bench/requirements.txt          # adds trl (and datasets, accelerate)
python bench/vs_trl.py                         # 3 alternating rounds of 20 steps each
python bench/vs_trl.py --rounds 5 --steps 30

Both sides: the embedded tiny countdown model, 32 prompts x 8 samples per step, at most 12 new tokens, temperature 1
(no top-k/top-p), token-mean loss ("dapo" in TRL), PPO clip 0.2, no KL (beta 0, no reference model), one optimizer
step per rollout batch, lr 3e-4, float32 on the CPU, HF generate for sampling. Each run is its own process; the
rounds alternate ours / TRL. A step is timed from the start of sampling to the end of the optimizer step (ours: the
sum of the phases grpo.py logs; TRL: a callback from on_step_begin to on_step_end). The first 3 steps of each run
are dropped as warm-up; the table gives the median over the remaining steps of all rounds.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WARMUP = 3


def ours(steps: int, prompts: int, out: Path) -> list:
    subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--max_steps", str(steps), "--eval_every", "0",
                    "--prompts_per_step", str(prompts), "--group_size", "8", "--max_new_tokens", "12",
                    "--backend", "hf", "--agg", "token-mean", "--lr", "3e-4", "--log_examples_every", "0",
                    "--save_every", "100000", "--output_dir", str(out)], check=True, capture_output=True)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    return [sum(v for k, v in r.items() if k.startswith("perf/") and k.endswith("_s")) for r in recs if "perf/sample_s" in r]


def trl_worker(steps: int, prompts: int, out: Path):
    """Runs in its own process: TRL's GRPOTrainer on the same model, prompts and reward."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import common

    torch.set_num_threads(2)
    path = common.resolve_model_path("tiny", "countdown")
    model, tok, _ = common.load_model_and_tokenizer(path, torch.device("cpu"))
    train, _ = common.load_task("countdown")
    by_prompt = {e.prompt: e for e in train}

    def reward(prompts, completions, **kw):
        return [common.score(by_prompt[p], c) for p, c in zip(prompts, completions)]

    times, t0 = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t0.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - t0[-1])

    cfg = GRPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=prompts * 8, num_generations=8,
                     gradient_accumulation_steps=1, max_completion_length=12, temperature=1.0, top_k=0, top_p=1.0,
                     loss_type="dapo", beta=0.0, epsilon=0.2, learning_rate=3e-4, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, num_iterations=1, use_cpu=True, bf16=False,
                     logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                     gradient_checkpointing=False)
    ds = Dataset.from_list([{"prompt": e.prompt} for e in train])
    GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                callbacks=[Clock()]).train()
    (out / "trl_times.json").write_text(json.dumps(times))


def trl(steps: int, prompts: int, out: Path) -> list:
    p = subprocess.run([sys.executable, __file__, "--trl_worker", "--steps", str(steps), "--prompts", str(prompts),
                        "--out", str(out)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"TRL run failed:\n{p.stderr[-3000:]}")
    return json.loads((out / "trl_times.json").read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--trl_worker", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.trl_worker:
        return trl_worker(a.steps, a.prompts, Path(a.out))
    import common

    common.resolve_model_path("tiny", "countdown")  # build the tiny model once, outside the timed runs
    res = {"grpo.py": [], "TRL GRPOTrainer": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            res["grpo.py"] += ours(a.steps, a.prompts, Path(d) / f"ours{r}")[WARMUP:]
            res["TRL GRPOTrainer"] += trl(a.steps, a.prompts, Path(d) / f"trl{r}")[WARMUP:]
            print(f"round {r}: ours {statistics.median(res['grpo.py']):.3f} s/step, "
                  f"TRL {statistics.median(res['TRL GRPOTrainer']):.3f} s/step (running medians)", flush=True)
    import torch
    import transformers
    import trl as trl_pkg

    print(f"\n{a.rounds} rounds x {a.steps} steps ({WARMUP} warm-up steps dropped per run), {a.prompts} prompts x 8, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_pkg.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| trainer | median s/step | min | max | steps timed |\n| --- | --- | --- | --- | --- |")
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} | {len(v)} |")
    ratio = statistics.median(res["grpo.py"]) / statistics.median(res["TRL GRPOTrainer"])
    print(f"\nratio grpo.py / TRL = {ratio:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
