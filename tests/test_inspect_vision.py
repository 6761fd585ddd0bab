"""`python -m dpo_accel.inspect_recipe` on vision-language models, and the SmolVLM recipe for one 24 GB GPU, checked
without a GPU, a network or SmolVLM's weights.

Proves: with the shipped SmolVLM-256M-Instruct configs (model_configs/smolvlm-256m-instruct) and transformers'
own Idefics3Processor around SmolLM2's tokenizer, a 32x32 picture is 17 tiles (4 x 4 + the global image) of
64 image tokens, as many as the processor itself puts in the prompt; the whole model counts the published
~256M parameters; the recipe's estimate fits one 24 GB GPU, also with every pair at data.max_length; the
tower's FLOPs are what torch's FLOP counter counts in its forward; the peak tracker of the tower's working
set frees what is freed; offline, a config folder without a tokenizer and no model.tokenizer_name_or_path
ends in one error line. A tiny random Idefics3 built from the shipped config (same family and processor,
smaller everything): inspect's parameters and trainable parameters are those of the model the run loads,
LoRA and the trained projector placed as the run places them; and the recipe trains 2 steps with its own
settings on that model and the shapes pictures.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil

import pytest

from conftest import REPO, reset_accelerate
from dpo_accel import inspect_recipe as dinspect
from dpo_accel import inspect_vision
from dpo_accel.config.load import load_recipe
from dpo_accel.config.schema import ModelConfig

SMOLVLM = os.path.join(REPO, "recipes", "smolvlm_rlaifv_lora.yaml")
SMOLVLM_CONFIG = os.path.join(REPO, "model_configs", "smolvlm-256m-instruct")
SHAPES = os.path.join(REPO, "data", "shapes_prefs")
GiB = 1024 ** 3
TILE, PATCH = 64, 8  # the tiny Idefics3's tiles: (64 / 8)^2 / 4^2 = 4 image tokens each


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run_inspect(recipe_path: str, *flags: str, sets=()):
    args = dinspect.parse_args(["--recipe", recipe_path, *flags] + [x for s in sets for x in ("--set", s)])
    return dinspect.report(load_recipe(args.recipe, args.set), args)


def write_shapes(folder, train_rows: int, test_rows: int) -> str:
    """The first shipped shapes pairs in `folder`, their pictures linked."""
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", train_rows), ("test", test_rows)):
        with open(os.path.join(SHAPES, f"{split}.jsonl")) as f, open(os.path.join(folder, f"{split}.jsonl"), "w") as g:
            g.writelines(next(f) for _ in range(n))
    os.symlink(os.path.join(SHAPES, "images"), os.path.join(folder, "images"))
    return str(folder)


@pytest.fixture(scope="module")
def shapes_five(tmp_path_factory) -> str:
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data", 4, 1)


@functools.lru_cache(maxsize=None)
def smolvlm_dry_run(data: str, tokenizer: str, *flags: str):
    """The recipe's dry run (once per session) on `data`, the SmolVLM processor around SmolLM2's tokenizer."""
    sets = [f"model.tokenizer_name_or_path={tokenizer}", f"data.dataset_name={data}", "data.eval_split=test"]
    return run_inspect(SMOLVLM, *flags, sets=sets)


@pytest.fixture
def smolvlm_report(shapes_five, smol_dir, offline):
    return smolvlm_dry_run(shapes_five, smol_dir, "--model-config", SMOLVLM_CONFIG, "--gpu", "24GB")


def test_a_picture_is_17_tiles_of_64_image_tokens_as_the_processor_puts_them(smolvlm_report):
    from PIL import Image

    text, numbers = smolvlm_report
    vision = numbers["vision"]
    processor = vision.processor
    assert type(processor).__name__ == "Idefics3Processor" and processor.image_seq_len == 64
    tokens, inputs = vision.counts["train"]
    assert list(tokens) == [17 * 64] * 4 and list(inputs) == [17] * 4  # 4 x 4 tiles + the global image
    assert vision.input_shape == (3, 512, 512) and vision.patches == (512 // 16) ** 2
    with open(os.path.join(SHAPES, "train.jsonl")) as f:
        row = json.loads(next(f))
    prompt = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    image = Image.open(os.path.join(SHAPES, row["images"][0]))
    ids = processor(text=[prompt], images=[image], add_special_tokens=False)["input_ids"][0]
    assert ids.count(processor.image_token_id) == tokens[0] == 1088
    assert processor.image_token_id == 49190 and processor.tokenizer.eos_token == "<end_of_utterance>"
    assert "train   1088/1088/1088/1088" in text and "17/17/17/17" in text


def test_smolvlm_recipe_fits_one_24gb_gpu(shapes_five, smol_dir, offline):
    """The command of the recipe's header, offline: SmolLM2's tokenizer, 4 + 1 shapes pairs for the data."""
    text, numbers = smolvlm_dry_run(shapes_five, smol_dir, "--model-config", SMOLVLM_CONFIG, "--gpu", "24GB")
    print(text)
    facts = numbers["facts"]
    assert facts.model_type == "idefics3" and (facts.layers, facts.hidden, facts.vocab) == (30, 576, 49280)
    assert facts.params == 256_484_928  # SmolVLM-256M: tower 86.4M + projector 7.1M + language model 163.0M
    assert numbers["layout"] == "shared" and numbers["plan"].reference_mode == "adapter_off"
    rows, width = numbers["batches"].longest["shared"]
    assert rows == 4 and width > 1088  # the image tokens are in the language model's width
    est = numbers["estimates"]["24GB"]
    assert est.tower > 0 and est.total <= 24 * GiB
    assert "  fits: yes (" in text  # the data's micro-batches, and every pair at data.max_length:
    assert re.search(r"every pair at data.max_length \(4 rows x \d+ tokens, 68 tower inputs\): [\d.]+ GiB, fits: yes",
                     text)
    assert "vision         tower 86.4M parameters (frozen)" in text


def test_a_config_folder_without_a_tokenizer_names_the_setting(capsys, offline):
    """Offline, the recipe's hub tokenizer cannot load: one error line, exit code 2, naming the key to set."""
    code = dinspect.main(["--recipe", SMOLVLM, "--model-config", SMOLVLM_CONFIG, "--gpu", "24GB"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "set model.tokenizer_name_or_path" in err[0]


def test_tower_flops_are_what_torch_counts(smolvlm_report):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    vision = smolvlm_report[1]["vision"]
    recipe = load_recipe(SMOLVLM)
    params = inspect_vision.vision_params(vision.config, recipe)
    model = inspect_vision.meta_vlm(vision.config, recipe, torch.bfloat16)
    counter = FlopCounterMode(display=False)
    assert inspect_vision.tower_forward(model, (3, 512, 512), torch.bfloat16, counter) == (1, 1024, 768)
    estimated = inspect_vision.tower_flops(vision, params, 1, 0, 1, False)
    assert estimated == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_the_peak_tracker_frees_what_is_freed():
    import torch

    with inspect_vision.PeakLive() as mode:
        a = torch.zeros(1000, device="meta")  # 4,000 bytes
        b = a * 2
        del a
        c = b + 1
        c.mul_(3)  # in place: no new bytes
        d = c.view(10, 100)  # a view: none either
    assert mode.peak == 8_000 and mode.live == 8_000
    del b, c, d
    assert mode.live == 0


# ------------------------------------------------------------------------------------------ a tiny Idefics3

@pytest.fixture(scope="module")
def tiny_idefics3(smol_dir, tmp_path_factory) -> str:
    """A random Idefics3 of the shipped config's family with everything smaller (64-pixel tiles, 4 image tokens
    each), saved with the processor inspect builds from the shipped folder (its tile sizes shrunk alike)."""
    import torch
    from transformers import AutoConfig, AutoProcessor, Idefics3ForConditionalGeneration

    from dpo_accel.model.tiny_vlm import set_generation_tokens

    path = str(tmp_path_factory.mktemp("tiny_idefics3"))
    shutil.copytree(inspect_vision.stand_in_processor(SMOLVLM_CONFIG, ModelConfig(tokenizer_name_or_path=smol_dir)),
                    path, dirs_exist_ok=True)
    for name, changes in (("preprocessor_config.json", {"size": {"longest_edge": 4 * TILE},
                                                         "max_image_size": {"longest_edge": TILE}}),
                          ("processor_config.json", {"image_seq_len": (TILE // PATCH) ** 2 // 16})):
        with open(os.path.join(path, name)) as f:
            values = {**json.load(f), **changes}
        with open(os.path.join(path, name), "w") as f:
            json.dump(values, f)
    with open(os.path.join(SMOLVLM_CONFIG, "config.json")) as f:
        raw = json.load(f)
    raw["text_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8)
    raw["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH)
    processor = AutoProcessor.from_pretrained(path)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(AutoConfig.for_model(**raw))
    set_generation_tokens(model, processor.tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("train_projector", [False, True], ids=["lora", "lora+projector"])
def test_parameters_are_those_of_the_model_the_run_loads(train_projector, tiny_idefics3, tmp_path, offline):
    from dpo_accel.model.loading import count_parameters, load_image_text_lm, load_vision_policy

    data = write_shapes(tmp_path / "data", 4, 1)
    sets = [f"model.model_name_or_path={tiny_idefics3}", f"data.dataset_name={data}",
            f"lora.train_projector={str(train_projector).lower()}", "model.gradient_checkpointing=false"]
    text, numbers = run_inspect(SMOLVLM, sets=sets)
    facts, vision = numbers["facts"], numbers["vision"]
    recipe = load_recipe(SMOLVLM, sets)
    plain = load_image_text_lm(tiny_idefics3, recipe.model)
    assert facts.params == count_parameters(plain)[1]
    params = inspect_vision.vision_params(vision.config, recipe)
    assert params.tower == sum(p.numel() for p in plain.model.vision_model.parameters())
    assert params.projector == sum(p.numel() for p in plain.model.connector.parameters())
    trainable, _ = count_parameters(load_vision_policy(recipe.model, recipe.lora, tiny_idefics3))
    assert facts.trainable == trainable
    tokens, inputs = vision.counts["train"]
    assert list(inputs) == [17] * 4 and list(tokens) == [17 * 4] * 4  # 4 x 4 tiles + global, 4 tokens a tile
    assert ("projector (saved for backward)" in text) == train_projector
    est = numbers["estimates"]["cpu (this machine)"]
    assert (est.projector > 0) == train_projector and est.tower > 0


@pytest.mark.slow  # about 15 s on 2 CPU cores: the recipe's own 4 micro-batches of 4 pairs per step
def test_recipe_trains_two_steps_on_a_tiny_idefics3(tiny_idefics3, tmp_path, offline, capsys):
    from dpo_accel.train import run

    reset_accelerate()
    data = write_shapes(tmp_path / "data", 32, 4)
    overrides = [f"model.model_name_or_path={tiny_idefics3}", f"data.dataset_name={data}", "train.max_steps=2",
                 f"train.output_dir={tmp_path / 'run'}", "train.report_to=[]", "eval.generation_prompts=0"]
    recipe, kept = load_recipe(SMOLVLM, overrides), load_recipe(SMOLVLM)
    assert (recipe.train.gradient_accumulation_steps, recipe.train.per_device_train_batch_size, recipe.lora,
            recipe.model.gradient_checkpointing, recipe.data.max_length) == \
        (kept.train.gradient_accumulation_steps, kept.train.per_device_train_batch_size, kept.lora,
         kept.model.gradient_checkpointing, kept.data.max_length)
    summary = run(recipe)
    assert summary["global_step"] == 2 and math.isfinite(summary["eval"]["eval/loss"])
    printed = capsys.readouterr().out
    assert "log-probs: vision-language model 'idefics3'" in printed and "| layout shared" in printed
    assert os.path.isdir(tmp_path / "run" / "adapter")
