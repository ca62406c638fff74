"""common.py against naive references and hand-made cases."""
import itertools
import json
import time

import pytest
import torch
from transformers import AutoTokenizer

import common
from conftest import needs_data
from common import Example, pass_at_k, score


# ---- tasks -------------------------------------------------------------------------------------------------
def test_countdown_generated_solutions_verify_and_splits_are_disjoint():
    train, test = common.load_task("countdown", n_train=300, n_test=50)
    assert len(train) == 300 and len(test) == 50
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert all(score(e, e.solution) == 1.0 for e in train + test)
    assert common.load_task("countdown", n_train=300, n_test=50)[1] == test  # deterministic


def test_harder_levels_exist():
    train4, _ = common.load_task("countdown:4", n_train=50, n_test=10)
    assert all(len(e.gold.split("->")[0].split(",")) == 4 for e in train4)
    assert all(score(e, e.solution) == 1.0 for e in train4)
    a3, _ = common.load_task("arithmetic:3", n_train=50, n_test=10)
    assert all(score(e, e.solution) == 1.0 and 200 <= int(e.gold) <= 1998 for e in a3)


def test_jsonl_gsm8k_and_math_rows(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"question": "2+2?", "answer": "We add <<2+2=4>>4.\n#### 4"},
            {"problem": "Half?", "solution": "It is $\\boxed{\\frac12}$.", "answer": "\\frac{1}{2}"},
            {"question": "Big?", "answer": "#### 1,000"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    ex = common.read_jsonl(f)
    assert [e.gold for e in ex] == ["4", "\\frac{1}{2}", "1000"]
    assert ex[0].solution == "We add 4.\nThe answer is \\boxed{4}." and "<<" not in ex[0].solution
    assert ex[1].solution == rows[1]["solution"]
    assert all(score(e, e.solution) == 1.0 for e in ex)


@pytest.mark.parametrize("content,msg", [
    ('{"question": "a", "answer": "1"}\n{not json\n', "d.jsonl:2: not valid JSON"),
    ('{"question": "a"}\n', "d.jsonl:1: a row needs"),
    ('[1, 2]\n', "d.jsonl:1: a row needs"),
    ("\n\n", "d.jsonl: no rows"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, msg):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ValueError, match=msg):
        common.read_jsonl(tmp_path / "d.jsonl")


def test_unknown_task_and_missing_file():
    with pytest.raises(ValueError, match="unknown task"):
        common.load_task("sudoku")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        common.load_task("/nope.jsonl")


@pytest.mark.skipif(not (common.shared_data_dir() / "gsm8k_test.jsonl").exists(), reason="../shared/data absent")
def test_shared_data_loads_and_golds_verify():
    train, test = common.load_task("gsm8k", n_train=200, n_test=100)
    assert len(train) == 200 and len(test) == 100
    assert all(score(e, e.solution) == 1.0 for e in train[:50])
    _, m = common.load_task("math500")
    assert len(m) == 100 and all(score(e, f"\\boxed{{{e.gold}}}") == 1.0 for e in m[:30])


# ---- verifiers ----------------------------------------------------------------------------------------------
CD = Example("countdown", "Q:7,1,5->3 A:", "", "7,1,5->3", "7-5+1")


@pytest.mark.parametrize("completion,reward", [
    ("7-5+1", 1), ("1+7-5", 1), ("7 - 5 + 1", 1), ("I think \\boxed{7-5+1}", 1), ("(7-5)+1", 1),
    ("7-5", 0),  # a number unused
    ("7-5+1+1", 0),  # a number used twice
    ("7+5+1", 0),  # wrong value
    ("7-5+1=3", 0), ("7--5+1", 0), ("75+1", 0), ("", 0), ("7-5+", 0), ("abc", 0),
])
def test_countdown_verifier(completion, reward):
    assert score(CD, completion) == reward


def test_countdown_verifier_rejects_power_tower_fast():
    ex = Example("countdown", "", "", "9,9,9->1", "")
    t = time.perf_counter()
    assert score(ex, "9**9**9") == 0.0
    assert time.perf_counter() - t < 0.1


def test_sum_answers_are_running_totals_spread_over_ten_fold_lengths(tok):
    """The `sum` task: the worked answer is the running totals, its last one the gold total; every count of terms
    1-10 occurs, answers (with EOS) span 2 to 20+ tokens within the 32-token cap, and prompt + cap fit the tiny
    model's 64 positions. Splits disjoint, generation deterministic."""
    train, test = common.load_task("sum", n_train=2000, n_test=200)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert common.load_task("sum", n_train=2000, n_test=200)[1] == test
    for e in train + test:
        digits = [int(x) for x in e.prompt.removeprefix("Q:").removesuffix(" A:").split(",")]
        assert [int(x) for x in e.solution.split(",")] == list(itertools.accumulate(digits))
        assert e.gold == str(sum(digits)) and score(e, e.solution) == 1.0 and all(1 <= d <= 9 for d in digits)
    assert {e.prompt.count(",") + 1 for e in train} == set(range(1, 11))
    lens = [len(tok(e.solution, add_special_tokens=False)["input_ids"]) + 1 for e in train]  # + EOS
    assert min(lens) == 2 and 20 <= max(lens) <= common.default_max_new_tokens("sum") == 32
    assert max(len(tok(e.prompt)["input_ids"]) for e in train) + 32 <= 64
    short, _ = common.load_task("sum:3", n_train=100, n_test=20)
    assert max(e.prompt.count(",") + 1 for e in short) == 3


def test_sum_with_too_few_distinct_prompts_fails_instead_of_looping():
    with pytest.raises(ValueError, match="fewer than 100 distinct prompts"):
        common.make_sum(100, 0, max_terms=1)  # 9 exist


@pytest.mark.parametrize("completion,reward", [
    ("3,8,10", 1), ("10", 1), ("\\boxed{10}", 1), ("The totals: 3, 8\n3,8,10", 1), ("3,8,010", 1),
    ("3,8,11", 0), ("3,8,10,", 0), ("10,3", 0), ("1 0", 0), ("", 0)])
def test_sum_verifier_checks_the_last_total_only(completion, reward):
    assert score(Example("sum", "Q:3,5,2 A:", "", "10", "3,8,10"), completion) == reward


@pytest.mark.parametrize("task,cap", [("countdown", 12), ("countdown:4", 12), ("arithmetic:3", 12), ("sum", 32),
                                      ("sum:4", 32), ("gsm8k", 512), ("x.jsonl", 512)])
def test_default_response_cap_per_task(task, cap):
    assert common.default_max_new_tokens(task) == cap


@pytest.mark.parametrize("completion,reward", [
    ("82", 1), (" 82 ", 1), ("\\boxed{82}", 1), ("so 37+45 is\n82", 1), ("83", 0), ("82.5", 0), ("8 2", 0), ("", 0)])
def test_arithmetic_verifier(completion, reward):
    assert score(Example("arithmetic", "", "", "82", ""), completion) == reward


@pytest.mark.parametrize("gold,completion,reward", [
    ("18", "She makes 9 * 2 = 18 dollars. \\boxed{18}", 1),
    ("18", "\\boxed{18.0}", 1),
    ("\\frac{1}{2}", "The answer is \\boxed{0.5}", 1),
    ("\\frac{1}{2}", "The answer is \\boxed{\\frac{2}{4}}", 1),
    ("\\sqrt{2}/2", "\\boxed{\\frac{1}{\\sqrt{2}}}", 1),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "so \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", 1),
    ("18", "\\boxed{19}", 0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0),
    ("18", "no answer here", 0),
    ("72", "I think 72 apples", 0),  # no box: the answer must be in the last \\boxed{} (regression)
    ("72", "The answer is 72.", 0),
    ("72", "\\boxed{72", 0),  # unclosed box
    ("72", "\\boxed{71} or maybe 72", 0),  # the last box counts, nothing after it
    ("72", "\\boxed{72} apples", 1),
])
def test_math_verifier(gold, completion, reward):
    assert score(Example("math", "", "", gold, ""), completion) == reward


def test_math_verifier_pathological_strings_finish():
    ex = Example("math", "", "", "2", "")
    for bad in ["\\boxed{" + "(" * 3000, "\\boxed{" + "x^" * 500 + "2}", "9" * 5000, "\\frac{" * 800]:
        t = time.perf_counter()
        assert score(ex, bad) == 0.0
        assert time.perf_counter() - t < 15


def test_extract_answer_takes_last_box_with_nested_braces():
    assert common.extract_answer("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert common.extract_answer("a\n\n b \n") == "b"


# ---- pass@k -------------------------------------------------------------------------------------------------
def test_pass_at_k_matches_brute_force_for_every_n_c_k_up_to_8():
    """Every (n, c, k) with k <= n <= 8, the edges included (c = 0, c = n, k = n, and n - c = k exactly, where the
    estimator is 1 - 1/C(n, k), not 1): the share of the k-subsets of the n samples that hold a correct one."""
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                expect = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expect, abs=1e-12), (n, c, k)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="pass@8 needs at least 8 samples, got 4"):
        pass_at_k(4, 1, 8)


