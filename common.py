"""Shared plumbing for the single-file RLVR trainers: loading, tasks, verification, sampling, log-probs.

Every method file (grpo.py, dph_rl.py, ...) imports from here and nothing else of ours. Everything here is a
plain function or a small class with no module-level state, and no function edits a caller's tensors.

Shape legend used in every file:
  P = prompts per step, G = group size (samples per prompt), B = P * G sequences,
  Tp = prompt tokens (left-padded), T = response tokens (right-padded), V = vocabulary, H = hidden size.
"""
import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------------
# Tasks: a built-in generator per family, and JSONL / hub data for math
# ---------------------------------------------------------------------------------------------------------------
MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Example:
    kind: str  # "countdown" | "arithmetic" | "sum" | "math": picks the verifier
    prompt: str  # plain-text prompt, used when the tokenizer has no chat template (the tiny model)
    question: str  # natural-language question, used inside a chat template
    gold: str  # countdown "7,1,5->3"; arithmetic "82"; sum "18"; math the final answer
    solution: str = ""  # a worked solution rendered as a response the verifier accepts ("" if none)


def make_countdown(n: int, seed: int, n_numbers: int = 3) -> list:
    """Countdown: use each digit exactly once with + - * to hit the target (evaluated with Python precedence)."""
    rng, out, seen = np.random.default_rng(seed), [], set()
    for _ in range(100 * n):
        if len(out) == n:
            break
        nums = [int(x) for x in rng.integers(1, 10, size=n_numbers)]
        order = rng.permutation(n_numbers)
        expr = str(nums[order[0]]) + "".join(rng.choice(["+", "-", "*"]) + str(nums[i]) for i in order[1:])
        target = eval(expr)  # noqa: S307 -- digits and + - * only, built right here
        key = (tuple(nums), target)
        if not 1 <= target <= 99 or key in seen:
            continue
        seen.add(key)
        listed = ",".join(map(str, nums))
        question = (f"Using the numbers {', '.join(map(str, nums))}, each exactly once, and the operations + - *, "
                    f"write an expression that equals {target}. Put the expression within \\boxed{{}}.")
        out.append(Example("countdown", f"Q:{listed}->{target} A:", question, f"{listed}->{target}", expr))
    if len(out) < n:
        raise ValueError(f"countdown with {n_numbers} numbers has fewer than {n} distinct prompts: use more numbers")
    return out


def make_arithmetic(n: int, seed: int, digits: int = 2) -> list:
    """Addition of two `digits`-digit numbers; one correct answer per prompt."""
    rng, lo, hi = np.random.default_rng(seed), 10 ** (digits - 1), 10**digits
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(lo, hi, size=2))
        q = f"What is {a}+{b}? Put the answer within \\boxed{{}}."
        out.append(Example("arithmetic", f"Q:{a}+{b}=? A:", q, str(a + b), str(a + b)))
    return out


def make_sum(n: int, seed: int, max_terms: int = 10) -> list:
    """Sum 1 to `max_terms` digits (the count drawn uniformly), answered with the running sums: "Q:3,5,2,8 A:" ->
    "8,10,18", the last one the answer. The worked answer grows with the input: 1 to ~25 tokens (with EOS 2 to ~26),
    a length spread of over 10x, as ΔL (arXiv 2509.07558) is about. Distinct prompts; the few with 1-2 terms
    (9 and 81 exist) are all used early, so the share of longer ones grows with n."""
    rng, out, seen = np.random.default_rng(seed), [], set()
    for _ in range(100 * n):
        if len(out) == n:
            break
        digits = [int(x) for x in rng.integers(1, 10, size=int(rng.integers(1, max_terms + 1)))]
        if tuple(digits) in seen:
            continue
        seen.add(tuple(digits))
        running = ",".join(str(x) for x in np.cumsum(digits))
        listed, total = ",".join(map(str, digits)), str(sum(digits))
        question = (f"Add up the digits {', '.join(map(str, digits))}, writing each running total, and put the "
                    f"final total within \\boxed{{}}.")
        out.append(Example("sum", f"Q:{listed} A:", question, total, running))
    if len(out) < n:
        raise ValueError(f"sum with up to {max_terms} terms has fewer than {n} distinct prompts: allow more terms")
    return out


# family -> (generator, default level, default response cap in tokens, warm-start steps of its tiny model)
BUILTIN_TASKS = {"countdown": (make_countdown, 3, 12, 500), "arithmetic": (make_arithmetic, 2, 12, 500),
                 "sum": (make_sum, 10, 32, 1000)}  # sum: 1,000 steps leave ~1/3 solved (bench/claims.py delta_l)


def parse_task_name(task: str):
    """'countdown' -> ('countdown', 3); 'countdown:4' -> ('countdown', 4). Non-built-in names -> (task, None)."""
    family, _, level = task.partition(":")
    if family not in BUILTIN_TASKS:
        return task, None
    return family, int(level) if level else BUILTIN_TASKS[family][1]


def default_max_new_tokens(task: str) -> int:
    """The response cap when --max_new_tokens is 0: the built-in family's (room for its longest answer), else 512."""
    family, level = parse_task_name(task)
    return 512 if level is None else BUILTIN_TASKS[family][2]


def _gsm8k_row(row: dict) -> tuple:
    body, _, final = row["answer"].rpartition("####")
    gold = final.strip().replace(",", "")
    body = re.sub(r"<<[^>]*>>", "", body).strip()  # drop GSM8K's calculator annotations
    return gold, f"{body}\nThe answer is \\boxed{{{gold}}}."


def read_jsonl(path) -> list:
    """GSM8K-style (question, answer '... #### N') or MATH-style (problem, solution, answer) rows -> Examples."""
    path, out = Path(path), []
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        question = row.get("question") or row.get("problem") if isinstance(row, dict) else None
        if not question or not isinstance(row.get("answer"), str) or not row["answer"].strip():
            raise ValueError(f"{path}:{i}: a row needs a 'question' (or 'problem') and a non-empty 'answer'")
        if "####" in row["answer"]:
            gold, solution = _gsm8k_row(row)
        else:
            gold, solution = row["answer"].strip(), row.get("solution", "")
        out.append(Example("math", question + MATH_INSTRUCTION, question + MATH_INSTRUCTION, gold, solution))
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def shared_data_dir() -> Path:
    return Path(os.environ.get("RLVR_DATA", Path(__file__).resolve().parent.parent / "shared" / "data"))


def _from_hub(name: str, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"task {name!r}: no local file in {shared_data_dir()} and `datasets` is not "
                                "installed (pip install datasets, or pass a .jsonl path)") from None
    hub = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}[name]
    rows = datasets.load_dataset(hub[0], hub[1], split=split)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"rlvr_{name}_{split}.jsonl"
    tmp.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows))
    return read_jsonl(tmp)


