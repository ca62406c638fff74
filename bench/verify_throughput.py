"""Real data through the real verifier: GSM8K and MATH-500 from ../shared/data (common.shared_data_dir()).

python bench/verify_throughput.py                 # GSM8K test (1319) + MATH-500 (500) + pathological strings
python bench/verify_throughput.py --gsm8k_train   # also the GSM8K train split (7473 rows)

(a) gold vs itself, every row must score 1.0:
      score(ex, ex.solution) and score(ex, "\\boxed{gold}") -- the real reward. Both usually end at verify_math's
      exact-match shortcut (extract_answer(completion) == gold), so the same pairs are also run through the
      math-verify part of verify_math alone (same parse/verify calls and timeouts, shortcut skipped), "mv only".
(b) wrong answers, every row must score 0.0 (these never hit the shortcut, so they always reach math-verify):
      "The answer is \\boxed{W}." with W = gold + 1 for a numeric gold, else the gold of the next row whose answer
      differs after light normalisation; the worked solution with its last \\boxed{} content replaced by W; and
      the literal "\\boxed{wrong}".
(c) pathological completions (deep braces, 9^9^9^9, 10k-digit numbers, unbalanced \\frac, ...) scored against the
      gold "1", each in a forked child (so math-verify's SIGALRM timeouts work: main thread) under an address-space
      limit (--mem_limit_gb, default 4) and a hard wall-clock kill (--hard_limit, default 60 s). verify_math gives
      each of its three stages (parse gold, parse completion, verify) timeout=5 s: over 5 s means an alarm fired;
      over 3 x 5 s + 1 is a failure.
Failures are listed (first 10 per probe); the data is reported as is, never corrected.
"""
import argparse
import multiprocessing as mp
import re
import resource
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

NUM = re.compile(r"-?\d+(\.\d+)?")
STAGE_TIMEOUT = 5  # verify_math's default timeout, per stage


def mv_only(completion: str, gold: str, timeout: int = STAGE_TIMEOUT) -> float:
    """verify_math without its exact-match shortcut: the same math-verify calls, main thread, same timeouts."""
    from math_verify import parse, verify

    gold_p = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_p = parse(completion[-2000:], parsing_timeout=timeout)
    return float(bool(gold_p) and bool(pred_p) and verify(gold_p, pred_p, timeout_seconds=timeout))