# ---- tokenizer / model --------------------------------------------------------------------------------------
def test_tiny_tokenizer_roundtrips_through_autotokenizer(tmp_path, tok, rand_model):
    rand_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    re_tok = AutoTokenizer.from_pretrained(tmp_path)
    for s in ["Q:7,1,5->3 A:", "Q:37+45=? A:82", "a b  c"]:
        assert re_tok(s)["input_ids"] == tok(s)["input_ids"]
    assert tok.decode(tok("Q:1,2->3 A:")["input_ids"], skip_special_tokens=True) == "Q:1,2->3 A:"
    assert rand_model.config.hidden_size // rand_model.config.num_attention_heads in (32, 64)  # vLLM CPU


def test_missing_model_fails_with_one_sentence():
    with pytest.raises(SystemExit, match="could not load model './no/such/model': no such folder"):
        common.load_model_and_tokenizer("./no/such/model", torch.device("cpu"))
    with pytest.raises(SystemExit, match="could not load model 'nobody/no-such-model-xyz'"):
        common.load_model_and_tokenizer("nobody/no-such-model-xyz", torch.device("cpu"))


def test_tiny_model_refuses_math_tasks():
    with pytest.raises(ValueError, match=r"only knows the built-in tasks \(countdown, arithmetic, sum\), not 'gsm8k'"):
        common.resolve_model_path("tiny", "gsm8k")


