"""The verifiers are pure functions from model output to a reward in {0, 1}: they never raise on what a policy
writes and never run unbounded; common.Verifier bounds a whole batch's time with a deadline."""
import random
import time

import pytest

import common
from common import Example, Verifier, verify_arithmetic, verify_countdown, verify_math

COUNTDOWN = Example("countdown", "Q:3,4,5->23 A:", "q", "3,4,5->23")
ARITHMETIC = Example("arithmetic", "Q:12+11=? A:", "q", "23")
MATH = Example("math", "p", "q", "72")


# ---- the two crashes found by trying adversarial completions (named regressions) ----
def test_countdown_5000_minus_signs_then_an_expression_scores_0_not_recursion_error():
    """Regression: passed the character whitelist and made eval's compiler raise RecursionError; the run died."""
    assert verify_countdown("-" * 5000 + "3+4*5", COUNTDOWN.gold) == 0.0
    assert verify_countdown("3+4*5", COUNTDOWN.gold) == 1.0


def test_arithmetic_5000_digits_scores_0_not_value_error():
    """Regression: int() refuses strings of more than 4,300 digits (ValueError); the run died."""
    assert verify_arithmetic("9" * 5000, "23") == 0.0
    assert verify_arithmetic("1" + "0" * 5000, "23") == 0.0
    assert verify_countdown("3+4*5+" + "1" * 5000, COUNTDOWN.gold) == 0.0  # the same int() in countdown's check


def test_arithmetic_reads_the_integer_as_before():
    assert [verify_arithmetic(c, "1234") for c in ("1234", "1,234", "\\boxed{1234}", "001234", "-1234", "1234.0")] == [
        1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert verify_arithmetic("\u0661\u0662\u0663\u0664", "1234") == 0.0  # Arabic-Indic digits: not an answer here
    assert verify_arithmetic("0" * 6000 + "7", "7") == 1.0  # long, but equal: compared as text, no int()


def test_countdown_needs_each_given_number_exactly_once():
    """A multiset: a number used twice, one left out, or one not given scores 0 even when the value is right."""
    gold = "3,4,5->23"
    assert verify_countdown("5*4+3", gold) == 1.0
    assert verify_countdown("4*5+3+0", gold) == 0.0  # an extra number
    assert verify_countdown("3*3+4+5+5", gold) == 0.0  # 3 and 5 twice (value 23)
    assert verify_countdown("4*5+3*1", gold) == 0.0  # 1 is not given
    assert verify_countdown("03+4*5", gold) == 0.0  # '03' is not 3 (and not valid Python)


# ---- a seeded fuzzer over every task family ----
def fuzz_cases(alphabet: str, n: int, seed: int) -> list:
    """Random strings from the task's alphabet, long repetitions, deep nesting, unbalanced \\boxed{, huge numbers,
    control characters, and mixtures of them."""
    rng = random.Random(seed)
    unit = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))  # noqa: E731
    makers = [
        lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))),
        lambda: unit() * rng.randint(100, 3000),
        lambda: "(" * (d := rng.randint(10, 3000)) + unit() + ")" * rng.choice([d, d - 1, 0]),
        lambda: "\\boxed{" * rng.randint(1, 500) + unit() + "}" * rng.randint(0, 3),
        lambda: "\\boxed{" + str(rng.randint(1, 9)) * rng.randint(4000, 9000) + "}",
        lambda: "".join(chr(rng.randint(0, 31)) for _ in range(rng.randint(1, 200))) + unit(),
        lambda: "\n".join(unit() for _ in range(rng.randint(1, 50))) + "\x00" + unit(),
        lambda: "-" * rng.randint(1000, 6000) + unit(),
        lambda: "".join(rng.choice(["{", "}", "\\boxed{", "\\frac{", "^{", "("]) for _ in range(rng.randint(1, 2000))),
    ]
    return [rng.choice(makers)() for _ in range(n)]