def load_task(task: str, n_train: int = None, n_test: int = 500, seed: int = 0):
    """Returns (train, test) lists of Example. Built-ins are generated from `seed` (n_train = 5000 by default); test
    never overlaps train. Data files keep all their training rows unless n_train is given."""
    family, level = parse_task_name(task)
    if level is not None:
        make, n_train = BUILTIN_TASKS[family][0], n_train or 5000
        pool = make(n_train + 2 * n_test, seed + 1000 * level, level)
        pool = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]  # the generator emits rare prompts late
        test = pool[-n_test:]
        held = {e.prompt for e in test}
        return [e for e in pool[:-n_test] if e.prompt not in held][:n_train], test
    if task.endswith(".jsonl"):  # one file: the last n_test rows (at most 10%) are held out
        rows = read_jsonl(task)
        k = min(n_test, max(1, len(rows) // 10))
        return rows[:-k], rows[-k:]
    files = {"gsm8k": ("gsm8k_train.jsonl", "gsm8k_test.jsonl"), "math500": (None, "math500_test.jsonl")}
    if task not in files:
        raise ValueError(f"unknown task {task!r}: use countdown[:n], arithmetic[:digits], sum[:terms], gsm8k, math500 "
                         "or a .jsonl path")
    train_f, test_f = (shared_data_dir() / f if f else None for f in files[task])
    if test_f.is_file():
        test = read_jsonl(test_f)
        train = read_jsonl(train_f) if train_f else None
    else:
        test = _from_hub(task, "test")
        train = _from_hub(task, "train") if train_f else None
    if train is None:  # MATH-500 has one split: hold out its last ceil(n_test / 5) problems
        train, test = test[: -n_test // 5], test[-n_test // 5:]
    return train[:n_train], test[:n_test]


# ---------------------------------------------------------------------------------------------------------------
# Verification: reward 1.0 when correct, else 0.0
# ---------------------------------------------------------------------------------------------------------------
def last_boxed(completion: str):
    """Content of the last complete \\boxed{...} (braces balanced), or None."""
    start = completion.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(completion)):
        depth += {"{": 1, "}": -1}.get(completion[j], 0)
        if depth == 0:
            return completion[i:j].strip()
    return None


def extract_answer(completion: str) -> str:
    """Content of the last \\boxed{...} if there is one, else the last non-empty line (the tiny model's format)."""
    box = last_boxed(completion)
    if box is not None:
        return box
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def verify_countdown(completion: str, gold: str) -> float:
    listed, target = gold.split("->")
    expr = extract_answer(completion).replace(" ", "")
    if len(expr) > 200 or not re.fullmatch(r"[0-9+\-*()]+", expr) or "**" in expr:  # long: 5,000 '-' signs overflow
        return 0.0  # the compiler's recursion limit; '**' could ask eval for 9**9**9
    if sorted(re.findall(r"\d+", expr)) != sorted(listed.split(",")):  # each given number exactly once (as text:
        return 0.0  # int() of a 5,000-digit string raises; '03' is not 3 and eval would refuse it anyway)
    try:
        value = eval(expr, {"__builtins__": {}})  # noqa: S307 -- whitelisted characters, at most 200 of them
    except (SyntaxError, TypeError, ZeroDivisionError, RecursionError, MemoryError, ValueError, OverflowError):
        return 0.0
    return float(value == int(target))


def verify_sum(completion: str, gold: str) -> float:
    """The last comma-separated number (the final running total) against the gold total. The running totals before
    it are not checked: the reward is on the outcome only, as in RLVR."""
    return verify_arithmetic(extract_answer(completion).rpartition(",")[2], gold)


def verify_arithmetic(completion: str, gold: str) -> float:
    """The integer after removing ',' separators and leading zeros, compared as digits: int() refuses strings of
    more than 4,300 digits, and [0-9] keeps out the other scripts' digits that \\d and int() would accept."""
    m = re.fullmatch(r"(-?)0*([0-9]+)", extract_answer(completion).replace(",", ""))
    return float(m is not None and m[1] + m[2] == gold)


def verify_math(completion: str, gold: str, timeout: int = 5) -> float:
    """1.0 when the content of the last \\boxed{} equals the gold answer, judged by math-verify (equal numbers,
    fractions, expressions, sets...). No \\boxed{} scores 0: the prompt asks for one, and only what is inside it
    is parsed, so an answer elsewhere in the text ("I think 72 apples") never counts. math-verify's time limits use
    SIGALRM, which works only on the main thread (elsewhere they are off), so call this from the main thread."""
    from math_verify import parse, verify

    box = last_boxed(completion)
    if box is None:
        return 0.0
    if box == gold:
        return 1.0
    t = timeout if threading.current_thread() is threading.main_thread() else None
    gold_p = parse(f"\\boxed{{{gold}}}", parsing_timeout=t)
    pred_p = parse(f"\\boxed{{{box}}}", parsing_timeout=t)
    return float(bool(gold_p) and bool(pred_p) and verify(gold_p, pred_p, timeout_seconds=t))


def score(example: Example, completion: str) -> float:
    """The verifiable reward of one completion (text without special tokens)."""
    if example.kind == "countdown":
        return verify_countdown(completion, example.gold)
    if example.kind == "arithmetic":
        return verify_arithmetic(completion, example.gold)
    if example.kind == "sum":
        return verify_sum(completion, example.gold)
    return verify_math(completion, example.gold)


def _score_safely(item) -> tuple:
    """(index, reward, failed). The verifiers are fuzzed never to raise on model output (tests/test_verify.py);
    this keeps a verifier added in a fork from ending the run: it scores 0 and is counted in verify/failed."""
    i, example, completion = item
    try:
        return i, score(example, completion), False
    except Exception:  # noqa: BLE001
        return i, 0.0, True


def _start_worker():
    """A verifier worker ignores Ctrl-C (the trainer finishes its step, then closes the workers) and imports
    math-verify before its first task, so that its start-up never eats into a deadline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(ImportError):
        import math_verify  # noqa: F401


def _ready(_):
    return True


class Verifier:
    """Rewards for a batch of completions, never later than a deadline: `timeout` seconds for up to 1,024
    completions, timeout * n / 1,024 for more (evaluation, the DPH-RL split). What is not verified by
    then scores 0 and is counted in `last` ("verify/timed_out": the share of the call's completions).

    workers > 0: scored in that many worker processes, one completion per task, so a slow one holds up only
    itself; at the deadline the workers are killed (the next call starts new ones). This is what bounds math-verify:
    its own 5 s limit per parse is a SIGALRM, which neither stops 256 slow completions from stalling a step for
    20 minutes nor interrupts a big-integer power running in C.
    workers = 0: scored here, checking the deadline between completions; enough for the built-in tasks, whose
    verifiers are a few regular expressions on at most a few hundred characters."""

    def __init__(self, workers: int = 0, timeout: float = 60.0):
        self.workers, self.timeout, self.pool = workers, timeout, None
        self.last = {"verify/timed_out": 0.0, "verify/failed": 0.0}

    def __call__(self, examples: list, completions: list) -> list:
        n = len(completions)
        if len(examples) != n:
            raise ValueError(f"{len(examples)} examples for {n} completions")
        items = list(zip(range(n), examples, completions))
        rewards, done, failed = [0.0] * n, 0, 0
        if self.workers > 0 and self.pool is None:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(self.workers, initializer=_start_worker)
            self.pool.map(_ready, range(self.workers), chunksize=1)  # waits until the workers have started
        budget = self.timeout * max(1.0, n / 1024)
        deadline = time.monotonic() + budget
        if self.workers == 0:
            results = map(_score_safely, items)
        else:
            results = self.pool.imap_unordered(_score_safely, items)
        try:
            while done < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise multiprocessing.TimeoutError
                i, rewards[i], bad = next(results) if self.workers == 0 else results.next(timeout=left)
                done, failed = done + 1, failed + bad
        except multiprocessing.TimeoutError:
            self.close()  # kills the workers still busy; the next call starts fresh ones
        self.last = {"verify/timed_out": (n - done) / max(n, 1), "verify/failed": failed / max(n, 1)}
        if done < n or failed:
            print(f"warning: of {n} completions, {n - done} were not verified within the {budget:.0f} s deadline "
                  f"and {failed} made the verifier raise; they score 0 (metrics verify/timed_out, verify/failed)")
        return rewards

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# ---------------------------------------------------------------------------------------------------------------
# The embedded tiny default: a character tokenizer + a 0.5M-parameter Llama, warm-started by a short SFT
# ---------------------------------------------------------------------------------------------------------------
TINY_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TINY_CHARS = list("0123456789+-*/()=:.,?> QA")


def tiny_tokenizer():
    """One token per character. A Llama-type model so AutoTokenizer reloads it unchanged (Qwen2 drops spaces)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + TINY_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def tiny_model(vocab_size: int, hidden: int = 128, layers: int = 2, seed: int = 0):
    """head_dim = hidden / 4 = 32: vLLM's CPU attention accepts 32 and 64, not 16."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=4 * hidden, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def sft_batch(tok, examples: list, device="cpu"):
    """Prompt + solution + eos, left-padded; labels are -100 except on the solution and eos."""
    ids, labels = [], []
    for e in examples:
        p = tok(e.prompt)["input_ids"]
        s = tok(e.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + s)
        labels.append([-100] * len(p) + s)
    n = max(map(len, ids))
    pad = [[tok.pad_token_id] * (n - len(x)) for x in ids]
    input_ids = torch.tensor([p + x for p, x in zip(pad, ids)], device=device)
    label_t = torch.tensor([[-100] * len(p) + y for p, y in zip(pad, labels)], device=device)
    return input_ids, (input_ids != tok.pad_token_id).long(), label_t


def warm_start(model, tok, examples: list, steps: int = 300, lr: float = 2e-3, batch: int = 64, seed: int = 0):
    """Supervised warm start: AdamW (0.9, 0.98), 20 warm-up steps, grad clip 1.0 (our choice for the tiny model)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        idx = rng.integers(0, len(examples), size=batch)
        input_ids, attn, labels = sft_batch(tok, [examples[i] for i in idx])
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return model


def cache_root() -> Path:
    """Where built models and one-off computations are cached: $RLVR_CACHE, else ~/.cache/rlvr-tiny."""
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr-tiny"))


def tiny_cache_dir(family: str) -> Path:
    return cache_root() / f"tiny-{family}-v1"


def build_tiny(family: str, out_dir=None, sft_steps: int = 0, seed: int = 0) -> Path:
    """Build the embedded default for a built-in task family (~20 s on 2 cores; sum ~2.5 min) and save it in HF
    format. It is warm-started on the family's default level (countdown:3, arithmetic:2, sum:10) so a harder level
    exists that it cannot solve at the start (sum: long answers it mostly gets wrong). Deterministic for a fixed seed
    on a given machine. sft_steps: 0 = the family's (BUILTIN_TASKS)."""
    out_dir = Path(out_dir or tiny_cache_dir(family))
    tok = tiny_tokenizer()
    train, _ = load_task(family, seed=seed)
    steps = sft_steps or BUILTIN_TASKS[family][3]
    model = warm_start(tiny_model(len(tok), seed=seed), tok, train, steps=steps, seed=seed)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out_dir.exists():  # another process built it meanwhile: keep theirs
        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def resolve_model_path(model: str, task: str) -> str:
    """'tiny' -> the cached embedded default for this task family (built on first use); anything else unchanged."""
    if model != "tiny":
        return model
    family, level = parse_task_name(task)
    if level is None:
        raise ValueError(f"the embedded tiny model only knows the built-in tasks ({', '.join(BUILTIN_TASKS)}), not "
                         f"{task!r}: pass --model with a Hugging Face id or a local folder")
    path = tiny_cache_dir(family)
    return str(path if path.exists() else build_tiny(family, path))


def pick_device(device: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype (autocast); weights and optimizer state are always float32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype must be auto, float32 or bfloat16, not {dtype!r} (float16 would need loss scaling)")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_model_and_tokenizer(path: str, device: torch.device):
    """A Hugging Face id or a local folder -> (model with float32 master weights in eval mode, tokenizer with left
    padding and a pad token, the dtype the weights were stored in, for saving the trained model the same way)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
        raise SystemExit(f"could not load model {path!r}: no such folder")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        stored = getattr(AutoConfig.from_pretrained(path), "dtype", None) or torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load model {path!r}: not a local folder with a model and tokenizer, and not "
                         f"a Hugging Face id that can be downloaded ({type(e).__name__}: {str(e)[:200]})") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return model.to(device).eval(), tok, stored


def encode_prompts(tok, examples: list) -> list:
    """Token ids of each prompt: the chat template when the tokenizer has one, the plain prompt otherwise."""
    if tok.chat_template:
        texts = [tok.apply_chat_template([{"role": "user", "content": e.question}], tokenize=False,
                                         add_generation_prompt=True) for e in examples]
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tok(e.prompt)["input_ids"] for e in examples]


def drop_long_prompts(tok, examples: list, max_prompt_len: int, name: str, need: int = 1) -> list:
    """Skip (with a warning) prompts longer than the context allows; an error if fewer than `need` are left."""
    keep = [e for e, ids in zip(examples, encode_prompts(tok, examples)) if len(ids) <= max_prompt_len]
    if len(keep) < len(examples):
        print(f"warning: skipped {len(examples) - len(keep)} of {len(examples)} {name} prompts longer than "
              f"{max_prompt_len} tokens")
    if len(keep) < need:
        raise SystemExit(f"only {len(keep)} {name} prompts fit in {max_prompt_len} tokens (of {len(examples)}), "
                         f"fewer than the {need} needed: use more data, fewer prompts per step, or a longer "
                         f"--max_prompt_len")
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Sampling: one interface (`generate`), two backends (a decode loop on the policy itself, vLLM in-process)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Samples:
    """Per sequence, in the order prompt 0 x n, prompt 1 x n, ... (lists, since lengths differ)."""
    prompt_ids: list  # [B][Tp_i]
    response_ids: list  # [B][T_i], up to and including the first stop token
    logp: list  # [B][T_i] behaviour log-prob of each sampled token (temperature applied)
    finish: list  # [B] "stop" (a stop token) | "length" (cut at max_new_tokens)
    topk_ids: list = None  # [B][T_i][K] behaviour top-K ids per position (when asked for)
    topk_logp: list = None  # [B][T_i][K] their log-probs


def stream_seeds(key, n: int) -> list:
    """n independent seeds from a key such as (seed, "rollout", step). Prompt i of a call samples from its own
    random stream, so no two prompts, calls or steps share noise, and a prompt's samples do not depend on the rank
    or batch it lands in: N ranks draw what one process would. Below 2**62, as vLLM adds the child index."""
    state = np.random.SeedSequence([zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key])
    state = state.generate_state(n, np.uint64)
    return [int(s >> np.uint64(2)) for s in state]


def stop_ids(tok, model) -> list:
    """Token ids that end a response: the tokenizer's EOS and every EOS of the model's generation_config.json
    (Qwen2.5-Instruct lists <|im_end|> and <|endoftext|>)."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    return sorted({tok.eos_token_id, *gen_eos} - {None})


def _cut_at_stop(ids: list, stop: set) -> tuple:
    for i, t in enumerate(ids):
        if t in stop:
            return ids[: i + 1], "stop"
    return ids, "length"


def sample_tokens(probs, u):
    """One token per row drawn from probs [b, V] by inverse CDF with the row's uniform u [b] in [0, 1)."""
    cdf = probs.cumsum(-1)  # [b, V]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous())  # [b, 1]: first index with cdf >= u
    return pick.squeeze(-1).clamp(max=probs.shape[-1] - 1)


class HFSampler:
    """A plain decode loop on the policy (its own forward and KV cache), not `generate()`: generate() fills every
    option the caller leaves unset from the model's generation_config.json (Qwen2.5-Instruct: repetition_penalty,
    top_p 0.8, top_k 20), so it samples from a reshaped distribution whose log-probs are not the policy's. Here
    each token is drawn from exactly softmax(logits / T) with the prompt's own random stream, and only the sampled
    token's log-prob (and the top-K when asked) is kept, so memory does not grow with the response length beyond
    the KV cache. `replica`: under FSDP, a full copy of the weights that push_weights refreshes (as vLLM keeps
    its own), so that decoding needs no collective per token."""

    name = "hf"

    def __init__(self, tok, stop: list, dtype=torch.float32, max_batch: int = 256, replica=None):
        self.tok, self.stop, self.dtype, self.max_batch, self.replica = tok, stop, dtype, max_batch, replica

    def push_weights(self, model):
        if self.replica is not None:  # FSDP: gather the shards into the replica, one tensor at a time
            own = self.replica.state_dict()
            for name, full in full_tensors(model):
                own[name].copy_(full)

    @torch.no_grad()
    def generate(self, model, prompt_ids: list, n: int, max_new_tokens: int, temperature: float = 1.0,
                 seeds: list = None, topk: int = 0) -> Samples:
        model = self.replica if self.replica is not None else model
        seeds = stream_seeds((0,), len(prompt_ids)) if seeds is None else seeds
        rows = [(p, s, j) for p, s in zip(prompt_ids, seeds) for j in range(n)]  # child j of a prompt: stream (s, j)
        out = Samples([], [], [], [], [] if topk else None, [] if topk else None)
        device = next(model.parameters()).device
        with autocast(device, self.dtype):
            for c in range(0, len(rows), self.max_batch):
                chunk = rows[c: c + self.max_batch]
                u = np.stack([np.random.default_rng([s, j]).random(max_new_tokens) for _, s, j in chunk])  # [b, T]
                self._decode(model, [p for p, _, _ in chunk], torch.tensor(u, dtype=torch.float32, device=device),
                             temperature, topk, out)
        return out

    def _decode(self, model, prompts: list, u, temperature: float, topk: int, out: Samples):
        b, width, device = len(prompts), max(map(len, prompts)), u.device
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # [b, Tp] left-padded
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # [b, Tp]
        cache = self._prefill(model, ids[:, :-1], attn[:, :-1])  # every prompt token but the last
        x, stop = ids[:, -1:], torch.tensor(self.stop, device=device)  # [b, 1]: the next token to feed
        done = torch.zeros(b, dtype=torch.bool, device=device)
        toks, lps, tks = [], [], []
        for t in range(u.shape[1]):
            res = model(input_ids=x, attention_mask=attn, position_ids=attn.sum(-1, keepdim=True) - 1,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = res.past_key_values
            z = res.logits[:, -1].float()  # [b, V]
            probs = torch.softmax(z / temperature if temperature not in (0, 1) else z, -1)  # [b, V] pi at T (greedy: 1)
            y = probs.argmax(-1) if temperature == 0 else sample_tokens(probs, u[:, t])  # [b]
            y = torch.where(done, pad, y)  # finished rows feed padding
            toks.append(y)
            lps.append(probs.gather(-1, y[:, None]).squeeze(-1).log())  # [b] behaviour log-prob of the sampled token
            if topk:  # one exp over the vocabulary a step: the log of the few kept values only
                tks.append(probs.topk(topk, -1))
            done = done | torch.isin(y, stop)
            attn, x = torch.cat([attn, attn.new_ones(b, 1)], 1), y[:, None]
            if done.all():
                break
        resp, logp = torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist()  # [b, t]
        if topk:
            tk_ids = torch.stack([k.indices for k in tks], 1).tolist()  # [b, t, K]
            tk_lp = torch.stack([k.values for k in tks], 1).log().tolist()  # [b, t, K]
        for i, p in enumerate(prompts):
            r, why = _cut_at_stop(resp[i], set(self.stop))
            out.prompt_ids.append(p)
            out.response_ids.append(r)
            out.logp.append(logp[i][: len(r)])
            out.finish.append(why)
            if topk:
                out.topk_ids.append(tk_ids[i][: len(r)])
                out.topk_logp.append(tk_lp[i][: len(r)])

    @staticmethod
    def _prefill(model, ids, attn):
        """The KV cache of `ids` [b, W]. The n copies of a prompt share one prefill: each distinct row is computed
        once and its cache copied to its rows. None when W = 0 (one-token prompts)."""
        if ids.shape[1] == 0:
            return None
        uniq, inv = torch.unique(torch.cat([ids, attn], 1), dim=0, return_inverse=True)  # [U, 2W], [b]
        u_ids, u_attn = uniq[:, : ids.shape[1]], uniq[:, ids.shape[1]:]
        cache = model(input_ids=u_ids, attention_mask=u_attn, position_ids=(u_attn.cumsum(-1) - 1).clamp(min=0),
                      use_cache=True, logits_to_keep=1).past_key_values
        if _plain_kv_cache(cache):
            cache.batch_select_indices(inv)  # [U, ...] -> [b, ...]
            return cache
        return model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                     use_cache=True, logits_to_keep=1).past_key_values


class VLLMSampler:
    """vLLM in the trainer's process. The engine keeps its own copy of the weights, in the compute dtype: call
    push_weights(model) after every optimizer step. Log-probs are "processed": those of the distribution actually
    sampled (temperature applied, every other processor off), so they are the behaviour policy's.
    Under torchrun every rank runs its own engine with vLLM's `external_launcher` backend (as TRL's colocate mode
    does): it joins the trainer's process group and takes LOCAL_RANK as its device. Without it, every rank's engine
    would pick cuda:0, since an in-process engine reads its device from its own config, not from LOCAL_RANK."""

    name = "vllm"

    def __init__(self, model_path: str, tok, stop: list, max_model_len: int, dtype: torch.dtype,
                 gpu_memory_utilization: float = 0.3):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process, so weights can be pushed
        from vllm import LLM

        rng_state = (torch.get_rng_state(), np.random.get_state())  # vLLM reseeds the global RNGs at build
        if torch.cuda.is_available():
            kw = dict(gpu_memory_utilization=gpu_memory_utilization)
        else:  # CPU: a fixed KV cache, and whole-prompt prefills. A prefill split into chunks makes vLLM rewind the
            # request's seeded generator, which the CPU generator cannot do ("CPU Generator does not use offset")
            kw = dict(kv_cache_memory_bytes=512 * 2**20, enable_chunked_prefill=False,
                      max_num_batched_tokens=max(max_model_len, 8192))
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            kw["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=str(dtype).replace("torch.", ""), seed=0,
                       max_model_len=max_model_len, enforce_eager=not torch.cuda.is_available(),
                       logprobs_mode="processed_logprobs", enable_prefix_caching=False, **kw)
        torch.set_rng_state(rng_state[0])
        np.random.set_state(rng_state[1])
        self.stop, self.dtype = stop, dtype

    def push_weights(self, model):
        """The public reload RPC, fed one tensor at a time in the engine's dtype (under FSDP each is gathered first)."""
        weights = ((name, t.to(self.dtype)) for name, t in full_tensors(model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def generate(self, model, prompt_ids: list, n: int, max_new_tokens: int, temperature: float = 1.0,
                 seeds: list = None, topk: int = 0) -> Samples:
        from vllm import SamplingParams

        seeds = stream_seeds((0,), len(prompt_ids)) if seeds is None else seeds
        params = [SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                 max_tokens=max_new_tokens, logprobs=topk, seed=s, stop_token_ids=self.stop,
                                 detokenize=False, skip_special_tokens=False) for s in seeds]  # child j: seed s + j
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        res = Samples([], [], [], [], [] if topk else None, [] if topk else None)
        for p, o in zip(prompt_ids, outs):
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids, why = _cut_at_stop(list(c.token_ids), set(self.stop))
                res.prompt_ids.append(p)
                res.response_ids.append(ids)
                res.finish.append(why)
                per_pos = c.logprobs[: len(ids)] if c.logprobs is not None else [None] * len(ids)
                res.logp.append([d[t].logprob if d else 0.0 for d, t in zip(per_pos, ids)])
                if topk:  # top-K by rank (the sampled token's own entry may be an extra one)
                    ranked = [sorted(d.items(), key=lambda kv: kv[1].rank)[:topk] for d in per_pos]
                    res.topk_ids.append([[k for k, _ in r] for r in ranked])
                    res.topk_logp.append([[v.logprob for _, v in r] for r in ranked])
        return res


def make_sampler(backend: str, model_path: str, tok, stop: list, max_model_len: int, dtype, device,
                 gpu_memory_utilization: float = 0.3, replicate=None):
    """`auto`: vLLM on CUDA when it imports, else the decode loop (faster for the tiny model on a CPU).
    `replicate`: the model, before FSDP shards it: the decode loop then keeps a full copy in `dtype` to sample with."""
    if backend == "auto":
        backend = "hf"
        if device.type == "cuda":
            try:
                import vllm  # noqa: F401
                backend = "vllm"
            except ImportError:
                pass
    if backend == "vllm":
        return VLLMSampler(model_path, tok, stop, max_model_len, dtype, gpu_memory_utilization)
    if backend == "hf":
        replica = None if replicate is None else copy.deepcopy(replicate).to(dtype).requires_grad_(False).eval()
        return HFSampler(tok, stop, dtype, replica=replica)
    raise ValueError(f"--backend must be hf, vllm or auto, not {backend!r}")


def collate(samples: Samples, pad_id: int, device) -> dict:
    """Lists -> tensors: the prompt left-padded, the response right-padded after it."""
    Tp, T = max(map(len, samples.prompt_ids)), max(1, max(map(len, samples.response_ids)))
    rows, attn, resp, mask, old = [], [], [], [], []
    for p, r, lp in zip(samples.prompt_ids, samples.response_ids, samples.logp):
        padp, padr = Tp - len(p), T - len(r)
        rows.append([pad_id] * padp + p + r + [pad_id] * padr)
        attn.append([0] * padp + [1] * (len(p) + len(r)) + [0] * padr)
        resp.append(r + [pad_id] * padr)
        mask.append([1.0] * len(r) + [0.0] * padr)
        old.append(lp + [0.0] * padr)
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    batch = dict(input_ids=t(rows, torch.long), attention_mask=t(attn, torch.long),  # [B, Tp+T]
                 response_ids=t(resp, torch.long), mask=t(mask, torch.float32),  # [B, T]
                 old_logp=t(old, torch.float32))  # [B, T]
    if samples.topk_ids is not None:
        K = len(samples.topk_ids[0][0]) if samples.topk_ids[0] else 1
        pad_k = lambda x, v: [r + [[v] * K] * (T - len(r)) for r in x]  # noqa: E731
        batch["topk_ids"] = t(pad_k(samples.topk_ids, 0), torch.long)  # [B, T, K]
        batch["topk_old_logp"] = t(pad_k(samples.topk_logp, 0.0), torch.float32)  # [B, T, K]
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Per-token log-probs without a float32 [B, T, V] tensor
# ---------------------------------------------------------------------------------------------------------------
def _upcast(x):  # bf16/fp16 -> float32 for an accurate logsumexp; float32/float64 unchanged
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _ChunkLogprobs(torch.autograd.Function):
    """One chunk of response rows -> log pi(target) [n], entropy [n], log pi(extra ids) [n, K], at least float32.
    Saves only its inputs and two [n] vectors; backward recomputes the chunk's [n, V] logits once and turns them into
    their gradient in place, so at most two float32 [n, V] buffers are alive at any time (autograd through
    logsumexp/softmax would keep four or five). h: [n, H], weight: [V, H], targets: [n], extra_ids: [n, K], K >= 0."""

    @staticmethod
    def forward(ctx, h, weight, targets, extra_ids, temperature: float, with_entropy: bool):
        z = _upcast(h @ weight.T).div_(temperature)  # [n, V] logits of this chunk only
        lse = torch.logsumexp(z, -1)  # [n]
        logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse  # [n]
        extra = z.gather(-1, extra_ids) - lse[:, None]  # [n, K]
        ent = lse - torch.softmax(z, -1).mul_(z).sum(-1) if with_entropy else torch.zeros_like(lse)  # [n] lse - E_p[z]
        ctx.save_for_backward(h, weight, targets, extra_ids, lse, ent)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        return logp, ent, extra

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_extra):  # [n], [n], [n, K]
        h, weight, targets, extra_ids, lse, ent = ctx.saved_tensors
        z = _upcast(h @ weight.T).div_(ctx.temperature)  # [n, V] recomputed
        p = (z - lse[:, None]).exp_()  # [n, V] softmax
        # d logp/dz = onehot(y) - p;  d extra_k/dz = onehot(k) - p;  d entropy/dz = -p * (z - E_p[z])
        dz = z.sub_((lse - ent)[:, None]).mul_(-g_ent[:, None]) if ctx.with_entropy else z.zero_()  # [n, V] in place
        dz.sub_((g_logp + g_extra.sum(-1))[:, None]).mul_(p)
        del p
        dz.scatter_add_(-1, targets[:, None], g_logp[:, None]).scatter_add_(-1, extra_ids, g_extra)
        dz = dz.div_(ctx.temperature).to(weight.dtype)
        grad_h = (dz @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None  # [n, H]
        grad_w = dz.T @ h.to(weight.dtype) if ctx.needs_input_grad[1] else None  # [V, H]
        return grad_h, grad_w, None, None, None, None


def _plain_kv_cache(cache) -> bool:
    """Only per-layer keys/values can be copied row by row (not linear-attention or quantized states, not None)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None) or [None]
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


@contextlib.contextmanager
def final_hidden_states(model):
    """Collects the decoder's output (the last hidden state, after the final norm) of each forward in the block.
    `output_hidden_states=True` would keep every layer's [B, T, H] alive (25 of them at 0.5B) to use only one."""
    got = []
    hook = getattr(model, "module", model).get_decoder().register_forward_hook(lambda m, a, out: got.append(out[0]))
    try:
        yield got
    finally:
        hook.remove()


def response_hidden(model, input_ids, attention_mask, n_response: int, share_prompts: bool = True):
    """Final (normed) hidden states at the positions that predict the response tokens: [B, T, H]. Runs through
    `model` itself (DDP/FSDP-wrapped or not) and keeps the logits of one position only.
    Rows with the same prompt (a GRPO group) share one prompt forward: pass 1 runs each distinct prompt, minus its
    last token, once; its keys/values are copied to every row of the group (gradients flow back through the copy);
    pass 2 runs the last prompt token and the response on top. Always two calls, whether or not prompts repeat, so
    that every rank of a DDP run issues the same collectives. One plain forward instead under gradient
    checkpointing (HF then returns no cache) and under FSDP2 (gradients that reach pass 1 through the copied
    keys/values bypass the layer's backward hooks, which would find its weights resharded)."""
    from torch.distributed.fsdp import FSDPModule

    if input_ids.shape[1] - n_response < 2:  # pass 1 needs a prompt column: add one of padding
        input_ids, attention_mask = (torch.nn.functional.pad(x, (1, 0)) for x in (input_ids, attention_mask))
    Tp = input_ids.shape[1] - n_response  # prompt width (left-padded)
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, Tp+T]  as the sampler does with left padding
    checkpointing = getattr(getattr(model, "module", model), "is_gradient_checkpointing", False)
    share_prompts = share_prompts and not (isinstance(model, FSDPModule) or checkpointing)
    with final_hidden_states(model) as got:
        if share_prompts:
            key = torch.cat([input_ids[:, : Tp - 1], attention_mask[:, : Tp - 1]], 1)  # [B, 2(Tp-1)]
            uniq, inv = torch.unique(key, dim=0, return_inverse=True)  # [U, 2(Tp-1)], [B]
            p_ids, p_mask = uniq[:, : Tp - 1], uniq[:, Tp - 1:]  # [U, Tp-1]: the distinct prompt prefixes
            cache = model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0),
                          logits_to_keep=1, use_cache=True).past_key_values
            if _plain_kv_cache(cache):
                for layer in cache.layers:  # keys/values [U, heads, Tp-1, d] -> [B, ...]; autograd sums the copies
                    layer.keys, layer.values = layer.keys.index_select(0, inv), layer.values.index_select(0, inv)
                got.clear()
                model(input_ids=input_ids[:, Tp - 1: -1], attention_mask=attention_mask[:, :-1],
                      position_ids=pos[:, Tp - 1: -1], past_key_values=cache, logits_to_keep=1, use_cache=True)
                return got[-1]  # [B, T, H]
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, logits_to_keep=1, use_cache=False)
        return got[-1][:, Tp - 1: -1]  # [B, T, H]


def output_weight(model):
    return getattr(model, "module", model).get_output_embeddings().weight  # [V, H]


def token_logprobs(model, batch: dict, temperature: float = 1.0, chunk_size: int = 256, with_entropy: bool = False,
                   extra_ids=None) -> dict:
    """log pi(y_t) of every response token ([B, T], 0 where mask is 0), optionally the entropy of pi at each token
    and log pi of `extra_ids` ([B, T, K], e.g. the behaviour policy's top-K). Only masked response positions are
    projected to the vocabulary, `chunk_size` rows at a time, each chunk recomputed in backward (_ChunkLogprobs).
    Under autocast the projection runs in the autocast dtype, as the model's own lm_head would."""
    mask = batch["mask"]  # [B, T]
    B, T = mask.shape
    h = response_hidden(model, batch["input_ids"], batch["attention_mask"], T)  # [B, T, H]
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # [N] flat indices of real response tokens
    h_sel, tgt = h.reshape(B * T, -1).index_select(0, rows), batch["response_ids"].reshape(-1)[rows]  # [N, H], [N]
    ext = extra_ids.reshape(B * T, -1)[rows] if extra_ids is not None else tgt.new_zeros((len(rows), 0))  # [N, K]
    weight = output_weight(model)  # [V, H]
    if torch.is_autocast_enabled(h.device.type):  # cast once here, not once per chunk
        compute = torch.get_autocast_dtype(h.device.type)
        weight, h_sel = weight.to(compute), h_sel.to(compute)
    parts = [_ChunkLogprobs.apply(h_sel[s: s + chunk_size], weight, tgt[s: s + chunk_size], ext[s: s + chunk_size],
                                  temperature, with_entropy) for s in range(0, len(rows), chunk_size)]

    def scatter(i, shape):  # chunk results back to [B, T(, K)], zeros off the mask
        vals = torch.cat([p[i] for p in parts]) if parts else h.new_zeros((0,) + shape[2:], dtype=torch.float32)
        full = torch.zeros((B * T,) + shape[2:], dtype=vals.dtype, device=mask.device)
        return full.index_copy(0, rows, vals).reshape(shape)

    out = {"logp": scatter(0, (B, T))}  # [B, T]
    if with_entropy:
        out["entropy"] = scatter(1, (B, T))  # [B, T]
    if extra_ids is not None:
        out["extra_logp"] = scatter(2, (B, T, extra_ids.shape[-1]))  # [B, T, K]
    return out


@torch.no_grad()
def token_logprobs_nograd(model, batch: dict, micro_batch_size: int = 0, **kw) -> dict:
    """token_logprobs without gradients, `micro_batch_size` rows at a time (0 = all): the reference, proxy and
    p_old passes stay within the same memory as a training micro-batch."""
    B = batch["mask"].shape[0]
    mb = micro_batch_size or B
    parts = [token_logprobs(model, {k: v[s: s + mb] for k, v in batch.items()}, **kw) for s in range(0, B, mb)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def masked_mean(x, mask):
    """Mean of x over mask == 1 (0 if the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: greedy accuracy, unbiased pass@k
# ---------------------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_ks(n: int) -> list:
    """The k reported from n samples per prompt: 1, 8 and 16 where n allows, and n itself."""
    return sorted({k for k in (1, 8, 16) if k <= n} | {n})


def decode(tok, ids: list) -> list:
    return tok.batch_decode(ids, skip_special_tokens=True) if len(ids) else []  # transformers 5: [] -> ['']


def evaluate(model, tok, sampler, examples: list, n: int = 16, max_new_tokens: int = 8, temperature: float = 1.0,
             seeds: list = None, verifier: Verifier = None) -> dict:
    """Greedy accuracy, pass@k (k in pass_ks(n)) from n samples per prompt at `temperature`, mean response length,
    and the share of completions the verifier did not finish in time (they count as wrong).
    `seeds`: one per prompt (stream_seeds), so that a prompt's samples do not depend on the rank that evaluates it."""
    verifier = verifier or Verifier()
    prompts = encode_prompts(tok, examples)
    greedy = sampler.generate(model, prompts, 1, max_new_tokens, temperature=0.0)
    acc = np.mean(verifier(examples, decode(tok, greedy.response_ids)))
    timed_out = verifier.last["verify/timed_out"] * len(examples)
    samp = sampler.generate(model, prompts, n, max_new_tokens, temperature=temperature, seeds=seeds)
    rewards = np.array(verifier([e for e in examples for _ in range(n)], decode(tok, samp.response_ids)))
    timed_out += verifier.last["verify/timed_out"] * len(rewards)
    rewards = rewards.reshape(len(examples), n)
    res = {"eval/greedy_acc": float(acc), "eval/response_len": float(np.mean([len(r) for r in samp.response_ids])),
           "eval/verify_timed_out": timed_out / (len(examples) * (n + 1))}
    for k in pass_ks(n):
        res[f"eval/pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in rewards.sum(1)]))
    return res


# ---------------------------------------------------------------------------------------------------------------
# Precision and several ranks: autocast, DDP / FSDP2, full state dicts
# ---------------------------------------------------------------------------------------------------------------
def autocast(device: torch.device, dtype: torch.dtype):
    """Compute in `dtype` (bf16 matmuls) while the weights, their gradients and the AdamW state stay float32: at
    lr 1e-6 most AdamW updates are below bf16's resolution, so bf16 weights would barely move. Wrap forwards (and
    their backward) only, never an optimizer step: autocast caches its bf16 copies of the weights per block."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def init_distributed(device: torch.device):
    """(rank, world_size). Under torchrun: one process group (gloo on CPU, nccl on CUDA); else (0, 1), no set-up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world


def all_ranks_sum(x):
    """Sum of a tensor over all ranks, on x's device (a copy of x on one process)."""
    if not torch.distributed.is_initialized():
        return x.clone()
    y = x.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu", copy=True)
    torch.distributed.all_reduce(y)
    return y.to(x.device)


def all_ranks_mean(values: dict, weight: float = 1.0) -> dict:
    """Weighted mean over ranks of a dict of floats (unchanged on one process)."""
    t = all_ranks_sum(torch.tensor([weight] + [weight * v for v in values.values()], dtype=torch.float64))
    return dict(zip(values, (t[1:] / t[0]).tolist()))


def wrap_policy(model, world: int, fsdp: bool, dtype: torch.dtype):
    """The module the update runs its forward/backward through. One process: the model. torchrun: DDP (every rank
    holds all weights; gradients are averaged), or with `fsdp` FSDP2: each decoder layer, then the whole model, is
    sharded over the ranks (weights, gradients and AdamW state 1/world each), computing in `dtype` and averaging
    gradients in float32. Build the optimizer after this: FSDP2 replaces the parameters by their shards."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if world == 1:
            raise SystemExit("--fsdp shards the model over the ranks of a torchrun job: run it under torchrun")
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.get_decoder().layers:
            fully_shard(layer, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    return torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model


def full_tensors(model):
    """(name, full tensor) for every entry of the state dict, one at a time: FSDP2 shards (DTensor) are gathered,
    so every rank must iterate this together; plain tensors come as they are."""
    for name, t in model.state_dict().items():
        yield name, t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def full_state(model, optimizer=None) -> dict:
    """{"model": full (unsharded) float32 weights, "optimizer": its state if given} on rank 0's CPU; on the other ranks
    the same keys with empty dicts (FSDP2 shards are gathered: every rank must call this together)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=opts)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=opts)
    return state


def finite_weights(model) -> bool:
    """Whether every weight is finite, on every rank (each checks its own shard under FSDP2)."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    return all_ranks_sum(torch.tensor(bad)).item() == 0


def load_full_state(model, optimizer, state: dict):
    """The inverse of full_state, on every rank (each keeps its own shard under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)


def save_final(model, tok, path, weights: dict, dtype: torch.dtype):
    """The trained model in HF format, from the full float32 `weights`, in the dtype it was loaded from (bf16 for
    Qwen); a tied output embedding is stored once, as the hub's checkpoints do."""
    head = getattr(model, "module", model).get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False):
        weights = {k: v for k, v in weights.items()
                   if not any(k == f"{n}.weight" for n, m in model.named_modules() if m is head)}
    model.save_pretrained(path, state_dict={k: v.to(dtype) for k, v in weights.items()})
    config_dtype, model.config.dtype = model.config.dtype, dtype  # save_pretrained wrote the master weights' dtype
    model.config.save_pretrained(path)
    model.config.dtype = config_dtype
    tok.save_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------
