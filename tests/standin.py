"""A real-architecture stand-in for Qwen2.5-Instruct, built in code (no hub is reachable in tests or CI).

What a user's `--model Qwen/Qwen2.5-0.5B-Instruct` brings, and the embedded tiny model does not:
  - a Qwen2ForCausalLM (grouped-query attention, head_dim 64, tied embeddings, bf16 weights on disk);
  - a byte-level BPE tokenizer (Qwen2's pre-tokenizer regex, NFC, ByteLevel), trained here on task text;
  - Qwen2.5's special tokens: <|endoftext|> (pad, base-model EOS), <|im_start|>, <|im_end|> (the chat EOS);
  - Qwen2.5's chat template with its default system prompt;
  - an embedding with more rows than the tokenizer has tokens (Qwen: 151,936 rows for 151,665 tokens);
  - a generation_config.json shaped like Qwen2.5-Instruct's: repetition_penalty, temperature 0.7, top_p 0.8,
    top_k 20 and two EOS ids. A trainer that lets these leak into sampling samples from the wrong distribution.

The weights are random: this model checks exactness, shapes and memory, not learning. `build_standin(rows=151936)`
gives the full-vocabulary variant for memory benchmarks; `hidden`/`layers`/`heads` give Qwen2.5-0.5B's shape
(896, 24, 14 / 2 KV heads, intermediate 4864) for bench/gpu_check.py.
"""
import json
import os
from pathlib import Path

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>"]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's template without its tool-calling branches
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN_GENERATION_CONFIG = {"do_sample": True, "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8,
                          "top_k": 20}


def _corpus() -> list:
    """GSM8K questions and solutions when ../shared/data is there (realistic merges: GSM8K prompts come out at
    ~120-200 tokens), else the built-in tasks' text."""
    import common

    path = common.shared_data_dir() / "gsm8k_train.jsonl"
    if path.is_file():
        rows = [json.loads(x) for x in path.read_text().splitlines()[:3000]]
        return [r["question"] + "\n" + r["answer"] for r in rows] + [common.MATH_INSTRUCTION, QWEN_SYSTEM]
    train, _ = common.load_task("countdown")
    more, _ = common.load_task("arithmetic")
    return [e.question + "\n" + e.solution for e in train + more] + [common.MATH_INSTRUCTION, QWEN_SYSTEM]


def qwen_tokenizer(vocab_size: int = 4096):
    """Byte-level BPE with Qwen2's pre-tokenization, trained on `_corpus()`; saved, it reloads as Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens(QWEN_SPECIALS)  # appended after the BPE vocabulary, as in Qwen's (151643...)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build_standin(out_dir, rows: int = 0, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                  intermediate: int = 1024, seed: int = 0) -> Path:
    """Write the stand-in to out_dir (HF format, bf16 weights) and return the path. rows = embedding rows
    (0 = the tokenizer's size rounded up to a multiple of 64 plus 64 unused rows, as Qwen pads its vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    out_dir = Path(out_dir)
    tok = qwen_tokenizer()
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    rows = rows or (len(tok) + 63) // 64 * 64 + 64
    cfg = Qwen2Config(vocab_size=rows, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext, dtype="bfloat16")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=endoftext, pad_token_id=endoftext,
                                               eos_token_id=[im_end, endoftext], **QWEN_GENERATION_CONFIG)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    model.to(torch.bfloat16).save_pretrained(tmp)  # Qwen ships bf16 weights
    tok.save_pretrained(tmp)
    cfg_path = tmp / "tokenizer_config.json"  # reload through transformers' own Qwen2Tokenizer, as the hub model does
    tc = json.loads(cfg_path.read_text())
    tc.update(tokenizer_class="Qwen2Tokenizer", model_max_length=131072, add_prefix_space=False, errors="replace")
    cfg_path.write_text(json.dumps(tc, indent=2))
    if out_dir.exists():  # another process built it meanwhile
        import shutil
        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    return out_dir


def standin_path(rows: int = 0, **shape) -> Path:
    """The cached stand-in (built on first use, a few seconds) under RLVR_CACHE."""
    import common

    key = "-".join(f"{k}{v}" for k, v in sorted(shape.items()))
    data = "gsm8k" if (common.shared_data_dir() / "gsm8k_train.jsonl").is_file() else "builtin"
    path = common.cache_root() / f"qwen-standin-v1-{data}-r{rows}{'-' + key if key else ''}"
    return path if path.exists() else build_standin(path, rows, **shape)
