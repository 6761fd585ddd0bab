"""Bad inputs, as a new user makes them: each ends in ONE `error:` line and exit code 2, loads no weights
when the problem is the recipe or the data, and leaves an existing run folder byte for byte as it was.

Most cases call `train.main([...])` in this process (cheap: no weights, a tokenizer at most); two go
through a real `accelerate launch -q`, where the launcher's own exit code (1) is what the user sees.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, reset_accelerate, tiny_overrides
from dpo_accel import train
from dpo_accel.model import loading as modeling
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe
from dpo_accel.config.plan import preflight
from dpo_accel.outputs.checkpoints import load_checkpoint

ROWS = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}.", "rejected": f"It is {2 * i + 1}."}
        for i in range(12)]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """Data files with one fault each, model folders with one fault each, and an existing run (2 steps,
    a checkpoint) that every case must leave untouched."""
    root = tmp_path_factory.mktemp("bad")
    d = {"root": str(root), "model": tiny_model_dir}
    d["good"] = write_jsonl(root / "good.jsonl", ROWS)
    d["empty"] = write_jsonl(root / "empty.jsonl", [])
    d["corrupt"] = write_jsonl(root / "corrupt.jsonl", ROWS[:3], ['{"prompt": "x", "chosen": "y", "rejected": '])
    d["same"] = write_jsonl(root / "same.jsonl", [{**r, "rejected": r["chosen"]} for r in ROWS])
    d["null"] = write_jsonl(root / "null.jsonl", ROWS[:2] + [{**ROWS[2], "chosen": None}] + ROWS[3:])
    d["blank"] = write_jsonl(root / "blank.jsonl", ROWS[:4] + [{**ROWS[4], "rejected": ""}] + ROWS[5:])
    d["int"] = write_jsonl(root / "int.jsonl", ROWS[:1] + [{**ROWS[1], "chosen": 7}] + ROWS[2:])
    d["nocol"] = write_jsonl(root / "nocol.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in ROWS])
    d["csv"] = str(root / "pairs.csv")
    with open(d["csv"], "w") as f:
        f.write("prompt,chosen,rejected\na,b,c\n")
    (root / "empty_model").mkdir()
    d["empty_model"] = str(root / "empty_model")
    pickled = root / "pickled_model"
    pickled.mkdir()
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_model_dir, name), pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    d["pickled"] = str(pickled)
    cut = root / "cut_model"  # a copy cut short: model.safetensors holds half its bytes
    shutil.copytree(tiny_model_dir, cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    d["cut_model"] = str(cut)
    (root / "list_recipe.yaml").write_text("- model: {model_name_or_path: x}\n- train: {max_steps: 2}\n")
    d["list_recipe"] = str(root / "list_recipe.yaml")
    gguf = root / "truncated.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    d["gguf"] = str(gguf)
    run = str(root / "run")
    reset_accelerate()
    train.run(load_recipe(None, tiny_overrides(tiny_model_dir, run, **{
        "data.dataset_name": d["good"], "data.eval_split": None, "train.max_steps": 2, "train.save_steps": 2,
        "eval.do_eval": False, "train.report_to": []})))
    reset_accelerate()
    d["run"] = run
    broken = str(root / "broken_run")
    shutil.copytree(run, broken)
    checkpoint = os.path.join(broken, "checkpoints", "checkpoint-0000002")
    os.remove(os.path.join(checkpoint, "optimizer.bin"))
    d["broken"] = broken
    for gone in UNLISTED:  # checkpoints whose state file lists no files (an older version's, or copied by hand)
        folder = str(root / f"unlisted_{stem(gone)}")
        shutil.copytree(run, folder)
        checkpoint = os.path.join(folder, "checkpoints", "checkpoint-0000002")
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            state = json.load(f)
        del state["files"]
        with open(os.path.join(checkpoint, "trainer_state.json"), "w") as f:
            json.dump(state, f)
        os.remove(os.path.join(checkpoint, gone))
        d[f"unlisted_{stem(gone)}"] = folder
    return d


UNLISTED = ("recipe.yaml", "optimizer.bin", "model.safetensors")


def stem(name: str) -> str:
    return name.split(".")[0]


KEPT = ("run", "broken", *(f"unlisted_{stem(gone)}" for gone in UNLISTED))  # run folders every case leaves as they were


def snapshot(folder: str) -> dict:
    out = {}
    for here, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(here, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def args_for(world, out, sets=(), flags=(), base=True):
    """The tiny run's overrides (a new folder `out`) plus `sets` and `flags`."""
    pairs = tiny_overrides(world["model"], out, **{"data.dataset_name": world["good"], "data.eval_split": None,
                                                   "train.max_steps": 2, "train.report_to": []}) if base else []
    return [a for s in [*pairs, *sets] for a in ("--set", s)] + list(flags)


