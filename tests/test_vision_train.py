"""A vision-language model trains end to end from the normal entry point: a tiny random LLaVA (2-layer Llama
language model with the SmolLM2 tokenizer plus ``<image>``, a 1-layer SigLIP tower, 16 image tokens) on a few
pairs of the shipped shapes task, in process, 2 steps a run.

Proves: every reference mode (adapter_off, copy, precomputed, none) trains through `VisionLogpsModel`, the
references of the starting point giving the start's 0.693 loss (full fine-tuning beside the copy leaves the
vision tower and the projector as they were); the start-up line names the layout
and why; held-out generations answer the image prompts before and after, scored by the shapes scorer;
LoRA sits on the language model only, the vision tower stays frozen and the projector trains with
``lora.train_projector``; the export holds the processor; ``--resume`` continues exactly; and the bad inputs
(images for a text-only model, a missing image file, images vs placeholders, what a VLM run cannot do yet)
each end in one ``error:`` line and exit code 2 before any weight loads.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from conftest import reset_accelerate, stop_after, vision_overrides, write_shapes
from dpo_accel import train
from dpo_accel.config.load import load_recipe
from dpo_accel.model import loading


def steps(out: str) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("mode", ["adapter_off", "copy", "precomputed", "none"])
def test_every_reference_mode_trains_the_tiny_llava(mode, llava_dir, shapes_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    extra = {"reference.mode": mode} if mode != "none" else {"loss.loss_type": "simpo"}
    if mode == "copy":  # full fine-tuning beside the frozen copy: the vision tower and projector stay frozen
        extra["lora.use_peft"] = False
    if mode == "adapter_off":  # the one run that also generates, before and after
        extra.update({"eval.generation_prompts": 2, "eval.max_new_tokens": 4, "eval.behaviour": "shapes"})
    summary = train.run(load_recipe(None, vision_overrides(llava_dir, shapes_dir, out, **extra)))
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if mode != "none":  # the policy is its reference at step 1 (LoRA B = 0, or the copy of the start)
        assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    if mode == "copy":
        from safetensors.torch import load_file

        trained, base = (load_file(os.path.join(d, "model.safetensors")) for d in (os.path.join(out, "model"), llava_dir))
        frozen = [k for k in base if "vision_tower" in k or "multi_modal_projector" in k]
        assert frozen and all(torch.equal(trained[k], base[k]) for k in frozen)
        language = [k for k in base if "language_model" in k and k.endswith("proj.weight")]
        assert language and not any(torch.equal(trained[k], base[k]) for k in language)
    assert "eval/rewards/accuracies" in summary["eval"]
    printed = capsys.readouterr().out
    assert "log-probs: vision-language model 'llava'" in printed and "| layout shared" in printed
    if mode == "adapter_off":
        assert re.search(r"self-check on \d+ pairs: equal to stacked rows within", printed)
        assert set(summary["behaviour"]["after"]) >= {"format_rate", "correct_rate"}
        with open(os.path.join(out, "generations_before.json")) as f:
            sample = json.load(f)["samples"][0]
        assert sample["prompt"].startswith("[image] ") and sample["images"][0].endswith(".png")
        assert sample["chosen"].endswith(".") and isinstance(sample["answer"], str)
        from transformers import AutoProcessor

        adapter = os.path.join(out, "adapter")
        assert AutoProcessor.from_pretrained(os.path.join(out, "model")).image_processor is not None  # exported
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            targets = json.load(f)["target_modules"]
        assert "language_model" in targets and "vision" not in targets


def test_resume_with_a_trained_projector_is_exact(llava_dir, shapes_dir, tmp_path):
    """4 steps straight == stopped after step 2 and resumed: per-step metrics and the exported adapter (LoRA
    plus the projector's trained copy); the vision tower never changes. The resumed run collates in 2
    DataLoader workers (data.dataloader_num_workers), the straight one in the training process: the workers
    make the same image tensors for the same batches in the same order."""
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    overrides = vision_overrides(llava_dir, shapes_dir, out, **{
        "lora.train_projector": True, "train.max_steps": 4, "train.per_device_train_batch_size": 2,
        "train.save_steps": 2, "train.save_total_limit": 3, "eval.do_eval": False})
    train.run(load_recipe(None, overrides))
    straight, weights = steps(out), load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert any("multi_modal_projector" in k for k in weights) and not any("vision_tower" in k for k in weights)
    stop_after(out, 2)
    reset_accelerate()
    train.run(load_recipe(None, overrides + ["data.dataloader_num_workers=2"]), resume=True)
    assert [r["step"] for r in steps(out)] == [1, 2, 3, 4]
    for a, b in zip(straight, steps(out)):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert a[key] == b[key], (a["step"], key)
    resumed = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    for name, tensor in weights.items():
        assert torch.equal(resumed[name], tensor), name
    merged = load_file(os.path.join(out, "model", "model.safetensors"))
    base = load_file(os.path.join(llava_dir, "model.safetensors"))
    tower = [k for k in base if "vision_tower" in k]
    assert tower and all(torch.equal(merged[k], base[k]) for k in tower)
    projector = [k for k in base if "multi_modal_projector" in k and k.endswith("weight")]
    assert projector and not all(torch.equal(merged[k], base[k]) for k in projector)


@pytest.fixture
def weight_loads(monkeypatch) -> list:
    """Records every weight load of a causal LM or a VLM."""
    loads = []
    for name in ("load_causal_lm", "load_image_text_lm"):
        real = getattr(loading, name)
        monkeypatch.setattr(loading, name, lambda *a, _real=real, _name=name, **k: (loads.append(_name), _real(*a, **k))[1])
    return loads


def two_images(rows):
    rows[3]["images"] = rows[3]["images"] * 2


def missing_image(rows):
    rows[5]["images"] = ["images/no_such_picture.png"]


BAD = {
    "text-only model": ({}, None, "is a text-only model"),
    "missing image": ({}, missing_image, "row 5 of split 'train': image file"),
    "placeholders": ({}, two_images, "the prompt has 1 image placeholder(s)"),
    "online": ({"train.online_generations": 2, "train.online_verifier": "arith"}, None, "online and iterative DPO"),
    "iterative": ({"train.iterative_rounds": 2, "train.online_generations": 2, "train.online_verifier": "arith"},
                  None, "iterative DPO samples text-only answers"),
    "padding-free": ({"train.padding_free": True}, None, "train.padding_free is True"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_vision_input_is_one_line_exit_2_before_weights(case, llava_dir, tiny_model_dir, tmp_path, capsys,
                                                            weight_loads):
    extra, edit, message = BAD[case]
    data = write_shapes(tmp_path / "data", edit=edit) if edit else write_shapes(tmp_path / "data")
    model = tiny_model_dir if case == "text-only model" else llava_dir
    argv = []
    for setting in vision_overrides(model, data, str(tmp_path / "run"), **extra):
        argv += ["--set", setting]
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.splitlines() if line.split("\r")[-1].startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err[-2000:]
    assert not weight_loads, f"weights loaded before refusing: {lines[0]}"
    assert not os.path.exists(tmp_path / "run")  # no half-made run folder


def test_vision_benchmark_smoke(llava_dir, tmp_path):
    """The shared-vs-stacked benchmark runs both layouts on the recipe's batches; the shared rows hold fewer
    language-model tokens (each pair's prompt and image tokens once)."""
    from benchmarks import bench_vision

    summary = bench_vision.main(["--model", llava_dir, "--pairs", "2", "--batches", "1", "--repeats", "1",
                                 "--output-dir", str(tmp_path / "run"), "--json", str(tmp_path / "v.json")])
    assert summary["shared"]["language_tokens_per_batch"] < summary["stacked"]["language_tokens_per_batch"]
    assert summary["speedup"] > 0 and (tmp_path / "v.json").exists()
