"""No slip of the user's stops a run late or loses one: every argument of every trainer is checked before any work,
a folder holding a run is never written over without being asked, and a checkpoint that cannot be read says which
file, why, and what to do."""
import dataclasses
import importlib
import math
import shutil

import pytest
import torch
from conftest import SMALL, records, run_script

import common

TRAINERS = ["grpo", "dph_rl", "lp_reg", "rl_plus", "delta_l", "dppo"]

BAD = {  # a value each argument must refuse
    "model": "/no/such/model/folder", "task": "countdown:x", "backend": "tpu", "vllm_gpu_memory": 0.0,
    "verify_workers": -2, "verify_timeout": 0.0, "output_dir": __file__, "seed": -1, "device": "gpu",
    "dtype": "float16", "sampler_dtype": "float16", "fsdp": "yes", "gradient_checkpointing": 1, "resume": "no", "overwrite": None,
    "max_steps": -1, "prompts_per_step": 0, "group_size": 1, "max_new_tokens": -5, "max_prompt_len": 0,
    "temperature": 0.0, "lr": -1.0, "weight_decay": -0.1, "max_grad_norm": 0.0, "epochs": 0, "mini_batches": 0,
    "micro_batch_size": -1, "eps_low": 1.5, "eps_high": -0.1, "beta": math.nan, "scale_std": "true", "agg": "sum",
    "logprob_chunk": 0, "eval_every": -1, "eval_prompts": 0, "eval_samples": 0, "log_examples_every": -1,
    "save_every": 0,
    # the methods' own
    "divergence": "tv", "alpha": -0.5, "eta": math.inf, "pef_weighting": "both", "pef_k": 0, "pef_min_correct": 9,
    "pef_split_prompts": -1, "pef_per_step": -1, "dual_clip": 0.5, "kappa": 2.0, "rho": 0.0, "lp_beta": -1.0,
    "select_scope": "batch", "full_kl_k": -1, "gamma": -1.0, "mis_u": -0.5, "clip_internal": "no",
    "ent_coef": math.nan, "delta": -0.1, "delta_low": -0.1, "is_cap": 0.0, "topk": 0,
}


def trainer(name):
    return importlib.import_module(name)


def no_work(monkeypatch, mod):
    """Make any work at all (picking a device, loading a model) fail loudly: the checks must come first."""
    def fail(*_a, **_k):
        raise AssertionError("work started before the arguments were checked")
    monkeypatch.setattr(mod, "pick_device", fail)
    monkeypatch.setattr(mod, "load_model_and_tokenizer", fail)


@pytest.mark.parametrize("name", TRAINERS)
def test_every_argument_has_a_rule_a_bad_value_and_valid_defaults(name):
    mod = trainer(name)
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    assert fields <= set(common.ARG_RULES) | set(mod.RULES), fields - set(common.ARG_RULES) - set(mod.RULES)
    assert fields <= set(BAD), fields - set(BAD)
    common.check_args(mod.Args(), {**common.ARG_RULES, **mod.RULES})  # the laptop defaults pass


@pytest.mark.parametrize("name", TRAINERS)
def test_a_bad_argument_is_refused_in_one_sentence_before_any_work(name, monkeypatch, tmp_path):
    mod = trainer(name)
    no_work(monkeypatch, mod)
    for f in dataclasses.fields(mod.Args):
        kw = {"output_dir": str(tmp_path / "run"), f.name: BAD[f.name]}
        with pytest.raises(SystemExit) as e:
            mod.main(mod.Args(**kw))
        msg = str(e.value)
        assert msg.startswith(f"--{f.name} ") and "must" in msg and "\n" not in msg, msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", TRAINERS)
def test_sampler_dtype_reaches_the_sampler(name, tiny_cache, monkeypatch, tmp_path):
    """--sampler_dtype picks the sampler's compute dtype (auto: the trainer's --dtype), in every trainer."""
    mod, seen = trainer(name), []

    class Built(Exception):
        pass

    def fake_sampler(backend, path, tok, stop, max_len, dtype, *a, **k):
        seen.append(dtype)
        raise Built

    monkeypatch.setattr(mod, "make_sampler", fake_sampler)
    for sd in ("auto", "bfloat16", "float32"):
        with pytest.raises(Built):
            mod.main(mod.Args(output_dir=str(tmp_path / sd), sampler_dtype=sd, dtype="float32"))
    with pytest.raises(Built):
        mod.main(mod.Args(output_dir=str(tmp_path / "bf16"), dtype="bfloat16"))
    assert seen == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]