# Before any work: every argument checked, the output folder claimed, the checkpoint to resume read
# ---------------------------------------------------------------------------------------------------------------
def env_world() -> int:
    """The number of ranks torchrun will start (1 without torchrun), known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", 1))


def task_ok(task: str) -> bool:
    family, _, level = task.partition(":")
    if family in BUILTIN_TASKS:  # countdown needs 2+ numbers; 10**19 overflows the generator's int64
        hi = 10 if family == "sum" else 18  # sum: 10 terms' running totals fill the 32-token cap
        return level == "" or level.isdigit() and (2 if family == "countdown" else 1) <= int(level) <= hi
    return task in ("gsm8k", "math500") or task.endswith(".jsonl") and Path(task).is_file()


def device_ok(device: str) -> bool:
    if device == "auto":
        return True
    try:
        d = torch.device(device)
    except RuntimeError:
        return False
    return d.type == "cpu" or d.type == "cuda" and (d.index or 0) < torch.cuda.device_count()


def is_num(v) -> bool:  # a finite int or float (not a bool)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def flag(v, a) -> bool:
    return isinstance(v, bool)


# Every argument the six trainers share: (a test of its value v, given all the arguments a; what it must be). A
# method file adds its own; check_args refuses an argument that has no rule, so a new one cannot go unchecked.
ARG_RULES = {
    "model": (lambda v, a: v == "tiny" or Path(v).expanduser().is_dir() or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", v),
              "be 'tiny', a local model folder that exists, or a Hugging Face id such as Qwen/Qwen2.5-0.5B-Instruct"),
    "task": (lambda v, a: task_ok(v), "be countdown[:2-18 numbers], arithmetic[:1-18 digits], sum[:1-10 terms], "
                                      "gsm8k, math500 or the path of a .jsonl file that exists"),
    "backend": (lambda v, a: v in ("auto", "hf", "vllm"), "be auto, hf or vllm"),
    "vllm_gpu_memory": (lambda v, a: is_num(v) and 0 < v <= 1, "be a share of the GPU's memory, in (0, 1]"),
    "verify_workers": (lambda v, a: is_int(v) and v >= -1, "be -1 (auto), 0 (verify in the trainer) or a number of "
                                                           "processes"),
    "verify_timeout": (lambda v, a: is_num(v) and v > 0, "be a positive number of seconds"),
    "output_dir": (lambda v, a: v and not Path(v).is_file(), "name a folder (not an existing file)"),
    "seed": (lambda v, a: is_int(v) and v >= 0, "be an integer >= 0"),
    "device": (lambda v, a: device_ok(v), "be auto, cpu, cuda or cuda:N for a GPU this machine has"),
    "dtype": (lambda v, a: v in ("auto", "float32", "bfloat16"), "be auto, float32 or bfloat16 (float16 would need "
                                                                  "loss scaling)"),
    "sampler_dtype": (lambda v, a: v in ("auto", "float32", "bfloat16"), "be auto (= --dtype), float32 or bfloat16"),
    "fsdp": (flag, "be true or false"),
    "gradient_checkpointing": (flag, "be true or false"),
    "resume": (lambda v, a: flag(v, a) and not (v and a.overwrite), "be true or false, and not true together with "
                                                                    "--overwrite"),
    "overwrite": (flag, "be true or false"),
    "max_steps": (lambda v, a: is_int(v) and v >= 0, "be >= 0 (0 trains nothing: it evaluates the initial policy)"),
    "prompts_per_step": (lambda v, a: is_int(v) and v >= 1, "be at least 1"),
    "group_size": (lambda v, a: is_int(v) and v >= 2, "be at least 2: the advantage compares the responses to a "
                                                      "prompt; with one, every advantage is 0 and nothing is learned"),
    "max_new_tokens": (lambda v, a: is_int(v) and v >= 0, "be >= 0 (0 = the task's default)"),
    "max_prompt_len": (lambda v, a: is_int(v) and v >= 1, "be at least 1"),
    "temperature": (lambda v, a: is_num(v) and v > 0, "be > 0: training needs the sampling distribution softmax(z/T)"),
    "lr": (lambda v, a: is_num(v) and v >= 0, "be a positive learning rate, or 0 for the default"),
    "weight_decay": (lambda v, a: is_num(v) and v >= 0, "be >= 0"),
    "max_grad_norm": (lambda v, a: isinstance(v, (int, float)) and v > 0, "be > 0 (inf: no clipping)"),
    "epochs": (lambda v, a: is_int(v) and v >= 1, "be at least 1"),
    "mini_batches": (lambda v, a: is_int(v) and 1 <= v <= a.prompts_per_step * a.group_size // env_world(),
                     "be between 1 and the sequences each rank trains on per step (prompts_per_step * group_size / "
                     "ranks)"),
    "micro_batch_size": (lambda v, a: is_int(v) and v >= 0, "be >= 0 (0 = the whole mini-batch)"),
    "eps_low": (lambda v, a: is_num(v) and 0 <= v <= 1, "be in [0, 1]: the ratio's lower clip bound 1 - eps_low"),
    "eps_high": (lambda v, a: is_num(v) and v >= 0, "be >= 0"),
    "beta": (lambda v, a: is_num(v) and v >= 0, "be >= 0"),
    "scale_std": (flag, "be true or false"),
    "agg": (lambda v, a: v in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
            "be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm"),
    "logprob_chunk": (lambda v, a: is_int(v) and v >= 1, "be at least 1"),
    "eval_every": (lambda v, a: is_int(v) and v >= 0, "be >= 0 (0 = only at the end)"),
    "eval_prompts": (lambda v, a: is_int(v) and v >= 1, "be at least 1"),
    "eval_samples": (lambda v, a: is_int(v) and v >= 1, "be at least 1"),
    "log_examples_every": (lambda v, a: is_int(v) and v >= 0, "be >= 0 (0 = never)"),
    "save_every": (lambda v, a: is_int(v) and v >= 1, "be at least 1"),
}


def check_args(args, rules: dict):
    """Refuse a bad setting before any work starts, in one sentence: the flag, its value, what it must be."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.name not in rules:
            raise SystemExit(f"--{f.name} has no rule in check_args: add one to the trainer's RULES")
        test, must = rules[f.name]
        try:
            ok = bool(test(value, args))
        except (TypeError, ValueError, AttributeError):  # a value of the wrong type
            ok = False
        if not ok:
            raise SystemExit(f"--{f.name} {value!r} is not allowed: it must {must}")