# (id, sets, flags, what the one line must say, what it is about). {name} is filled from the world fixture;
# "recipe" and "data" cases must load no weights.
CASES = [
    # the recipe and the command line
    ("unknown key", ["train.learnin_rate=1e-5"], [], "did you mean 'train.learning_rate'", "recipe"),
    ("wrong type", ["train.max_steps=many"], [], "train.max_steps", "recipe"),
    ("unknown loss", ["loss.loss_type=sigmod"], [], "did you mean 'sigmoid'", "recipe"),
    ("unknown choice", ["train.optimizer=adamax"], [], "choose one of: adamw, rmsprop", "recipe"),
    ("beta inf", ["loss.beta=.inf"], [], "loss.beta is inf", "recipe"),
    ("beta nan", ["loss.beta=.nan"], [], "loss.beta is nan", "recipe"),
    ("beta zero", ["loss.beta=0"], [], "loss.beta must be positive", "recipe"),
    ("lr nan", ["train.learning_rate=.nan"], [], "train.learning_rate is nan", "recipe"),
    ("lr inf", ["train.learning_rate=.inf"], [], "train.learning_rate is inf", "recipe"),
    ("lr negative", ["train.learning_rate=-1e-5"], [], "train.learning_rate must be positive", "recipe"),
    ("logging 0", ["train.logging_steps=0"], [], "train.logging_steps must be at least 1", "recipe"),
    ("eval steps negative", ["train.eval_steps=-1"], [], "train.eval_steps must be >= 0", "recipe"),
    ("save steps negative", ["train.save_steps=-2"], [], "train.save_steps must be >= 0", "recipe"),
    ("lora dropout 2", ["lora.use_peft=true", "lora.lora_dropout=2.0"], [], "lora.lora_dropout must be in [0, 1)",
     "recipe"),
    ("lora dropout negative", ["lora.lora_dropout=-0.1"], [], "lora.lora_dropout must be in [0, 1)", "recipe"),
    ("seed negative", ["train.seed=-1"], [], "train.seed must be >= 0", "recipe"),
    ("batch 0", ["train.per_device_train_batch_size=0"], [], "must be at least 1", "recipe"),
    ("warmup ratio 2", ["train.warmup_ratio=2"], [], "train.warmup_ratio must be in [0, 1)", "recipe"),
    ("grad norm negative", ["train.max_grad_norm=-1"], [], "train.max_grad_norm must be >= 0", "recipe"),
    ("nonfinite limit 0", ["train.max_nonfinite_steps=0"], [], "train.max_nonfinite_steps must be at least 1",
     "recipe"),
    ("prompt longer than max", ["data.max_prompt_length=200", "data.max_length=100"], [],
     "must be smaller than data.max_length", "recipe"),
    ("lora r 0", ["lora.use_peft=true", "lora.lora_r=0"], [], "lora.lora_r must be at least 1", "recipe"),
    ("samples 0", ["data.max_train_samples=0"], [], "data.max_train_samples must be at least 1", "data"),
    ("adapter_off without lora", ["reference.mode=adapter_off"], [], "needs lora.use_peft", "recipe"),
    # the data
    ("data missing", ["data.dataset_name={root}/nothing.jsonl"], [], "does not exist", "data"),
    ("data csv", ["data.dataset_name={csv}"], [], "is not .jsonl, .json or .parquet", "data"),
    ("data empty jsonl", ["data.dataset_name={empty}"], [], "empty.jsonl", "data"),
    ("data corrupt line", ["data.dataset_name={corrupt}"], [], "corrupt.jsonl", "data"),
    ("data missing column", ["data.dataset_name={nocol}"], [], "rejected", "data"),
    ("data null answer", ["data.dataset_name={null}"], [], "chosen", "data"),
    ("data empty answer", ["data.dataset_name={blank}"], [], "rejected", "data"),
    ("data int answer", ["data.dataset_name={int}"], [], "chosen", "data"),
    ("data chosen == rejected", ["data.dataset_name={same}"], [], "column 'rejected' is the same as 'chosen'", "data"),
    ("data max_length tiny", ["data.dataset_name=" + os.path.join(REPO, "data", "arith_prefs"), "data.max_length=16",
                              "data.max_prompt_length=8"], [], "data.max_length", "data"),
    ("data wrong split", ["data.dataset_name=" + os.path.join(REPO, "data", "arith_prefs"),
                          "data.train_split=training"], [], "training", "data"),
    # the model
    ("model folder missing", ["model.model_name_or_path={root}/no_model"], [], "does not exist", "recipe"),
    ("model folder empty", ["model.model_name_or_path={empty_model}"], [], "holds no config.json", "recipe"),
    ("model hub id offline", ["model.model_name_or_path=SomeOrg/some-model-7b"], [], "'SomeOrg/some-model-7b'",
     "recipe"),
    ("model pickle only", ["model.model_name_or_path={pickled}"], [], "model.allow_pickle_weights", "recipe"),
    ("model gguf truncated", ["model.model_name_or_path={gguf}"], [], "truncated.gguf", "model"),
    ("tokenizer missing", ["model.tokenizer_name_or_path={root}/no_tokenizer"], [], "does not exist", "recipe"),
    ("lora target typo", ["lora.use_peft=true", "lora.lora_target_modules=[q_prj, v_proj]"], [],
     "'q_prj' matches no module of the model; did you mean 'q_proj'", "model"),
    # the run folder
    ("existing run", ["train.output_dir={run}"], [], "already holds a run; pass --resume", "recipe"),
    ("resume nothing", ["train.output_dir={root}/never"], ["--resume"], "no run started there", "recipe"),
    ("resume other batch and lr", ["train.output_dir={run}", "train.per_device_train_batch_size=8",
                                   "train.learning_rate=0.01"], ["--resume"],
     "train.per_device_train_batch_size is 8, train.learning_rate is 0.01 but", "recipe"),
    ("resume other seed", ["train.output_dir={run}", "train.seed=3"], ["--resume"], "train.seed is 3 but", "recipe"),
    ("resume broken checkpoint", ["train.output_dir={broken}"], ["--resume"], "optimizer.bin is missing", "recipe"),
    ("resume max_steps below", ["train.output_dir={run}", "train.max_steps=1"], ["--resume"],
     "train.max_steps 1 is below", "recipe"),
    ("resume unlisted without recipe", ["train.output_dir={unlisted_recipe}"], ["--resume"],
     "checkpoint-0000002 is damaged: recipe.yaml is missing", "recipe"),
    ("resume unlisted without optimizer", ["train.output_dir={unlisted_optimizer}"], ["--resume"],
     "checkpoint-0000002 is damaged: optimizer.bin is missing", "recipe"),
    ("resume unlisted without weights", ["train.output_dir={unlisted_model}"], ["--resume"],
     "checkpoint-0000002 is damaged: its weights (model.safetensors or pytorch_model.bin) are missing", "recipe"),
    ("output dir under a file", ["train.output_dir={good}/run"], [], "above it is a file, not a folder", "recipe"),
    ("output dir is a file", ["train.output_dir={good}"], [], "is a file, not a folder", "recipe"),
    # the recipe file, the model files, the machine
    ("recipe top level list", [], ["--recipe", "{list_recipe}"], "must be a YAML mapping of sections", "recipe"),
    ("num_proc 0", ["data.num_proc=0"], [], "data.num_proc must be null or at least 1", "recipe"),
    ("dataloader workers -1", ["data.dataloader_num_workers=-1"], [], "data.dataloader_num_workers must be 0",
     "recipe"),
    ("model safetensors truncated", ["model.model_name_or_path={cut_model}"], [], "is truncated or damaged",
     "recipe"),
]
# What this machine lacks: flash-attn or a tracker (not installed), a GPU (fp16 autocast on the CPU does nothing).
if importlib.util.find_spec("flash_attn") is None:
    CASES.append(("flash-attn not installed", ["model.attn_implementation=flash_attention_2"], [],
                  "pip install flash-attn (CUDA GPUs only), or set model.attn_implementation: sdpa", "recipe"))