def test_the_issue_s_examples_and_the_cross_checks(monkeypatch, tmp_path):
    import dph_rl
    import dppo
    import grpo

    for mod in (grpo, dph_rl, dppo):
        no_work(monkeypatch, mod)
    for mod, kw, flag in [(grpo, dict(group_size=1), "--group_size"), (grpo, dict(lr=-1.0), "--lr"),
                          (grpo, dict(prompts_per_step=4, group_size=4, mini_batches=17), "--mini_batches"),
                          (grpo, dict(resume=True, overwrite=True), "--resume"),
                          (grpo, dict(task=str(tmp_path / "missing.jsonl")), "--task"),
                          (dph_rl, dict(pef_k=4, pef_min_correct=5), "--pef_min_correct"),
                          (dppo, dict(topk=21, backend="vllm"), "--topk")]:
        with pytest.raises(SystemExit, match=f"^{flag} "):
            mod.main(mod.Args(output_dir=str(tmp_path / "run"), **kw))
    monkeypatch.setenv("WORLD_SIZE", "4")  # 4 ranks: 4 x 4 sequences, 4 per rank
    with pytest.raises(SystemExit, match="^--mini_batches 5 "):
        grpo.main(grpo.Args(output_dir=str(tmp_path / "run"), prompts_per_step=4, group_size=4, mini_batches=5))


# ---- a folder that holds a run ----
def fake_run(d, step=3, args=None):
    """A run folder as a trainer leaves it: metrics, a checkpoint and the one before it."""
    d.mkdir(parents=True)
    args = args or {"model": "tiny", "task": "countdown"}
    common.append_metrics(d / "metrics.jsonl", {"args": args})
    for s in range(1, step + 1):
        common.append_metrics(d / "metrics.jsonl", {"step": s, "reward/mean": 0.5})
    for f, s in (("checkpoint.prev.pt", step - 1), ("checkpoint.pt", step)):
        torch.save({"model": {}, "optimizer": {}, "step": s, "args": args}, d / f)
    return {f.name: f.read_bytes() for f in d.iterdir()}