RUN_FILES = ("metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt", "final")


def claim_output_dir(out_dir: Path, resume: bool, overwrite: bool, main_rank: bool):
    """Never write over a run by accident. A folder holding one (metrics, a checkpoint, a final model) is continued
    with --resume, cleared with --overwrite (its checkpoints and final model are deleted here), or refused."""
    found = [f for f in RUN_FILES if (out_dir / f).exists() and (f != "metrics.jsonl" or (out_dir / f).stat().st_size)]
    if resume or not found:
        return
    if not overwrite:
        steps = [r["step"] for r in load_metrics(out_dir / "metrics.jsonl") if "step" in r]
        held = ", ".join(found) + (f"; metrics to step {steps[-1]}" if steps else "")
        raise SystemExit(f"{out_dir} already holds a run ({held}): continue it with --resume true, start it over "
                         f"with --overwrite true, or choose another --output_dir")
    if main_rank:
        print(f"--overwrite: deleting the run in {out_dir} ({', '.join(found)})")
        for f in found:  # metrics.jsonl is started anew by the trainer
            shutil.rmtree(out_dir / f) if f == "final" else (out_dir / f).unlink() if f != "metrics.jsonl" else None


def read_checkpoint(out_dir: Path, args) -> dict:
    """The state --resume continues from (None: no checkpoint yet, the run starts at step 0). Read before the model
    is loaded, so that a checkpoint that cannot be used fails in seconds, saying which file, why, and what to do."""
    path, prev = out_dir / "checkpoint.pt", out_dir / "checkpoint.prev.pt"
    if not path.exists() and not prev.exists():
        print(f"--resume: no checkpoint in {out_dir} yet; starting at step 0")
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "step", "args"} <= set(ckpt):
            raise ValueError("it is not a checkpoint of these trainers")
    except Exception as e:  # noqa: BLE001 -- whatever the cause, the user needs the same sentence
        why = str(e).split(". ")[0][:150]  # torch's message goes on for lines
        raise SystemExit(f"cannot resume: {path} cannot be read ({type(e).__name__}: {why}; a copy cut short or a "
                         f"full disk does this); {previous_checkpoint_hint(path, prev)}") from None
    was = {k: ckpt["args"].get(k) for k in ("model", "task")}
    if was != {"model": args.model, "task": args.task}:
        raise SystemExit(f"cannot resume: {path} is from a run with --model {was['model']} --task {was['task']}, not "
                         f"--model {args.model} --task {args.task}: pass those, or choose another --output_dir")
    return ckpt