if importlib.util.find_spec("wandb") is None:
    CASES.append(("tracker not installed", ["train.report_to=[wandb]"], [],
                  "train.report_to names wandb, which is not installed: pip install wandb", "recipe"))
if not torch.cuda.is_available():
    CASES.append(("fp16 on the cpu", ["train.mixed_precision=fp16"], [], "set train.mixed_precision: bf16 (or no)",
                  "recipe"))


@pytest.fixture
def no_weights(monkeypatch):
    """Counts weight loads (policy, reference, GGUF conversion)."""
    loads = []
    for name in ("load_causal_lm", "convert_gguf"):
        real = getattr(modeling, name)
        monkeypatch.setattr(modeling, name, lambda *a, _real=real, _name=name, **k: (loads.append(_name), _real(*a, **k))[1])
    return loads


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, world, tmp_path, capsys, no_weights):
    name, sets, flags, expected, about = case
    sets, flags = [s.format(**world) for s in sets], [f.format(**world) for f in flags]
    folders = {k: snapshot(world[k]) for k in KEPT}
    capsys.readouterr()
    rc = train.main(args_for(world, str(tmp_path / "new"), sets, flags))
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.splitlines() if line.split("\r")[-1].startswith("error:")]
    assert rc == 2 and len(lines) == 1, (rc, err[-2000:])
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    if about in ("recipe", "data"):
        assert not no_weights, f"weights loaded before refusing: {lines[0]}"
    assert {k: snapshot(world[k]) for k in folders} == folders  # byte for byte
    assert not os.path.exists(tmp_path / "new")  # no half-made run folder