def test_long_prompts_are_dropped_with_warning(tok, capsys):
    ex = [Example("arithmetic", "Q:1+1=? A:", "", "2", "2"), Example("arithmetic", "Q:" + "1+" * 40 + "1=? A:", "", "", "")]
    assert common.drop_long_prompts(tok, ex, 20, "training") == ex[:1]
    assert "skipped 1 of 2 training prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="only 0 test prompts fit in 20 tokens"):
        common.drop_long_prompts(tok, ex[1:], 20, "test")
    with pytest.raises(SystemExit, match="only 1 training prompts fit in 20 tokens .of 2., fewer than the 4 needed"):
        common.drop_long_prompts(tok, ex, 20, "training", need=4)


# ---- log-probs ----------------------------------------------------------------------------------------------
def _batch(tok, model, n=6, seed=0, temperature=1.0):
    ex = common.load_task("countdown", n_train=10, n_test=5)[0][:3]
    s = hf_sampler(tok).generate(model, common.encode_prompts(tok, ex), 2, 10, temperature, seeds=[seed, seed + 1, 7],
                                 topk=4)
    return s, common.collate(s, tok.pad_token_id, "cpu")


def hf_sampler(tok):
    return common.HFSampler(tok, [tok.eos_token_id])


def naive_logprobs(model, batch, temperature=1.0):
    """The reference: full [B, L, V] log_softmax, then gather."""
    T = batch["mask"].shape[1]
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    lp = torch.log_softmax(logits[:, -T - 1:-1].float() / temperature, -1)  # [B, T, V]
    logp = lp.gather(-1, batch["response_ids"][..., None]).squeeze(-1) * batch["mask"]
    ent = -(lp.exp() * lp).sum(-1) * batch["mask"]
    return logp, ent, lp


@pytest.mark.parametrize("temperature,chunk", [(1.0, 512), (1.0, 3), (0.7, 5)])
def test_chunked_logprobs_equal_naive(tok, rand_model, temperature, chunk):
    _, batch = _batch(tok, rand_model, temperature=temperature)
    before = {k: v.clone() for k, v in batch.items()}
    ids = batch["topk_ids"]
    out = common.token_logprobs(rand_model, batch, temperature, chunk, with_entropy=True, extra_ids=ids)
    ref_logp, ref_ent, lp = naive_logprobs(rand_model, batch, temperature)
    assert torch.allclose(out["logp"], ref_logp, atol=1e-5)
    assert torch.allclose(out["entropy"], ref_ent, atol=1e-5)
    m = batch["mask"].bool()
    assert torch.allclose(out["extra_logp"][m], lp.gather(-1, ids)[m], atol=1e-5)
    assert all(torch.equal(before[k], batch[k]) for k in batch)  # inputs untouched


