"""Every trainer as a user runs it on a real model: the Qwen-shaped stand-in (tests/standin.py: Qwen2 architecture,
byte-level BPE, Qwen2.5's special tokens, chat template and generation_config) on chat-templated GSM8K, MATH-500 and
a user JSONL, through the decode-loop sampler and through vLLM on the CPU."""
import json

import pytest
from conftest import TORCHRUN, assert_same_as_one_process, needs_data, one_process_run_of, records, run_script

TRAINERS = ["grpo", "dph_rl", "lp_reg", "rl_plus", "delta_l", "dppo"]
SHORT = ["--max_new_tokens", "16", "--max_steps", "2", "--prompts_per_step", "4", "--group_size", "2",
         "--eval_every", "0", "--eval_prompts", "4", "--eval_samples", "2", "--log_examples_every", "1"]
EXTRA = {"dph_rl": ["--pef_split_prompts", "8", "--pef_k", "2", "--pef_min_correct", "2"],  # a small one-off split
         "rl_plus": ["--max_new_tokens", "192"]}  # the external worked solutions must fit the response length


def _run(name, standin, tmp_path, task, *more):
    p = run_script(f"{name}.py", "--model", str(standin), "--task", task, *SHORT, *EXTRA.get(name, []), *more,
                   "--output_dir", str(tmp_path), timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    first = next(r for r in records(tmp_path) if "policy/ratio" in r)
    assert first["policy/ratio"] == pytest.approx(1.0, abs=1e-4)  # the sampler's log-probs are the policy's
    assert "<|im_start|>user" in p.stdout + p.stderr  # the logged prompt is what the model saw: the chat template
    assert json.loads((tmp_path / "final" / "config.json").read_text())["dtype"] == "bfloat16"  # as it was stored
    return p


@needs_data("gsm8k_train.jsonl")
@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_on_the_standin_with_gsm8k(name, standin, tmp_path):
    _run(name, standin, tmp_path, "gsm8k")


@needs_data("math500_test.jsonl")
def test_grpo_on_the_standin_with_math500(standin, tmp_path):
    _run("grpo", standin, tmp_path, "math500")


def test_grpo_on_the_standin_with_a_user_jsonl(standin, tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"})
                         + "\n" for i in range(40)))
    _run("grpo", standin, tmp_path / "run", str(f))


@needs_data("gsm8k_train.jsonl")
@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_on_the_standin_through_vllm(name, standin, tmp_path):
    pytest.importorskip("vllm")
    _run(name, standin, tmp_path, "gsm8k", "--backend", "vllm")


# rl_plus: its external worked solutions (reward 1) give every group a non-zero advantage, where the random
# stand-in's own rollouts all score 0 (grpo.py would have no gradient to compare)
RANKS = ["rl_plus.py", "--task", "gsm8k", "--max_new_tokens", "192", "--max_steps", "3", "--prompts_per_step", "4",
         "--group_size", "2", "--micro_batch_size", "1", "--eval_every", "0", "--eval_prompts", "4", "--eval_samples",
         "2", "--lr", "1e-4"]  # lr 1e-4: a wrong gradient moves the weights visibly


@pytest.fixture(scope="module")
def one_process_standin_run(standin, tmp_path_factory):
    return one_process_run_of(tmp_path_factory, *RANKS, "--model", str(standin))


@needs_data("gsm8k_train.jsonl")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_on_the_standin_compute_what_one_process_does(one_process_standin_run, standin, tmp_path, mode):
    """DDP and FSDP2 on the Qwen2 architecture (tied embedding and head, grouped-query attention, chat-templated
    GSM8K prompts of other lengths on the two ranks), not only on the tiny Llama: the same rollouts, gradient
    norms and weights as one process, and `final/` saved whole, in the stored dtype, from the gathered shards."""
    extra = ["--fsdp", "true"] if mode == "fsdp" else []
    p = run_script(*TORCHRUN, *RANKS, "--model", str(standin), *extra, "--output_dir", str(tmp_path), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert all(r["perf/grad_norm"] > 1e-3 for r in records(one_process_standin_run)[1:])  # a gradient to compare
    assert_same_as_one_process(one_process_standin_run, tmp_path)  # rollouts, grad norms, weights
    final = json.loads((tmp_path / "final" / "config.json").read_text())
    assert final["dtype"] == "bfloat16" and final["tie_word_embeddings"]