def test_no_recipe_is_refused_not_a_silent_default_run(tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.chdir(tmp_path)
    assert train.main([]) == 2
    assert capsys.readouterr().err.strip().startswith("error: a recipe is required")
    assert train.main(["--recipe", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert train.main(["--recipe", str(tmp_path / "list.yaml")]) == 2
    assert "must be a YAML mapping" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("train: {max_steps: [\n")
    assert train.main(["--recipe", str(tmp_path / "bad.yaml")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert not no_weights and os.listdir(tmp_path) == ["list.yaml", "bad.yaml"] or \
        sorted(os.listdir(tmp_path)) == ["bad.yaml", "list.yaml"]


def test_output_dir_that_cannot_be_written_is_refused_before_any_model_load(world, tmp_path, capsys, monkeypatch,
                                                                           no_weights):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real = os.access  # root writes whatever the mode bits say: the folder is read-only for this test's process
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if (
        os.path.abspath(path) == str(locked) and mode & os.W_OK) else real(path, mode, *a, **k))
    try:
        assert train.main(args_for(world, str(locked / "run"))) == 2
        err = capsys.readouterr().err
        assert f"'{locked}' is not writable" in err and err.count("error:") == 1 and "Traceback" not in err
        assert not no_weights and os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_fp16_is_refused_on_the_cpu_and_kept_on_cuda(tmp_path, monkeypatch):
    recipe = load_recipe(None, tiny_overrides("unused-model", str(tmp_path / "run"), **{"train.mixed_precision": "fp16"}))
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if getattr(torch, "xpu", None) is not None:
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="train.mixed_precision is fp16 but this run is on the CPU"):
        preflight(recipe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preflight(recipe).recipe.train.mixed_precision == "fp16"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # a CPU launch on a GPU machine
    with pytest.raises(RecipeError, match="fp16 autocast does nothing"):
        preflight(recipe)


def test_a_checkpoint_file_missing_at_load_is_one_line(tmp_path):
    """What check_complete cannot know ahead (a layout it does not list) still ends in one line, not a traceback."""
    class Accelerator:
        def load_state(self, path):
            open(os.path.join(path, "optimizer.bin"), "rb")

    checkpoint = tmp_path / "checkpoint-0000002"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    with pytest.raises(RecipeError, match="checkpoint-0000002 is damaged: optimizer.bin is missing; remove"):
        load_checkpoint(Accelerator(), str(checkpoint))


def test_fsdp_launch_on_cpu_is_refused_before_any_model_load(world, tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert train.main(args_for(world, str(tmp_path / "new"))) == 2
    assert "asks for FSDP but Accelerate runs" in capsys.readouterr().err
    assert not no_weights


@pytest.mark.slow
def test_through_accelerate_launch_the_user_sees_the_one_line(world, tmp_path):
    """The launcher turns exit 2 into its own exit 1; with -q it adds no traceback of its own, so the
    `error:` line is the last thing on stderr. A data error raised after start-up takes the same path."""
    for sets, expected in ((["loss.beta=.inf"], "error: loss.beta is inf"),
                           ([f"data.dataset_name={world['corrupt']}"], "corrupt.jsonl")):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
               os.path.join(REPO, "accelerate_configs", "cpu_single.yaml"), os.path.join(REPO, "dpo_accel", "train.py"),
               *args_for(world, str(tmp_path / "new"), sets)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": REPO})
        last = proc.stderr.strip().splitlines()[-1].split("\r")[-1]
        assert proc.returncode == 1 and last.startswith("error:") and expected in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