def test_chunk_boundaries_equal_naive(tok):
    """Chunks of 1 row, of N - 1 (the last chunk holds one row), N and N + 1 rows (N masked tokens): the same
    log-probs, entropies and gradients as the naive whole-vocabulary computation."""
    model = common.tiny_model(len(tok), hidden=64, seed=0).eval()
    _, batch = _batch(tok, model)
    n = int(batch["mask"].sum())
    ref_logp, ref_ent, _ = naive_logprobs(model, batch)
    g_ref = torch.autograd.grad((ref_logp - 0.5 * ref_ent).sum(), list(model.parameters()))
    for chunk in (1, n - 1, n, n + 1):
        out = common.token_logprobs(model, batch, 1.0, chunk_size=chunk, with_entropy=True)
        assert torch.allclose(out["logp"], ref_logp, atol=1e-5) and torch.allclose(out["entropy"], ref_ent, atol=1e-5)
        g = torch.autograd.grad((out["logp"] - 0.5 * out["entropy"]).sum(), list(model.parameters()))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_ref)), chunk


@pytest.mark.parametrize("vocab,hidden", [(None, 128), (300, 64)])  # V < H and V > H
def test_chunked_logprob_gradients_equal_naive(tok, vocab, hidden):
    model = common.tiny_model(vocab or len(tok), hidden=hidden, seed=0).eval()
    _, batch = _batch(tok, model)
    out = common.token_logprobs(model, batch, 1.0, chunk_size=4, with_entropy=True)
    g1 = torch.autograd.grad((out["logp"] + out["entropy"]).sum(), list(model.parameters()))
    ref_logp, ref_ent, _ = naive_logprobs(model, batch)
    g2 = torch.autograd.grad((ref_logp + ref_ent).sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))


def _mixed_prompts(tok):
    """Four prompts of two different lengths (left padding is exercised)."""
    ex = common.load_task("arithmetic:1", n_train=4, n_test=2)[0][:2]
    return common.encode_prompts(tok, ex + common.load_task("countdown", n_train=4, n_test=2)[0][:2])


def _mixed_batch(tok, model, max_new, seed=0):
    """Each of _mixed_prompts sampled 3 times, rows shuffled so that groups are not contiguous."""
    s = hf_sampler(tok).generate(model, _mixed_prompts(tok), 3, max_new, seeds=common.stream_seeds((seed,), 4))
    batch = common.collate(s, tok.pad_token_id, "cpu")
    perm = torch.randperm(len(s.response_ids), generator=torch.Generator().manual_seed(seed))
    return {k: v[perm] for k, v in batch.items()}


@pytest.mark.parametrize("max_new", [1, 10])
def test_shared_prompt_forward_equals_naive(tok, rand_model, max_new):
    """Rows with the same prompt share one prompt forward (response_hidden): values and gradients as if every row
    ran its own prompt, with left padding, shuffled groups and one-token responses."""
    batch = _mixed_batch(tok, rand_model, max_new)
    assert len(set(map(tuple, batch["input_ids"][:, : -batch["mask"].shape[1]].tolist()))) == 4
    out = common.token_logprobs(rand_model, batch, 1.0, with_entropy=True)
    ref_logp, ref_ent, _ = naive_logprobs(rand_model, batch)
    assert torch.allclose(out["logp"], ref_logp, atol=1e-5) and torch.allclose(out["entropy"], ref_ent, atol=1e-5)
    g1 = torch.autograd.grad((out["logp"] * batch["old_logp"]).sum(), list(rand_model.parameters()))
    g2 = torch.autograd.grad((ref_logp * batch["old_logp"]).sum(), list(rand_model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    calls = []  # the shared path really runs: 4 distinct prompts once (minus their last token), then the B rows
    hook = rand_model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    h = common.response_hidden(rand_model, batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1])
    hook.remove()
    B, T = batch["mask"].shape
    assert calls == [(4, batch["input_ids"].shape[1] - T - 1), (B, T)]
    h0 = common.response_hidden(rand_model, batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1],
                                share_prompts=False)
    m = batch["mask"][..., None]  # [B, T, 1]
    assert h.shape == h0.shape and torch.allclose(h * m, h0 * m, atol=1e-5)


def test_shared_prompt_forward_falls_back_without_a_cache(tok, rand_model):
    """HF gradient checkpointing turns the KV cache off in training: the per-row forward is used, same values."""
    batch = _mixed_batch(tok, rand_model, 10)
    ref_logp, _, _ = naive_logprobs(rand_model, batch)
    rand_model.gradient_checkpointing_enable()
    rand_model.train()  # dropout is 0 in the tiny config
    out = common.token_logprobs(rand_model, batch, 1.0)
    assert torch.allclose(out["logp"], ref_logp, atol=1e-5)