@pytest.mark.parametrize("name", TRAINERS)
def test_running_again_without_resume_is_refused_and_touches_nothing(name, monkeypatch, tmp_path):
    """Regression: the same command with --max_steps 1 and no --resume truncated metrics.jsonl and overwrote
    checkpoint.pt (step 3 -> step 1) without a word."""
    mod = trainer(name)
    before = fake_run(tmp_path / "run")
    monkeypatch.setattr(mod, "load_model_and_tokenizer", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(SystemExit) as e:
        mod.main(mod.Args(output_dir=str(tmp_path / "run"), max_steps=1))
    msg = str(e.value)
    assert "already holds a run" in msg and "--resume true" in msg and "--overwrite true" in msg, msg
    assert "metrics to step 3" in msg
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == before


@pytest.mark.parametrize("name", TRAINERS)
def test_an_unreadable_checkpoint_says_which_file_why_and_what_to_do(name, monkeypatch, tmp_path):
    mod = trainer(name)
    fake_run(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:300])  # a copy cut short
    monkeypatch.setattr(mod, "load_model_and_tokenizer", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(SystemExit) as e:
        mod.main(mod.Args(output_dir=str(tmp_path / "run"), max_steps=5, resume=True))
    msg = str(e.value)
    assert msg.startswith(f"cannot resume: {ckpt} cannot be read (") and "\n" not in msg, msg
    assert "checkpoint.prev.pt (step 2) can be read" in msg and "--resume true" in msg, msg
    (tmp_path / "run" / "checkpoint.prev.pt").write_bytes(b"")  # the previous one is gone too
    with pytest.raises(SystemExit, match="no earlier checkpoint can be read: start over with --overwrite true"):
        mod.main(mod.Args(output_dir=str(tmp_path / "run"), max_steps=5, resume=True))


def test_a_checkpoint_of_another_model_or_task_is_refused(tmp_path):
    import grpo

    fake_run(tmp_path / "run", args={"model": "tiny", "task": "arithmetic"})
    with pytest.raises(SystemExit, match="from a run with --model tiny --task arithmetic, not --model tiny --task "
                                         "countdown"):
        grpo.main(grpo.Args(output_dir=str(tmp_path / "run"), resume=True))


def test_the_previous_checkpoint_is_kept_beside_the_newest(tmp_path):
    for step in (1, 2, 3):
        common.save_checkpoint(tmp_path / "checkpoint.pt", {"step": step}, keep_previous=True)
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 3
    assert torch.load(tmp_path / "checkpoint.prev.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]  # no temp left


def test_a_metrics_line_cut_short_by_a_crash_is_skipped(tmp_path, capsys):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"args": {}}\n{"step": 1}\n{"step": 2, "rew')
    assert common.load_metrics(f) == [{"args": {}}, {"step": 1}]
    assert "metrics.jsonl:3 is not a complete record" in capsys.readouterr().out
    common.truncate_metrics(f, 1)  # what --resume does: it used to raise JSONDecodeError here
    assert common.load_metrics(f) == [{"args": {}}, {"step": 1}]


def test_the_issue_s_scenario_end_to_end(tiny_cache, tmp_path):
    """grpo.py --max_steps 3, then the same with --max_steps 1 and no --resume: refused, run intact; --overwrite
    starts over (the old checkpoints go); a damaged checkpoint is replaced by the kept previous one and resumed."""
    args = ["--eval_every", "0", "--save_every", "1", "--output_dir", str(tmp_path), *SMALL]
    assert run_script("grpo.py", "--max_steps", "3", *args).returncode == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    p = run_script("grpo.py", "--max_steps", "1", *args)
    assert p.returncode != 0 and "already holds a run" in p.stderr, p.stderr[-1000:]
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 3

    p = run_script("grpo.py", "--max_steps", "1", "--overwrite", "true", *args)
    assert p.returncode == 0, p.stderr[-1000:]
    assert [r.get("step") for r in records(tmp_path)] == [None, 1]
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 1 and not (tmp_path / "checkpoint.prev.pt").exists()

    assert run_script("grpo.py", "--max_steps", "3", "--resume", "true", *args).returncode == 0
    ckpt, prev = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    assert torch.load(prev)["step"] == 2
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    p = run_script("grpo.py", "--max_steps", "4", "--resume", "true", *args)
    assert p.returncode != 0 and f"mv {prev} {ckpt}" in p.stderr, p.stderr[-1000:]
    shutil.move(prev, ckpt)
    p = run_script("grpo.py", "--max_steps", "4", "--resume", "true", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout, p.stderr[-1000:]
    assert [r.get("step") for r in records(tmp_path)] == [None, 1, 2, 3, 4]


@pytest.mark.parametrize("name", TRAINERS)
def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(name, tiny_cache, tmp_path):
    """4 steps in one go, against 2 steps, stopped, then resumed to 4: the same metrics (timings aside) and the same
    weights, for every trainer (each keeps its own state: DPH-RL's split, DPPO's mini-batches...)."""
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ["--pef_split_prompts", "300"] if name == "dph_rl" else []
    common_args = ["--eval_every", "2", "--save_every", "2", *SMALL, *extra]
    assert run_script(f"{name}.py", "--max_steps", "4", "--output_dir", str(a), *common_args).returncode == 0
    assert run_script(f"{name}.py", "--max_steps", "2", "--output_dir", str(b), *common_args).returncode == 0
    p = run_script(f"{name}.py", "--max_steps", "4", "--output_dir", str(b), "--resume", "true", *common_args)
    assert p.returncode == 0 and "resumed" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/") or k == "perf/grad_norm"} for r in rs]
    assert strip(records(a)[1:]) == strip(records(b)[1:])
    wa, wb = torch.load(a / "checkpoint.pt"), torch.load(b / "checkpoint.pt")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    sa, sb = wa["optimizer"]["state"], wb["optimizer"]["state"]  # AdamW's moments and step, per parameter
    assert sa.keys() == sb.keys() and all(torch.equal(torch.as_tensor(sa[p][k]), torch.as_tensor(sb[p][k]))
                                          for p in sa for k in sa[p])