@pytest.mark.parametrize("example,alphabet", [(COUNTDOWN, "0123456789+-*() "), (ARITHMETIC, "0123456789,-")])
def test_fuzz_builtin_verifiers_never_raise_and_return_0_or_1(example, alphabet):
    for seed in range(3):
        for text in fuzz_cases(alphabet, 700, seed):
            assert common.score(example, text) in (0.0, 1.0), repr(text[:80])


def test_fuzz_math_verifier_never_raises_under_a_deadline():
    """math-verify on fuzzed LaTeX through worker processes: no completion makes it raise (verify/failed = 0); the
    slow ones may time out, and are counted. Short texts only: each long one can take its 5 s parse limit."""
    rng = random.Random(0)
    alphabet = ["\\boxed{", "}", "{", "\\frac{", "^", "_", "\\sqrt{", "(", ")", "[", "]", "1", "7", "2", "x", "=",
                "-", "+", "\\pi", "\\infty", ",", ".", "\\left(", "\\right)", "\\cdot", "%", "$", "\\text{", " "]
    texts = ["\\boxed{" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(150)]
    texts += fuzz_cases("0123456789{}^\\", 10, 1)[:10]
    v = Verifier(workers=2, timeout=60)
    try:
        rewards = v([MATH] * len(texts), texts)
    finally:
        v.close()
    assert set(rewards) <= {0.0, 1.0}
    assert v.last["verify/failed"] == 0.0


# ---- the deadline ----
SLOW = "\\boxed{9^{9^{9^{9}}}}"  # math-verify spends its 5 s parse limit (and more) on it


def test_a_slow_completion_cannot_stall_the_batch_past_the_deadline():
    """Two completions math-verify needs > 5 s each for, after four ordinary ones, on 2 workers with a 1.5 s
    deadline: the call returns near the deadline (not after 5 s), the four are scored right, the two count as
    timed out and score 0; the next call starts fresh workers and works."""
    good = ["so \\boxed{72}", "\\boxed{71}", "\\boxed{72.0}", "\\boxed{\\frac{144}{2}}"]
    v = Verifier(workers=2, timeout=1.5)
    try:
        v([MATH], ["\\boxed{1}"])  # starts the workers
        t = time.perf_counter()
        rewards = v([MATH] * 6, good + [SLOW, SLOW])
        took = time.perf_counter() - t
        assert rewards == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
        assert v.last == {"verify/timed_out": pytest.approx(2 / 6), "verify/failed": 0.0}
        assert took < 4.5, took  # without the deadline: > 5 s (both slow ones run their full parse limit)
        assert v([MATH] * 2, good[:2]) == [1.0, 0.0] and v.last["verify/timed_out"] == 0.0
    finally:
        v.close()


def test_in_process_verifier_stops_at_the_deadline_between_completions():
    v = Verifier(workers=0, timeout=1e-9)
    assert v([COUNTDOWN] * 3, ["3+4*5"] * 3) == [0.0, 0.0, 0.0] and v.last["verify/timed_out"] == 1.0
    v = Verifier(workers=0, timeout=60)
    assert v([COUNTDOWN] * 3, ["3+4*5", "1", "5*4+3"]) == [1.0, 0.0, 1.0] and v.last["verify/timed_out"] == 0.0


@pytest.mark.parametrize("workers", [0, 1])
def test_a_verifier_that_raises_scores_0_and_is_counted(workers):
    """The last line of defence for a verifier added in a fork: here a malformed gold makes verify_countdown raise."""
    broken = Example("countdown", "p", "q", "3,4,5 is not a gold")
    v = Verifier(workers=workers, timeout=60)
    try:
        assert v([COUNTDOWN, broken, COUNTDOWN], ["3+4*5"] * 3) == [1.0, 0.0, 1.0]
        assert v.last == {"verify/timed_out": 0.0, "verify/failed": pytest.approx(1 / 3)}
    finally:
        v.close()


