"""Scale-out on CPU with real gloo ranks: DDP, FSDP2 and multi-node runs equal one process; every
shipped GPU-only config is read by Accelerate's own launcher code; reference placement per backend.

The equivalence runs share one in-process baseline (1 process x 4 pairs, 4 steps, 7 eval pairs) and
each launch asserts its process count. Run as a script (``__main__`` below), this file is the FSDP2 and
DeepSpeed launch target: Accelerate 1.15 turns such a launch on CPU-only processes into DDP (MULTI_CPU),
so the script switches that one state field (FSDP) or lets Accelerate take its DeepSpeed branch over the
same gloo group, then runs the real train.py code path.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, REPO, free_port, paired_steps, reset_accelerate, tiny_overrides

TRAIN = os.path.join(REPO, "dpo_accel", "train.py")
STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "grad_norm", "learning_rate")
EVAL_KEYS = ("eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/accuracies",
             "eval/rewards/margins", "eval/logps/chosen", "eval/logps/rejected")
EVAL_PAIRS = 7  # not a multiple of the 2 x 2 global eval batch: the last batch is uneven on 2 ranks
LORA = {"lora.use_peft": True, "lora.lora_r": 4, "lora.lora_alpha": 8, "lora.lora_dropout": 0.0,
        "train.learning_rate": 5e-3}


# ------------------------------------------------------------------------------------------ helpers

def run_overrides(model_dir: str, out: str, per_device: int, **extra) -> list[str]:
    """4 optimizer steps of a 4-pair global batch; eval over 7 pairs; float32 whatever the launch config."""
    return tiny_overrides(model_dir, out, **{
        "train.per_device_train_batch_size": per_device, "train.per_device_eval_batch_size": per_device,
        "data.max_eval_samples": EVAL_PAIRS, "train.mixed_precision": "\"no\"", "train.report_to": [], **extra})


def read_run(out: str) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {"steps": [r for r in rows if "loss" in r], "eval": summary["eval"], "data": summary["data"], "out": out}


def run_here(model_dir: str, out: str, per_device: int, **extra) -> dict:
    """One process, in this interpreter."""
    from dpo_accel import train
    from dpo_accel.config.load import load_recipe

    reset_accelerate()
    try:
        train.run(load_recipe(None, run_overrides(model_dir, out, per_device, **extra)))
    finally:
        reset_accelerate()
    return read_run(out)


def env() -> dict:
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def launch(model_dir: str, out: str, per_device: int, processes: int, launch_args: list, script: str = TRAIN,
           script_args: tuple = (), **extra) -> dict:
    """`accelerate launch` of `script` as a subprocess; asserts that `processes` ranks ran."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, script, *script_args]
    for s in run_overrides(model_dir, out, per_device, **extra):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert f"| {processes} process(es)" in proc.stdout, proc.stdout[-2000:]
    return {**read_run(out), "stdout": proc.stdout}


def weights(out: str, kind: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    return load_file(os.path.join(out, kind, name))


def assert_same_run(a: dict, b: dict, rel: float, abs_: float, kinds: tuple = ("model",), w_atol: float = 1e-4):
    """Same loss curve (every logged step metric, grad_norm included), same eval metrics, same exported
    weights. AdamW divides by sqrt(v): where a gradient is ~0 it turns the rounding of another summation
    order into up to a fraction of one step (lr 1e-3); w_atol 1e-4 is a tenth of one step."""
    assert [r["step"] for r in a["steps"]] == [r["step"] for r in b["steps"]] == [1, 2, 3, 4]
    metric_rel = 0.0
    for ra, rb in paired_steps(a["steps"], b["steps"]):
        for key in STEP_KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=rel, abs=abs_), (ra["step"], key, ra[key], rb[key])
            metric_rel = max(metric_rel, abs(rb[key] - ra[key]) / max(abs(ra[key]), 1e-12))
    for key in EVAL_KEYS:
        assert b["eval"][key] == pytest.approx(a["eval"][key], rel=rel, abs=abs_), key
        metric_rel = max(metric_rel, abs(b["eval"][key] - a["eval"][key]) / max(abs(a["eval"][key]), 1e-12))
    weight_abs = {}
    for kind in kinds:
        wa, wb = weights(a["out"], kind), weights(b["out"], kind)
        assert wa.keys() == wb.keys() and wa
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], atol=w_atol, rtol=1e-4, msg=f"{kind}: {name}")
        weight_abs[kind] = max(float((wb[n] - wa[n]).abs().max()) for n in wa)
    # What the README's table quotes (pytest -s shows it).
    print(f"\nlargest differences: metrics {metric_rel:.1e} relative; weights "
          + ", ".join(f"{k} {v:.1e}" for k, v in weight_abs.items()))