def test_sampler_shared_prefill_changes_nothing(tok, rand_model, monkeypatch):
    """The sampler's once-per-prompt prefill gives the same tokens and log-probs as prefilling every copy."""
    p = _mixed_prompts(tok)
    assert len({len(x) for x in p}) > 1  # left padding is exercised
    a = hf_sampler(tok).generate(rand_model, p, 4, 8, seeds=[2, 3, 4, 5], topk=3)
    every_row = lambda model, ids, attn: model(input_ids=ids, attention_mask=attn, use_cache=True,  # noqa: E731
                                               position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).past_key_values
    monkeypatch.setattr(common.HFSampler, "_prefill", staticmethod(every_row))
    b = hf_sampler(tok).generate(rand_model, p, 4, 8, seeds=[2, 3, 4, 5], topk=3)
    assert a.response_ids == b.response_ids and a.topk_ids == b.topk_ids
    assert all(abs(x - y) < 1e-5 for u, v in zip(a.logp, b.logp) for x, y in zip(u, v))


@pytest.mark.parametrize("temperature,with_entropy", [(1.0, True), (0.7, True), (1.3, False)])
def test_chunk_logprobs_backward_passes_gradcheck(temperature, with_entropy):
    """The hand-written backward of one chunk (logp, entropy, extra log-probs) against finite differences."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)  # [n, H]
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)  # [V, H]
    tgt, ext = torch.tensor([0, 3, 6, 3, 1]), torch.tensor([[1, 2], [3, 0], [6, 5], [2, 3], [4, 1]])
    f = lambda h, w: common._ChunkLogprobs.apply(h, w, tgt, ext, temperature, with_entropy)  # noqa: E731
    logp, ent, extra = f(h, w)
    lp = torch.log_softmax(h @ w.T / temperature, -1)  # [n, V] naive
    assert torch.allclose(logp, lp.gather(-1, tgt[:, None]).squeeze(-1)) and torch.allclose(extra, lp.gather(-1, ext))
    assert torch.allclose(ent, -(lp.exp() * lp).sum(-1)) if with_entropy else torch.all(ent == 0)
    assert torch.autograd.gradcheck(f, (h, w))


@pytest.mark.parametrize("frozen", ["weight", "h"])
def test_chunk_logprobs_backward_with_one_input_frozen(frozen):
    """A frozen LM head (or frozen hidden states) still gets the other input's gradient, each gated on its own
    needs_input_grad flag."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=frozen != "h")  # [n, H]
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=frozen != "weight")  # [V, H]
    tgt, ext = torch.tensor([0, 3, 6, 3, 1]), torch.tensor([[1, 2], [3, 0], [6, 5], [2, 3], [4, 1]])
    logp, ent, extra = common._ChunkLogprobs.apply(h, w, tgt, ext, 1.0, True)
    (logp.sum() + 0.3 * ent.sum() - extra.sum()).backward()
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(h2 @ w2.T, -1)  # [n, V] naive
    ent2 = -(lp.exp() * lp).sum(-1)
    (lp.gather(-1, tgt[:, None]).sum() + 0.3 * ent2.sum() - lp.gather(-1, ext).sum()).backward()
    live, naive = (h, h2) if frozen == "weight" else (w, w2)
    assert torch.allclose(live.grad, naive.grad)


def test_hf_sampler_behaviour_logprobs_match_trainer(tok, rand_model):
    s, batch = _batch(tok, rand_model, temperature=0.8)
    assert len(s.response_ids) == 6 and all(f in ("stop", "length") for f in s.finish)
    for r, f in zip(s.response_ids, s.finish):  # responses end at the first eos, or run to the cap
        assert (r[-1] == tok.eos_token_id) == (f == "stop") and tok.eos_token_id not in r[:-1]
    trainer = common.token_logprobs(rand_model, batch, 0.8)["logp"]
    assert torch.allclose(trainer, batch["old_logp"], atol=1e-5)
    # the top-K the sampler reports are the K most likely tokens, sampled token's log-prob among the ordered list
    assert torch.all(batch["topk_old_logp"][..., :-1] >= batch["topk_old_logp"][..., 1:])


def test_sampler_is_seeded(tok, rand_model):
    p = common.encode_prompts(tok, common.load_task("countdown", n_train=10, n_test=5)[0][:2])
    a = hf_sampler(tok).generate(rand_model, p, 3, 8, seeds=[5, 6]).response_ids
    b = hf_sampler(tok).generate(rand_model, p, 3, 8, seeds=[5, 6]).response_ids
    c = hf_sampler(tok).generate(rand_model, p, 3, 8, seeds=[6, 5]).response_ids
    assert a == b and a != c