def test_trainer_logs_what_the_verifier_could_not_finish(tiny_cache, tmp_path):
    """The step's rewards come through the Verifier: with a deadline that has always passed, every completion
    counts as timed out (reward 0) in the step's and the evaluation's metrics."""
    import grpo

    grpo.main(grpo.Args(output_dir=str(tmp_path), max_steps=1, prompts_per_step=4, group_size=4, eval_every=1,
                        eval_prompts=4, eval_samples=2, log_examples_every=0, verify_workers=1, verify_timeout=1e-9))
    rec = common.load_metrics(tmp_path / "metrics.jsonl")[-1]
    assert rec["verify/timed_out"] == 1.0 and rec["reward/mean"] == 0.0 and rec["verify/failed"] == 0.0
    assert rec["eval/verify_timed_out"] == 1.0 and rec["eval/pass@1"] == 0.0


def test_a_math_answer_at_the_end_of_a_long_completion_counts():
    """The whole completion is read, however long: the last \\boxed{} decides, wherever it is."""
    long = "Let me think. " * 3000  # 42,000 characters
    assert verify_math(long + "So the answer is \\boxed{72}.", "72") == 1.0
    assert verify_math("\\boxed{72} " + long + "\\boxed{71}", "72") == 0.0
    assert verify_math("\\boxed{71} " + long + "\\boxed{\\frac{144}{2}}", "72") == 1.0
    assert verify_countdown(long + "\n" + "5*4+3", COUNTDOWN.gold) == 1.0
    assert verify_arithmetic(long + "\\boxed{23}", "23") == 1.0


def test_no_completions_give_no_rewards_and_lengths_must_match(tok):
    """Regression: transformers 5 decodes an empty batch to [''], which made the DPH-RL split ask the verifier for one
    reward too many (StopIteration) when a chunk had no D_pef prompt."""
    assert common.decode(tok, []) == []
    assert Verifier()([], []) == []
    with pytest.raises(ValueError, match="1 examples for 2 completions"):
        Verifier()([COUNTDOWN], ["1", "2"])


def test_countdown_expression_length_limit_is_200_characters():
    """At most 200 characters are evaluated (the guard against the compiler's recursion limit): a correct expression
    of exactly 200 scores 1, one of 201 scores 0."""
    wrap = lambda e: "(" * 98 + e + ")" * 98  # noqa: E731
    assert len(wrap("10+2")) == 200 and verify_countdown(f"\\boxed{{{wrap('10+2')}}}", "10,2->12") == 1.0
    assert len(wrap("10--2")) == 201 and verify_countdown(f"\\boxed{{{wrap('10--2')}}}", "10,2->12") == 0.0
    assert verify_countdown("\\boxed{10--2}", "10,2->12") == 1.0  # the same expression, short: accepted


def test_countdown_rejects_names_and_broken_syntax_that_use_the_right_numbers():
    """Only digits, + - * and parentheses reach eval: a short expression with a name in it scores 0 (it must not
    raise NameError); one that does not parse scores 0."""
    for expr in ("x+10+2", "(10+2", "10+2)", "10+*2"):
        assert verify_countdown(f"\\boxed{{{expr}}}", "10,2->12") == 0.0, expr


def test_math_verifier_time_limits_only_on_the_main_thread(monkeypatch):
    """math-verify's limits use SIGALRM, which works only on the main thread: there each call gets the timeout (5 s
    by default); on another thread none (a SIGALRM limit would raise there)."""
    import threading

    import math_verify

    calls = []
    monkeypatch.setattr(math_verify, "parse", lambda s, **kw: (calls.append(("parse", kw)), [s])[1])
    monkeypatch.setattr(math_verify, "verify", lambda g, p, **kw: (calls.append(("verify", kw)), True)[1])
    assert verify_math("\\boxed{0.5}", "1/2") == 1.0
    assert calls == [("parse", {"parsing_timeout": 5}), ("parse", {"parsing_timeout": 5}),
                     ("verify", {"timeout_seconds": 5})]
    calls.clear()
    t = threading.Thread(target=verify_math, args=("\\boxed{0.5}", "1/2", 7))
    t.start()
    t.join()
    assert calls == [("parse", {"parsing_timeout": None}), ("parse", {"parsing_timeout": None}),
                     ("verify", {"timeout_seconds": None})]