# ------------------------------------------------------------------------------------------ baselines

@pytest.fixture(scope="module")
def full_baseline(tiny_model_dir, tmp_path_factory) -> dict:
    """Full fine-tuning, frozen-copy reference, 1 process x 4 pairs."""
    return run_here(tiny_model_dir, str(tmp_path_factory.mktemp("full") / "run"), 4)


@pytest.fixture(scope="module")
def lora_baseline(tiny_model_dir, tmp_path_factory) -> dict:
    """LoRA, adapter-off reference, 1 process x 4 pairs."""
    return run_here(tiny_model_dir, str(tmp_path_factory.mktemp("lora") / "run"), 4, **LORA)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_baselines_learn_and_have_an_uneven_eval_split(variant, request):
    baseline = request.getfixturevalue(f"{variant}_baseline")
    assert baseline["data"]["eval"]["kept"] == EVAL_PAIRS
    losses = [r["loss"] for r in baseline["steps"]]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert losses[-1] < losses[0] - 0.01  # it learns, so equal curves are not trivially equal


def test_gradient_accumulation_2x2_equals_1x4(full_baseline, tiny_model_dir, tmp_path):
    accumulated = run_here(tiny_model_dir, str(tmp_path / "ga"), 2, **{"train.gradient_accumulation_steps": 2})
    assert_same_run(full_baseline, accumulated, rel=1e-4, abs_=1e-5)


# ------------------------------------------------------------------------------------ multi-process