# ---- evaluation, checkpoints --------------------------------------------------------------------------------
def test_evaluate_reports_greedy_and_pass_at_k(tok, rand_model):
    class Oracle:  # returns the gold solution for every sample: everything must score 1
        def generate(self, model, prompts, n, max_new_tokens, temperature=1.0, seeds=None, topk=0):
            ids = [tok(e.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in ex for _ in range(n)]
            return common.Samples([[0]] * len(ids), ids, [[0.0] * len(i) for i in ids], ["stop"] * len(ids))

    ex = common.load_task("countdown", n_train=10, n_test=5)[1]
    res = common.evaluate(rand_model, tok, Oracle(), ex, n=4)
    assert res["eval/greedy_acc"] == 1.0 and res["eval/pass@1"] == 1.0 and res["eval/pass@4"] == 1.0
    assert sorted(k for k in res if "pass@" in k) == ["eval/pass@1", "eval/pass@4"]  # no pass@8/16 from 4 samples
    assert res["eval/response_len"] == pytest.approx(sum(len(e.solution) + 1 for e in ex) / len(ex))


def test_save_checkpoint_is_atomic(tmp_path):
    common.save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(2)})
    common.save_checkpoint(tmp_path / "c.pt", {"x": torch.zeros(2)})
    assert torch.equal(torch.load(tmp_path / "c.pt")["x"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.slow  # 15 s of generating
def test_too_small_countdown_level_fails_instead_of_looping():
    with pytest.raises(ValueError, match="fewer than"):
        common.load_task("countdown:2")


# ---- the real-model path: sampling exactly from pi, seeds, stop ids, stand-in ----------------------------------
def test_sample_tokens_follows_the_distribution_exactly():
    """Inverse-CDF draw: with N evenly spread uniforms every token is drawn N * p times (p = 0.1, 0.2, 0, 0.7)."""
    probs = torch.tensor([[0.1, 0.2, 0.0, 0.7]]).expand(1000, 4)
    u = (torch.arange(1000) + 0.5) / 1000
    counts = torch.bincount(common.sample_tokens(probs, u), minlength=4)
    assert counts.tolist() == [100, 200, 0, 700]
    assert common.sample_tokens(torch.tensor([[0.5, 0.5]]), torch.tensor([0.9999999])).item() == 1
    assert common.sample_tokens(torch.tensor([[0.2, 0.6]]), torch.tensor([0.5])).item() == 1  # unnormalised: u * total


def test_stream_seeds_are_distinct_and_rank_independent():
    a = common.stream_seeds((0, "rollout", 3), 64)
    assert len(set(a)) == 64 and all(0 <= s < 2**62 for s in a)
    assert common.stream_seeds((0, "rollout", 3), 8) == a[:8]  # a rank's slice is what one process would use
    assert not set(a) & (set(common.stream_seeds((0, "rollout", 4), 64)) | set(common.stream_seeds((0, "eval", 3), 64)))


def test_a_prompts_samples_do_not_depend_on_its_batch(tok, rand_model):
    """Each prompt samples from its own stream: alone, in another order, or split over chunks (ranks), the same."""
    p = _mixed_prompts(tok)
    seeds = common.stream_seeds((1,), 4)
    whole = hf_sampler(tok).generate(rand_model, p, 3, 8, seeds=seeds)
    alone = hf_sampler(tok).generate(rand_model, p[2:3], 3, 8, seeds=seeds[2:3])
    small = common.HFSampler(tok, [tok.eos_token_id], max_batch=5).generate(rand_model, p[::-1], 3, 8, seeds=seeds[::-1])
    assert alone.response_ids == whole.response_ids[6:9]
    assert small.response_ids[3:6] == whole.response_ids[6:9]
    same = hf_sampler(tok).generate(rand_model, [p[0], p[0]], 2, 8, seeds=common.stream_seeds((2,), 2))
    assert same.response_ids[:2] != same.response_ids[2:]  # the same prompt twice in a call: different samples


def test_pass_ks_only_asks_what_n_allows():
    assert common.pass_ks(16) == [1, 8, 16] and common.pass_ks(4) == [1, 4] and common.pass_ks(1) == [1]
    assert common.pass_ks(32) == [1, 8, 16, 32]


def test_token_logprobs_nograd_by_micro_batch_equals_whole(tok, rand_model):
    _, batch = _batch(tok, rand_model)
    whole = common.token_logprobs(rand_model, batch, 1.0, with_entropy=True)
    for mb in (1, 4, 0):
        part = common.token_logprobs_nograd(rand_model, batch, mb, temperature=1.0, with_entropy=True)
        assert all(torch.allclose(part[k], whole[k], atol=1e-6) for k in whole) and not part["logp"].requires_grad


def test_only_the_last_hidden_state_is_kept(tok, rand_model):
    """response_hidden never asks for every layer's hidden states (at 7B that is ~35 GB per batch)."""
    _, batch = _batch(tok, rand_model)
    seen = []
    hook = rand_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("output_hidden_states")),
                                                with_kwargs=True)
    for share in (True, False):
        common.response_hidden(rand_model, batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1], share)
    hook.remove()
    assert seen and not any(seen)