def previous_checkpoint_hint(path: Path, prev: Path) -> str:
    try:
        step = torch.load(prev, map_location="cpu", weights_only=False, mmap=True)["step"]
    except Exception:  # noqa: BLE001 -- missing or unreadable too
        return "no earlier checkpoint can be read: start over with --overwrite true or choose another --output_dir"
    return (f"the previous checkpoint {prev} (step {step}) can be read: `mv {prev} {path}`, then run again with "
            f"--resume true to continue from it")


# ---------------------------------------------------------------------------------------------------------------
# Run plumbing: checkpoints, metrics, timing
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(path, state: dict, keep_previous: bool = False):
    """Atomic: write a temp file, then rename it over the old checkpoint (a crash never leaves half a file).
    keep_previous: the old one becomes <name>.prev.pt first, so that one readable checkpoint is left even if the
    newest is damaged later (a copy cut short); this costs the disk space of a second checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
    except (OSError, RuntimeError) as e:  # a full disk: the old checkpoint is untouched
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"could not write {path} ({type(e).__name__}: {str(e)[:150]}; is the disk full?); the "
                         f"checkpoint written before it is left as it was") from None
    if keep_previous and path.exists():
        os.replace(path, path.with_name(path.stem + ".prev" + path.suffix))
    os.replace(tmp, path)


def load_metrics(path) -> list:
    """The records of a metrics.jsonl; a line cut short by a crash while it was written is skipped, with a note."""
    path, out = Path(path), []
    lines = path.read_text().splitlines() if path.exists() else []
    for i, line in enumerate(lines, 1):
        try:
            if line.strip():
                out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: {path}:{i} is not a complete record (a crash while it was written?); skipped")
    return out


def append_metrics(path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, last_step: int):
    """On resume: drop records the interrupted run wrote after its last checkpoint."""
    keep = [r for r in load_metrics(path) if r.get("step", -1) <= last_step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in keep))


class Timer:
    """`with timer("sample"): ...` adds the wall seconds to timer.s["sample"]."""

    def __init__(self):
        self.s = {}

    @contextlib.contextmanager
    def __call__(self, name):
        t = time.perf_counter()
        yield
        self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t