@pytest.mark.slow
def test_ddp_two_ranks_x2_equal_one_rank_x4_full_finetune(full_baseline, tiny_model_dir, tmp_path):
    """(a) DDP, frozen replica reference: loss curve, eval over an uneven last batch (c), weights."""
    double = launch(tiny_model_dir, str(tmp_path / "ddp"), 2, 2,
                    ["--config_file", os.path.join(CONFIGS, "cpu_two_process.yaml"), "--main_process_port",
                     str(free_port())])
    assert "reference placement: frozen replica on each of 2 process(es)" in double["stdout"]
    assert_same_run(full_baseline, double, rel=1e-4, abs_=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_fsdp2_two_ranks_x2_equal_one_rank_x4(variant, request, tiny_model_dir, tmp_path):
    """(b) the shipped fsdp2.yaml on 2 CPU gloo ranks. Full: policy and frozen-copy reference sharded.
    LoRA: sharded policy, adapter-off reference. Both export from the gathered weights."""
    baseline = request.getfixturevalue(f"{variant}_baseline")
    extra = {} if variant == "full" else LORA
    sharded = launch(tiny_model_dir, str(tmp_path / "fsdp"), 2, 2,
                     ["--config_file", os.path.join(CONFIGS, "fsdp2.yaml"), "--num_processes", "2",
                      "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port",
                      str(free_port())], script=os.path.abspath(__file__), **extra)
    if variant == "full":
        # Each process holds half of every decoder layer and of the root (embeddings, norm, tied head).
        line = next(l for l in sharded["stdout"].splitlines() if "reference placement" in l)
        assert "sharded with FSDP2" in line and "on each of 2 process(es)" in line, line
        local, total = (float(x.rstrip("M")) for x in line.split(", ")[-1].split(" parameters")[0].split(" of "))
        assert local == pytest.approx(total / 2, rel=0.01), line
    kinds = ("model",) if variant == "full" else ("adapter", "model")
    assert_same_run(baseline, sharded, rel=1e-4, abs_=1e-5, kinds=kinds)


@pytest.mark.slow
@pytest.mark.parametrize("config,variant", [("deepspeed_zero2.yaml", "full"), ("deepspeed_zero3.yaml", "full"),
                                            ("deepspeed_zero3.yaml", "lora")])
@pytest.mark.slow
def test_deepspeed_two_ranks_x2_equal_one_rank_x4(config, variant, request, tiny_model_dir, tmp_path):
    """The shipped ZeRO configs on 2 CPU gloo ranks, where the deepspeed package is installed (CI has
    none: there the configs are only validated, below). ZeRO-2 keeps a replica reference, ZeRO-3 shards
    it with deepspeed.initialize; both export a full model gathered on the main process."""
    pytest.importorskip("deepspeed")
    baseline = request.getfixturevalue(f"{variant}_baseline")
    extra = {} if variant == "full" else dict(LORA)
    if "zero3" in config:
        # One LM-head chunk per forward: ZeRO-3 gathers the head's weights at every call, so processes
        # with different numbers of label positions (hence chunks) wait on each other forever.
        extra["train.logps_chunk_size"] = 100_000
    run = launch(tiny_model_dir, str(tmp_path / "ds"), 2, 2,
                 ["--config_file", os.path.join(CONFIGS, config), "--num_processes", "2", "--mixed_precision", "no",
                  "--main_process_port", str(free_port())], script=os.path.abspath(__file__), **extra)
    if variant == "full":
        line = next(l for l in run["stdout"].splitlines() if "reference placement" in l)
        assert ("sharded with DeepSpeed ZeRO-3" if "zero3" in config else "frozen replica") in line, line
    # The start-up line counts the whole model, not one rank's ZeRO-3 partition (numel() is 0 there).
    line = next(l for l in run["stdout"].splitlines() if "trainable of" in l)
    from transformers import AutoModelForCausalLM
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()) / 1e6
    assert float(line.split("trainable of ")[1].split("M")[0]) == pytest.approx(base, abs=0.1), line
    if variant == "full":
        assert f"frozen copy ({base:.1f}M params)" in line, line
    assert_same_run(baseline, run, rel=1e-4, abs_=1e-5, kinds=("model",) if variant == "full" else ("adapter", "model"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_run_resumes_exactly(config, tiny_model_dir, tmp_path):
    """A sharded 2-rank run (full fine-tuning, sharded reference) checkpointed at step 2 and resumed
    gives the same steps 3-4, eval and exported weights as the same run straight through: the sharded
    optimizer state, scheduler, sampler position and RNG all come back."""
    if "deepspeed" in config:
        pytest.importorskip("deepspeed")
    out = str(tmp_path / "run")
    extra = {"train.save_steps": 2, "train.save_total_limit": 3}
    if "zero3" in config:
        extra["train.logps_chunk_size"] = 100_000  # one LM-head chunk per forward (see the ZeRO test above)

    def run(*script_args):
        return launch(tiny_model_dir, out, 2, 2,
                      ["--config_file", os.path.join(CONFIGS, config), "--num_processes", "2", "--mixed_precision",
                       "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())],
                      script=os.path.abspath(__file__), script_args=script_args, **extra)

    straight = run()
    straight["out"] = str(tmp_path / "straight")  # keep its exported model: the resumed run rewrites out/model
    shutil.copytree(os.path.join(out, "model"), os.path.join(straight["out"], "model"))
    checkpoints = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-0000002", "checkpoint-0000004"]
    shutil.rmtree(os.path.join(checkpoints, "checkpoint-0000004"))  # as if stopped after step 2
    resumed = run("--resume")
    assert "resumed at step 2" in resumed["stdout"]
    assert_same_run(straight, resumed, rel=1e-5, abs_=1e-6, kinds=("model",), w_atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp2.yaml", "deepspeed_zero3.yaml"])
def test_generation_under_a_sharded_policy(config, tiny_model_dir, tmp_path):
    """eval.generation_prompts > 0 under FSDP2 and ZeRO-3 (full fine-tuning: every weight sharded): the run
    finishes, and the answers before training are exactly those of the unsharded starting model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_accel.evaluation.generation import generate_answers

    if "deepspeed" in config:
        pytest.importorskip("deepspeed")
    extra = {"eval.generation_prompts": 3, "eval.max_new_tokens": 6, "train.max_steps": 2}
    if "zero3" in config:
        extra["train.logps_chunk_size"] = 100_000  # one LM-head chunk per forward (see the ZeRO test above)
    out = str(tmp_path / "run")
    run = launch(tiny_model_dir, out, 2, 2,
                 ["--config_file", os.path.join(CONFIGS, config), "--num_processes", "2", "--mixed_precision", "no",
                  "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())],
                 script=os.path.abspath(__file__), **extra)
    assert "generated 3 held-out answers" in run["stdout"]
    reports = {}
    for when in ("before", "after"):
        with open(os.path.join(out, f"generations_{when}.json")) as f:
            reports[when] = json.load(f)
        assert len(reports[when]["samples"]) == 3
    prompts = [s["prompt"] for s in reports["before"]["samples"]]
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = generate_answers(start, AutoTokenizer.from_pretrained(tiny_model_dir), prompts, 6)
    assert [s["answer"] for s in reports["before"]["samples"]] == expected
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["behaviour"]["after"]


METRICS_SCRIPT = """
import sys
from collections import defaultdict

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

sys.path.insert(0, sys.argv[1])
from dpo_accel.evaluation.metrics import MetricAccumulator, token_counts

accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2
rows = [{"chosen_input_ids": torch.arange(5) + i, "chosen_attention_mask": (torch.arange(5) < 2 + i % 4).long(),
         "idx": i} for i in range(7)]  # 7 rows, 2 per process: the last global batch repeats a row
loader = accelerator.prepare_data_loader(DataLoader(rows, batch_size=2))
accumulator, values, tokens, pairs = MetricAccumulator(accelerator), defaultdict(list), 0.0, 0
for batch in loader:
    noise = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(int(i))) for i in batch["idx"]])
    metrics = {"loss": noise * 3.7 + 1 / 3, "rewards/margins": torch.log1p(noise) - 0.1 * batch["idx"]}
    gathered = accelerator.gather_for_metrics(metrics)  # what the accumulator did per micro-batch before
    for key, value in gathered.items():
        values[key].append(value.float().cpu())
    count = torch.tensor(token_counts(batch, "concat"), dtype=torch.float64)
    tokens += float(accelerator.reduce(count, reduction="sum")[0])
    pairs += int(gathered["loss"].numel())
    accumulator.add(metrics, batch)
report = accumulator.collect()
per_batch = {key: float(torch.cat(v).mean()) for key, v in values.items()}
assert report.means == per_batch, (report.means, per_batch)
assert (report.tokens, report.pairs) == (tokens, pairs) and pairs == 7, (report, tokens, pairs)
print("identical", report.means, report.tokens, report.pairs)
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # a gloo group left to the interpreter's exit can abort a rank
"""


@pytest.mark.slow
def test_metrics_gathered_once_equal_the_per_micro_batch_gather(tmp_path):
    """2 gloo ranks, 7 rows in batches of 2 (the last one padded with a repeated row): one gather per logging
    step gives exactly (==) the means, token and pair counts that gather_for_metrics per micro-batch gave."""
    script = tmp_path / "metrics_once.py"
    script.write_text(METRICS_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(CONFIGS, "cpu_two_process.yaml"), "--main_process_port", str(free_port()), str(script), REPO]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("identical") == 2  # both ranks checked


@pytest.mark.slow
def test_two_machines_from_the_slurm_script_equal_one_process_lora(lora_baseline, tiny_model_dir, tmp_path):
    """slurm_multinode.sh + multi_node.yaml, each 'machine' a localhost launch of 1 process: 2 ranks x 2
    pairs of LoRA with the adapter-off reference equal 1 process x 4 pairs."""
    out = str(tmp_path / "nodes")
    sets = []
    for s in run_overrides(tiny_model_dir, out, 2, **LORA):
        sets += ["--set", s]
    common = {**env(), "NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    script, recipe = os.path.join(CONFIGS, "slurm_multinode.sh"), tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  seed: 42\n")  # the defaults, as in the baseline; the overrides do the rest
    nodes = [subprocess.Popen(["bash", script, str(recipe), *sets], cwd=REPO, text=True,
                              env={**common, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "| 2 process(es)" in results[0][0], results[0][0][-2000:]
    double = read_run(out)
    assert_same_run(lora_baseline, double, rel=1e-4, abs_=1e-5, kinds=("adapter", "model"))


# --------------------------------------------------------------------- configs, through Accelerate

ONLINE_SCORER = """
def by_length(prompts, answers):
    return [float(len(a)) for a in answers]
"""


@pytest.mark.slow
def test_online_generation_under_fsdp2_gathers_the_sharded_policy(tiny_model_dir, tmp_path):
    """Online DPO under FSDP2 on 2 gloo ranks (full fine-tuning, every weight sharded): each rank's prompts are
    answered by the gathered policy (a sharded forward needs every rank, and ranks decode different lengths), so
    the run takes its steps, counts every prompt of both ranks, evaluates every step and finishes."""
    scorer = tmp_path / "scorer.py"
    scorer.write_text(ONLINE_SCORER)
    out = str(tmp_path / "run")
    run = launch(tiny_model_dir, out, 2, 2,
                 ["--config_file", os.path.join(CONFIGS, "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision",
                  "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())],
                 script=os.path.abspath(__file__), **{
                     "train.online_generations": 2, "train.online_verifier": f"{scorer}:by_length",
                     "train.online_max_new_tokens": 6, "train.max_steps": 2, "train.eval_steps": 1,
                     "train.online_missing_eos_penalty": 0.0})
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    online = [r for r in rows if "online/prompts" in r]
    assert [r["step"] for r in online] == [1, 2] and all(r["online/prompts"] == 4 for r in online)
    assert [r["step"] for r in rows if "eval/loss" in r] == [1, 2]  # eval_steps 1, and the final evaluation
    assert run["eval"]["eval/loss"] > 0


@pytest.mark.slow
def test_reward_model_under_fsdp2_exports_the_gathered_classifier(tiny_model_dir, tmp_path):
    """A reward model (loss_type bradley_terry, full fine-tuning) under FSDP2 on 2 gloo ranks: the export is the
    whole classifier gathered from both ranks' shards, loadable by AutoModelForSequenceClassification, every
    weight of its trained (not its initial) value and full shape."""
    from transformers import AutoModelForSequenceClassification

    out = str(tmp_path / "run")
    launch(tiny_model_dir, out, 2, 2,
           ["--config_file", os.path.join(CONFIGS, "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())],
           script=os.path.abspath(__file__), **{"loss.loss_type": "bradley_terry", "train.max_steps": 2})
    exported = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "model"))
    start = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    trained = dict(exported.named_parameters())
    for name, tensor in start.named_parameters():
        if name.startswith("score"):
            continue  # a new head: its start is random
        assert trained[name].shape == tensor.shape, name
    moved = [n for n, t in start.named_parameters() if not n.startswith("score") and not torch.equal(trained[n], t)]
    assert len(moved) > len(trained) // 2  # the gathered weights are the trained ones


def launcher_args(config: str, *extra: str):
    """The launch arguments `accelerate launch --config_file config` resolves (config merged in)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", os.path.join(CONFIGS, config), *extra, TRAIN])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args


def test_fsdp2_config_gives_the_fsdp2_plugin_train_py_needs(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launcher_args("fsdp2.yaml")
    assert args.use_fsdp and args.num_processes == 8 and args.mixed_precision == "bf16"
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and not plugin.cpu_ram_efficient_loading


@pytest.mark.parametrize("config,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_give_the_zero_stage_asked_for_in_bf16(config, stage, monkeypatch):
    """Read as `accelerate launch` reads them (no deepspeed package needed for that)."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from dpo_accel.model.distributed import deepspeed_config_for_reference

    args = launcher_args(config)
    assert args.use_deepspeed and args.num_processes == 8 and args.mixed_precision == "bf16"
    _, launch_env = prepare_deepspeed_cmd_env(args)
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in launch_env  # the recipe's value is used
    for key, value in launch_env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")
    cfg = plugin.deepspeed_config
    assert cfg["zero_optimization"]["stage"] == stage and cfg["bf16"]["enabled"] is True
    assert cfg["gradient_clipping"] == 1.0 and cfg["gradient_accumulation_steps"] == "auto"
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert plugin.zero3_init_flag is (stage == 3)
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)  # full export

    ref = deepspeed_config_for_reference({**cfg, "optimizer": {"type": "AdamW"}}, hidden_size=64)
    assert "optimizer" not in ref and ref["zero_optimization"]["stage"] == stage
    assert ref["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert cfg["zero_optimization"].get("stage3_param_persistence_threshold", "auto") == "auto"  # copy, not changed


def test_multi_node_config_and_slurm_script_agree():
    args = launcher_args("multi_node.yaml")
    assert args.multi_gpu and args.num_machines == 2 and args.num_processes == 16 and args.rdzv_backend == "static"
    script = open(os.path.join(CONFIGS, "slurm_multinode.sh")).read()
    assert "accelerate_configs/multi_node.yaml" in script and "--machine_rank" in script
    subprocess.run(["bash", "-n", os.path.join(CONFIGS, "slurm_multinode.sh")], check=True)


# ------------------------------------------------------------------------- placement, in one process

def test_replica_reference_is_frozen_unwrapped_and_in_eval_mode(tiny_model_dir):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from dpo_accel.model.distributed import backend_name, place_reference, reference_load_device
    from dpo_accel.model.logps import PreferenceLogpsModel

    accelerator = Accelerator(cpu=True)
    module = PreferenceLogpsModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir).train())
    placed = place_reference(accelerator, module)
    assert backend_name(accelerator) == "single" and reference_load_device(accelerator) == accelerator.device
    assert placed is module and not placed.training and not placed.model.training
    assert not any(p.requires_grad for p in placed.parameters())


def test_fsdp_launch_on_cpu_processes_is_refused_not_silently_ddp(monkeypatch):
    """Accelerate 1.15 runs an FSDP (or DeepSpeed) launch on CPU-only processes as DDP without a word."""
    from accelerate import Accelerator

    from dpo_accel.model.distributed import check_backend
    from dpo_accel.config.errors import RecipeError

    check_backend(Accelerator(cpu=True))  # nothing asked for: fine
    reset_accelerate()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type.value == "NO"
    with pytest.raises(RecipeError, match="asks for FSDP but Accelerate runs NO on cpu"):
        check_backend(accelerator)


def test_zero3_reference_without_deepspeed_says_what_to_install(monkeypatch):
    from dpo_accel.model.distributed import deepspeed_reference
    from dpo_accel.config.errors import RecipeError

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails as if not installed
    with pytest.raises(RecipeError, match="pip install deepspeed"):
        deepspeed_reference(torch.nn.Linear(2, 2), accelerator=None)


def test_gathered_copy_merges_like_the_original_and_saves_tied_weights_once(tiny_model_dir, tmp_path):
    """What export_model does with a gathered FSDP2 / ZeRO-3 state dict (separate tensors, both tied keys)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dpo_accel.model.distributed import gathered_copy, is_sharded

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert "base_model.model.lm_head.weight" in gathered and not is_sharded(model)
    plain = gathered_copy(model, gathered)
    base = plain.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(plain(ids).logits, expected)
        merged = plain.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))


def test_memory_plan_per_backend():
    """Hand-checked: 100 parameters, all trainable, copy reference, 4 processes."""
    from dpo_accel.model.distributed import memory_per_device

    assert memory_per_device("single", 1, 100, 100, "copy").total == 400 + 400 + 800 + 400
    # bf16 weights trained in full: bf16 gradients and AdamW moments; a LoRA adapter stays float32 over a bf16 base
    assert memory_per_device("single", 1, 100, 100, "copy", 2, 2).total == 200 + 200 + 400 + 200
    assert memory_per_device("single", 1, 100, 10, "adapter_off", 2, 4).total == 200 + 40 + 80
    assert memory_per_device("ddp", 4, 100, 100, "copy").gradients == 800  # + the DDP bucket copy
    assert memory_per_device("fsdp2", 4, 100, 100, "copy").total == (400 + 400 + 800 + 400) / 4
    z2 = memory_per_device("zero2", 4, 100, 100, "copy")
    assert (z2.weights, z2.gradients, z2.optimizer, z2.reference) == (200, 50, 300, 200)
    z3 = memory_per_device("zero3", 4, 100, 10, "adapter_off")
    assert (z3.weights, z3.gradients, z3.optimizer, z3.reference) == (50, 5, 30, 0)


# ------------------------------------------------------ FSDP2 / DeepSpeed on CPU: the launch target

def _run_sharded_on_cpu(argv: list) -> int:
    """train.main with Accelerate's state switched from MULTI_CPU to FSDP or DeepSpeed, as the launch
    config asks (see the module docstring); everything else is the ordinary code path."""
    sys.path.insert(0, REPO)
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from dpo_accel import train

    init = AcceleratorState.__init__
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        def init_sharded(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        PartialState(cpu=True)  # the gloo group train.py would get; DeepSpeed then reuses it

        def init_sharded(self, *args, **kwargs):
            init(self, *args, **{**kwargs, "cpu": False})  # Accelerate takes the DeepSpeed branch only without cpu
    else:
        raise SystemExit("launch this file with an FSDP or DeepSpeed accelerate config")
    AcceleratorState.__init__ = init_sharded
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(_run_sharded_on_cpu(sys.argv[1:]))