def norm(s: str) -> str:
    s = re.sub(r"\\left|\\right|\\!|\\,|\\ |\s|\$", "", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")


def wrong_value(rows: list, i: int) -> str:
    gold = rows[i].gold
    if NUM.fullmatch(gold):
        return str(Decimal(gold) + 1)
    for k in range(1, len(rows)):
        other = rows[(i + k) % len(rows)].gold
        if norm(other) != norm(gold):
            return other
    return "wrong"


def replace_last_box(solution: str, value: str) -> str:
    start = solution.rfind("\\boxed{")
    if start < 0:
        return f"{solution}\n\\boxed{{{value}}}"
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[:i] + value + solution[j:]
    return f"{solution}\n\\boxed{{{value}}}"


def run_probe(rows, make, fn, expect):
    """fn(ex, completion) over every row -> (seconds, failures [(row, gold, completion tail, got)])."""
    fails, t0 = [], time.perf_counter()
    for i, ex in enumerate(rows):
        c = make(rows, i)
        try:
            got = fn(ex, c)
        except Exception as e:  # noqa: BLE001 -- a crash is a failure to report, not to stop on
            got = f"{type(e).__name__}: {e}"[:80]
        if got != expect:
            fails.append((i, ex.gold, c[-60:], got))
    return time.perf_counter() - t0, fails


PROBES = [  # (name, expected, completion builder, scorer)
    ("score(solution)", 1.0, lambda r, i: r[i].solution, common.score),
    ("score(\\boxed{gold})", 1.0, lambda r, i: f"\\boxed{{{r[i].gold}}}", common.score),
    ("mv only: solution", 1.0, lambda r, i: r[i].solution, lambda ex, c: mv_only(c, ex.gold)),
    ("mv only: \\boxed{gold}", 1.0, lambda r, i: f"\\boxed{{{r[i].gold}}}", lambda ex, c: mv_only(c, ex.gold)),
    ("wrong: \\boxed{W}", 0.0, lambda r, i: f"The answer is \\boxed{{{wrong_value(r, i)}}}.", common.score),
    ("wrong: solution, box -> W", 0.0, lambda r, i: replace_last_box(r[i].solution, wrong_value(r, i)), common.score),
    ("wrong: \\boxed{wrong}", 0.0, lambda r, i: "\\boxed{wrong}", common.score),
]


def pathological() -> list:
    d = 10_000
    return [
        ("nested braces x10000", "\\boxed{" + "{" * d + "1" + "}" * d + "}"),
        ("nested braces x500", "\\boxed{" + "{" * 500 + "1" + "}" * 500 + "}"),
        ("nested parens x5000", "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}"),
        ("9^9^9^9", "\\boxed{9^9^9^9}"),
        ("9^{9^{9^{9}}}", "\\boxed{9^{9^{9^{9}}}}"),
        ("9^{9^{9}}", "\\boxed{9^{9^{9}}}"),
        ("10^{10^{10}} - 10^{10^{10}} + 1", "\\boxed{10^{10^{10}} - 10^{10^{10}} + 1}"),
        ("(10^{100})!", "\\boxed{(10^{100})!}"),
        ("100000!", "\\boxed{100000!}"),
        ("1e999999999", "\\boxed{1e999999999}"),
        ("10k-digit integer", "\\boxed{" + "9" * 10_000 + "}"),
        ("10k-digit plain text", "9" * 10_000),
        ("unbalanced \\frac{1}{", "\\boxed{\\frac{1}{"),
        ("\\frac{ x 1000 unclosed", "\\boxed{" + "\\frac{" * 1000 + "1}"),
        ("nested \\frac depth 200", "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}"),
        ("nested \\sqrt depth 300", "\\boxed{" + "\\sqrt{" * 300 + "2" + "}" * 300 + "}"),
        ("x+x+... 5000 terms", "\\boxed{" + "+".join(["x"] * 5000) + "}"),
        ("(x+1)^{1000} expand", "\\boxed{(x+1)^{1000} - (x+1)^{1000} + 1}"),
        ("200x200 matrix", "\\boxed{\\begin{pmatrix}" + "\\\\".join(["&".join(["1"] * 200)] * 200) + "\\end{pmatrix}}"),
        ("$ x 10000", "$" * 10_000),
        ("\\boxed{ x 5000 unclosed", "\\boxed{" * 5000),
        ("1/0 and 0^0 and oo-oo", "\\boxed{\\frac{1}{0} + 0^0 + \\infty - \\infty}"),
        ("long text 100k chars", "The answer is 1. " * 6000),
        ("unicode junk", "\\boxed{\u202e\u0000\ufffd\U0001F600 1}"),
    ]


def _child(completion, conn, mem_gb):
    resource.setrlimit(resource.RLIMIT_AS, (int(mem_gb * 2**30),) * 2)
    t = time.perf_counter()
    try:
        r = common.score(common.Example("math", "", "", "1"), completion)
    except BaseException as e:  # noqa: BLE001
        r = f"{type(e).__name__}: {str(e)[:60]}"
    conn.send((time.perf_counter() - t, r))


def run_pathological(hard_limit: float, mem_gb: float) -> list:
    ctx, out = mp.get_context("fork"), []
    for name, s in pathological():
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(s, b, mem_gb))
        t = time.perf_counter()
        p.start()
        p.join(hard_limit)
        wall = time.perf_counter() - t
        if p.is_alive():
            p.kill()
            p.join()
            out.append((name, len(s), wall, f"KILLED after {hard_limit:.0f} s", "FAIL (hung)"))
        elif a.poll():
            secs, r = a.recv()
            status = ("ok" if secs <= STAGE_TIMEOUT else
                      "ok (hit a 5 s stage alarm)" if secs <= 3 * STAGE_TIMEOUT + 1 else "FAIL (> 16 s)")
            out.append((name, len(s), secs, r, status))
        else:
            out.append((name, len(s), wall, f"child died (exit {p.exitcode})", "FAIL (crash)"))
        print(f"  {name}: {out[-1][2:]}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gsm8k_train", action="store_true", help="also the 7473-row GSM8K train split")
    ap.add_argument("--hard_limit", type=float, default=60.0, help="kill a pathological case after this many s")
    ap.add_argument("--mem_limit_gb", type=float, default=4.0, help="address-space limit of a pathological child")
    ap.add_argument("--skip_pathological", action="store_true")
    a = ap.parse_args()
    d = common.shared_data_dir()
    files = [("gsm8k test", "gsm8k_test.jsonl"), ("math500", "math500_test.jsonl")]
    if a.gsm8k_train:
        files.insert(1, ("gsm8k train", "gsm8k_train.jsonl"))
    if not all((d / f).is_file() for _, f in files):
        print(f"skipped: data files not found in {d} (set RLVR_DATA or place them in ../shared/data)")
        return
    import math_verify  # noqa: F401 -- import cost out of the timings

    common.score(common.Example("math", "", "", "\\frac{1}{2}"), "\\boxed{0.5}")  # warm-up (sympy/latex caches)
    summary, listing = [], []
    for label, f in files:
        rows = common.read_jsonl(d / f)
        print(f"{label}: {len(rows)} rows", flush=True)
        for name, expect, make, fn in PROBES:
            secs, fails = run_probe(rows, make, fn, expect)
            summary.append((label, name, len(rows), expect, len(fails), len(rows) / secs))
            print(f"  {name}: {len(fails)} failures, {len(rows) / secs:.0f} rows/s", flush=True)
            for i, gold, tail, got in fails[:10]:
                listing.append(f"- {label} / {name}: row {i}, gold `{gold}`, completion ...`{tail!r}` -> {got}")
            if len(fails) > 10:
                listing.append(f"- {label} / {name}: ... and {len(fails) - 10} more")

    path = [] if a.skip_pathological else run_pathological(a.hard_limit, a.mem_limit_gb)
    if listing:
        print("\nFailures (first 10 per probe):")
        print("\n".join(listing))
    if path:
        print("\n| pathological completion (gold 1) | chars | seconds | reward / outcome | status |\n"
              "| --- | --- | --- | --- | --- |")
        for name, n, secs, r, status in path:
            print(f"| {name} | {n} | {secs:.2f} | {r} | {status} |")
    print("\n| data | probe | rows | must score | failures | rows / s |\n| --- | --- | --- | --- | --- | --- |")
    for label, name, n, expect, nf, rps in summary:
        print(f"| {label} | {name} | {n} | {expect:.1f} | {nf} | {rps:.0f} |")
    if path:
        worst = max(path, key=lambda r: r[2])
        bad = sum(not r[4].startswith("ok") for r in path)
        slow = sum(r[4] != "ok" for r in path) - bad
        print(f"| pathological | finish within 3 x {STAGE_TIMEOUT} s; max {worst[2]:.2f} s ({worst[0]}); {slow} hit "
              f"a {STAGE_TIMEOUT} s alarm | {len(path)} | finish | {bad} | {len(path) / sum(r[2] for r in path):.1f} |")


if __name__ == "__main__":
    main()