def test_bf16_autocast_logprobs_and_gradients_reach_float32_weights(tok, rand_model):
    _, batch = _batch(tok, rand_model)
    ref = common.token_logprobs(rand_model, batch, 1.0)["logp"]
    with common.autocast(torch.device("cpu"), torch.bfloat16):
        out = common.token_logprobs(rand_model, batch, 1.0, with_entropy=True)
    assert out["logp"].dtype == torch.float32 and torch.allclose(out["logp"], ref, atol=0.05)
    (out["logp"].sum() + out["entropy"].sum()).backward()
    w = common.output_weight(rand_model)
    assert w.dtype == torch.float32 and w.grad is not None and w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


def test_standin_looks_like_qwen(standin):
    tok = AutoTokenizer.from_pretrained(standin)
    model = common.load_model_and_tokenizer(str(standin), torch.device("cpu"))[0]
    assert type(tok).__name__ == "Qwen2Tokenizer" and model.config.model_type == "qwen2"
    assert model.config.vocab_size > len(tok) and model.config.tie_word_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen") and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("  two  spaces, 1234 digits")["input_ids"]) == "  two  spaces, 1234 digits"  # byte-level
    gen = model.generation_config
    assert gen.repetition_penalty != 1 and gen.top_k and gen.top_p < 1 and gen.temperature != 1
    assert common.stop_ids(tok, model) == sorted(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


def _standin_batch(standin, dtype=torch.float32):
    """3 chat-templated prompts x 4 samples of 16 tokens from the stand-in: (model, prompts, sampler, Samples, batch)."""
    model, tok, _ = common.load_model_and_tokenizer(str(standin), torch.device("cpu"))
    prompts = common.encode_prompts(tok, common.load_task("arithmetic", n_train=10, n_test=5)[0][:3])
    sampler = common.HFSampler(tok, common.stop_ids(tok, model), dtype)
    s = sampler.generate(model, prompts, 4, 16, 1.0, seeds=common.stream_seeds((0,), 3))
    return model, prompts, sampler, s, common.collate(s, tok.pad_token_id, "cpu")


def test_hf_sampler_samples_pi_not_the_generation_config(standin):
    """Regression: generate() took repetition_penalty/top_k/top_p from the stand-in's generation_config.json, so the
    behaviour log-probs were not pi's (first-step ratio != 1). The decode loop samples exactly pi at T."""
    model, prompts, sampler, s, batch = _standin_batch(standin)
    with torch.no_grad():
        logp = common.token_logprobs(model, batch, 1.0)["logp"]
    m = batch["mask"]
    assert ((logp - batch["old_logp"]).abs() * m).max() < 1e-4
    assert abs(common.masked_mean(torch.exp(logp - batch["old_logp"]), m).item() - 1) < 1e-4  # first-step ratio
    model.generation_config.repetition_penalty = 3.0  # ...and the config has no say in what is sampled
    assert sampler.generate(model, prompts, 4, 16, 1.0, seeds=common.stream_seeds((0,), 3)).response_ids == s.response_ids


def test_hf_sampler_bf16_matches_the_bf16_trainer_closely(standin):
    model, _, _, _, batch = _standin_batch(standin, torch.bfloat16)
    with torch.no_grad(), common.autocast(torch.device("cpu"), torch.bfloat16):
        logp = common.token_logprobs(model, batch, 1.0)["logp"]
    m = batch["mask"]
    assert ((logp - batch["old_logp"]).abs() * m).max() < 0.05  # bf16 rounding of two different kernels
    assert abs(common.masked_mean(torch.exp(logp - batch["old_logp"]), m).item() - 1) < 1e-3


def test_a_bf16_sampler_beside_a_float32_trainer_is_off_by_bf16_rounding_on_the_standin(standin):
    """--sampler_dtype bfloat16 with --dtype float32 on the real architecture (152k vocabulary): the behaviour
    log-probs the bf16 decode loop records differ from the float32 trainer's by bf16 rounding (a real mismatch, not
    zero, not garbage), while a float32 sampler matches the float32 trainer to float32 rounding."""
    gaps = {}
    for dt in (torch.float32, torch.bfloat16):
        model, _, _, _, batch = _standin_batch(standin, dt)
        with torch.no_grad():
            logp = common.token_logprobs(model, batch, 1.0)["logp"]  # the float32 trainer
        gaps[dt] = ((logp - batch["old_logp"]).abs() * batch["mask"]).max().item()
    assert gaps[torch.float32] < 1e-3 < gaps[torch.bfloat16] < 0.5, gaps


@needs_data("gsm8k_train.jsonl")
def test_gsm8k_keeps_every_training_row():
    train, test = common.load_task("gsm8k")
    assert len(train) == 7473 and len(test) == 500  # was silently cut to 5,000


# ---- gaps mutation testing found in common.py (python tests/mutation.py common.token_logprobs ...) --------------
def test_token_logprobs_defaults_and_a_batch_without_response_tokens(tok, rand_model):
    """Called bare: temperature 1, no entropy. A batch whose responses are all empty (every mask 0) gives zeros of
    the right shapes in float32 (also under bf16 autocast and from bf16 weights), not an error."""
    _, batch = _batch(tok, rand_model)
    bare = common.token_logprobs(rand_model, batch)
    assert set(bare) == {"logp"}
    assert torch.equal(bare["logp"], common.token_logprobs(rand_model, batch, 1.0, 256, False)["logp"])
    empty = {**batch, "mask": torch.zeros_like(batch["mask"])}
    B, T = batch["mask"].shape
    half = common.tiny_model(len(tok), seed=0).eval().bfloat16()
    for model, ctx in [(rand_model, torch.autocast("cpu", enabled=False)), (half, torch.autocast("cpu", enabled=False)),
                       (rand_model, torch.autocast("cpu", dtype=torch.bfloat16))]:
        with ctx:
            out = common.token_logprobs(model, empty, with_entropy=True, extra_ids=batch["topk_ids"])
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            "logp": ((B, T), torch.float32), "entropy": ((B, T), torch.float32),
            "extra_logp": ((B, T, batch["topk_ids"].shape[-1]), torch.float32)}
        assert all(not v.any() for v in out.values())


def test_token_logprobs_keep_a_float64_model_s_precision(tok, rand_model):
    """The scatter back to [B, T] keeps the chunks' dtype: a float64 model gives float64 log-probs (as gradcheck
    needs), equal to the float32 ones to float32 precision."""
    _, batch = _batch(tok, rand_model)
    model64 = common.tiny_model(len(tok), seed=0).eval().double()
    out = common.token_logprobs(model64, batch, with_entropy=True)
    assert out["logp"].dtype == out["entropy"].dtype == torch.float64
    assert torch.allclose(out["logp"].float(), common.token_logprobs(rand_model, batch)["logp"], atol=1e-5)


def test_under_autocast_the_projection_and_its_backward_run_in_the_autocast_dtype(tok, rand_model, monkeypatch):
    """Hidden states and LM head reach the chunked projection both in bf16 (cast once), so its hand-written backward
    multiplies in bf16 too, as the model's own lm_head would; the log-probs still come out float32."""
    _, batch = _batch(tok, rand_model)
    seen, apply = [], common._ChunkLogprobs.apply
    monkeypatch.setattr(common._ChunkLogprobs, "apply",
                        lambda h, w, *a: (seen.append((h.dtype, w.dtype)), apply(h, w, *a))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = common.token_logprobs(rand_model, batch)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)} and out["logp"].dtype == torch.float32


def test_sample_tokens_scales_u_by_the_row_total_and_stays_in_the_vocabulary():
    """Inverse CDF on the row's own total (probabilities that do not sum to 1 are drawn in proportion); a NaN row
    (a broken model) still yields an id inside the vocabulary, so the NaN check downstream names the problem."""
    w = torch.tensor([[0.1, 0.1, 0.2], [0.1, 0.1, 0.2]])  # total 0.4
    assert common.sample_tokens(w, torch.tensor([0.3, 0.6])).tolist() == [1, 2]  # 0.12 -> cdf 0.2; 0.24 -> cdf 0.4
    nan = torch.full((1, 4), float("nan"))
    assert common.sample_tokens(nan, torch.tensor([0.5])).tolist() == [3]


def test_stream_seeds_use_62_bits():
    """Seeds come from the 64-bit state shifted below 2**62 (vLLM adds the child index): the whole range is used."""
    seeds = common.stream_seeds((0, "rollout", 3), 4096)
    assert max(seeds) < 2**62 and max(seeds) >= 2**61 and len(set(seeds)) == 4096


def test_extract_answer_of_an_empty_completion_is_empty():
    assert common.extract_answer("") == "" and common.extract_answer("  \n \n") == ""
