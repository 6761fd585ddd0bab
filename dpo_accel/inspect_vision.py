"""What inspect adds for a vision-language model (VLM): its processor's tokens, the images per pair, the whole
model's parameters and the vision tower's share of memory and FLOPs, from the config alone (no weights).

`dpo_accel.inspect_recipe` takes this path when the model's config is one ``AutoModelForImageTextToText`` maps,
with a vision config (`is_vision_config`: the rule `model.loading.vision_model_type` applies to a model folder).

  processor   the run's own (`model.loading.load_processor`), so the tokenised data is the run's cache; with
              --model-config naming a folder that ships a processor's configs but no tokenizer (as
              model_configs/smolvlm-256m-instruct does), the processor transformers builds from that folder
              around the tokenizer model.tokenizer_name_or_path names (else the recipe's model's), to which the
              tokens the folder's tokenizer_config.json declares are added at their ids (`stand_in_processor`).
  data        loaded and tokenised as the run does (`data.vision`); per pair: image tokens (the prompt's
              positions of the processor's image token, which the projector's outputs fill) and tower inputs
              (the images, or the tiles of a split image, the vision tower runs on: every dim of the pair's
              pixel array but the last three, channels x height x width), counted at tokenisation from the
              processor's output and kept per pair (`data.vision.tower_inputs`), as the cache keeps no pixels.
  parameters  the meta model of ``AutoModelForImageTextToText.from_config`` (tower + projector + language model);
              LoRA where `model.vision.vision_lora_kwargs` puts it (the language model's linear layers);
              trainable: LoRA, plus the projector in full with lora.train_projector; without LoRA every
              weight but the tower's (and the projector's, unless it trains).
  memory      the frozen tower saves nothing for the backward (neither its weights nor its input need a
              gradient); its forward working set is the peak of the bytes of the tensors its ops make (views
              and in-place results alias an input and do not count, nor do the [patches, patches] attention
              scores sdpa never stores), alive at once during a forward of one input (the input counted; the
              meta model under FakeTensorMode), times the most inputs one micro-batch runs (both rows' in
              stacked rows), counted on top of the language model's activations (an upper bound: it is freed
              before the language model runs). A trained projector adds what autograd saves for its float32
              copy, traced on the tower's output.
  FLOPs       per forward, each tower input costs 2 x tower parameters per patch plus the tower's attention
              (2·2·d per patch pair and layer, bidirectional), and each image token 2 x projector parameters;
              an input runs once per pair in the shared layout, twice in stacked rows; per step, as many
              forwards as the policy and a forward reference run (the frozen tower has no backward; a trained
              projector has one more, for its weight gradients).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import ModelConfig, Recipe

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def is_vision_config(config) -> bool:
    """A config ``AutoModelForImageTextToText`` maps, with a vision config (or no causal LM of its type)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    family = getattr(config, "model_type", None)
    return family in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and (
        getattr(config, "vision_config", None) is not None or family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# ------------------------------------------------------------------------------------------ processor

def add_declared_tokens(tokenizer, folder: str) -> None:
    """The tokens `folder`'s tokenizer_config.json declares (``added_tokens_decoder``) that `tokenizer` lacks, added
    at their ids, and its special tokens: a family's tokenizer that is a base vocabulary plus added tokens."""
    from transformers import AddedToken

    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        declared = json.load(f)
    vocab = tokenizer.get_vocab()
    for index, entry in sorted(declared.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        content, index = entry["content"], int(index)
        at = vocab.get(content, len(tokenizer))
        if at != index:
            raise RecipeError(f"{path} puts token {content!r} at id {index}, but the tokenizer "
                              f"'{tokenizer.name_or_path}' would give it id {at}; set model.tokenizer_name_or_path "
                              f"to the base tokenizer of this model family")
        if content not in vocab:
            special = entry.get("special", True)
            tokenizer.add_tokens([AddedToken(content, special=special, normalized=entry.get("normalized", False),
                                             lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                                             single_word=entry.get("single_word", False))], special_tokens=special)
            vocab[content] = index
    for key in SPECIAL_TOKENS:
        if isinstance(declared.get(key), str):
            setattr(tokenizer, key, declared[key])


def stand_in_processor(folder: str, model_cfg: ModelConfig) -> str:
    """A processor folder for a model-config `folder` that ships a processor's configs but no tokenizer: the
    tokenizer of model.tokenizer_name_or_path (else the model's) with the folder's declared tokens
    (`add_declared_tokens`), beside the folder's processor files. Built once under the dpo_accel cache, keyed
    by those files and the tokenizer's name, so a later inspect tokenises into the same cache."""
    from transformers import AutoTokenizer

    from dpo_accel.model.loading import cache_root, resolve_model_path
    from dpo_accel.outputs.files import atomic_write

    source = model_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path
    names = [n for n in PROCESSOR_FILES + ("tokenizer_config.json",) if os.path.isfile(os.path.join(folder, n))]
    texts = []
    for name in names:
        with open(os.path.join(folder, name)) as f:
            texts.append(f.read())
    key = hashlib.sha256(json.dumps([source, names, texts]).encode()).hexdigest()[:16]
    target = os.path.join(cache_root(), "processors", f"{os.path.basename(os.path.normpath(folder))}-{key}")
    if os.path.isfile(os.path.join(target, "preprocessor_config.json")):
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(source),
                                                  trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise RecipeError(f"'{folder}' ships no tokenizer and the one of '{source}' cannot be loaded ({why}); set "
                          f"model.tokenizer_name_or_path to the family's base tokenizer (a local folder, or the "
                          f"alias smollm2-135m-instruct for SmolLM2's)") from None
    add_declared_tokens(tokenizer, folder)
    tokenizer.chat_template = None  # the processor's template is the folder's own
    with atomic_write(target, unique=True, replace=False) as tmp:
        tokenizer.save_pretrained(tmp)
        for name in names:
            if name != "tokenizer_config.json":
                shutil.copy(os.path.join(folder, name), os.path.join(tmp, name))
    return target


def inspect_processor(recipe: Recipe, model_config: Optional[str]):
    """The processor whose tokens inspect counts: a --model-config folder's (its own tokenizer, or
    `stand_in_processor`), else the run's (`load_processor` on the recipe's model)."""
    from dpo_accel.model.loading import load_processor, resolve_model_path

    folder = model_config if model_config and os.path.isdir(model_config) else None
    if folder and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        own = any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES)
        path = folder if own else stand_in_processor(folder, recipe.model)
        return load_processor(dataclasses.replace(recipe.model, tokenizer_name_or_path=None), path)
    return load_processor(recipe.model, resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file))


# ----------------------------------------------------------------------------------------------- data

def tokenize_vision_data(recipe: Recipe, processor) -> tuple:
    """(tokenized, stats) as the run's `build_vision_data` makes them: vision pairs, or text pairs through the
    processor, tokenised by `data.vision.tokenize_vision_splits` (the same cache)."""
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.data.vision import is_vision_source, load_vision_splits, tokenize_vision_splits

    if is_vision_source(recipe.data):
        raw = load_vision_splits(recipe.data, recipe.train.seed)
    else:
        raw = load_preference_splits(recipe.data, recipe.train.seed)
    return tokenize_vision_splits(raw, processor, recipe.data)


def pair_image_counts(split, image_token_id: int) -> tuple:
    """(image tokens per pair, tower inputs per pair, the largest input's shape) of a tokenised split: tokens
    counted in the chosen ids, tower inputs and their shape as tokenisation recorded them."""
    import pyarrow.compute as pc

    from dpo_accel.data.vision import TOWER_INPUTS, TOWER_SHAPE

    ids = split.select_columns(["chosen_input_ids"]).with_format("arrow")[:].column(0)
    tokens = np.zeros(len(split), dtype=np.int64)
    start = 0
    for chunk in ids.chunks:
        hits = pc.equal(pc.list_flatten(chunk), image_token_id).to_numpy(zero_copy_only=False)
        owner = pc.list_parent_indices(chunk).to_numpy()
        tokens[start:start + len(chunk)] = np.bincount(owner[hits], minlength=len(chunk))
        start += len(chunk)
    if TOWER_INPUTS not in split.column_names:
        return tokens, np.zeros(len(split), dtype=np.int64), ()
    table = split.select_columns([TOWER_INPUTS, TOWER_SHAPE]).with_format("arrow")[:]
    inputs = table.column(TOWER_INPUTS).to_numpy().astype(np.int64)
    shapes = table.column(TOWER_SHAPE).combine_chunks()
    rank = int(pc.max(pc.list_value_length(shapes)).as_py() or 0)
    ranked = shapes.filter(pc.equal(pc.list_value_length(shapes), rank))
    if rank == 0 or len(ranked) == 0:
        return tokens, inputs, ()
    largest = pc.list_flatten(ranked).to_numpy().reshape(-1, rank).max(axis=0)
    return tokens, inputs, tuple(int(n) for n in largest)


def percentiles(values: np.ndarray) -> str:
    """p50/p90/p99/max, the statistics table's way (the higher value where a percentile falls between two)."""
    if values.size == 0:
        return "-"
    q = np.percentile(values, [50, 90, 99], method="higher")
    return "/".join(str(int(v)) for v in (*q, values.max()))


@dataclass
class VisionData:
    """A VLM's side of the inspection: its config, processor, tokenised data and image counts per pair."""
    config: object  # the whole model's config (the language model's is config.get_text_config())
    processor: object
    tokenized: object
    stats: dict
    counts: dict  # split -> (image tokens per pair, tower inputs per pair)
    input_shape: tuple  # the largest tower input: (channels, height, width), or (features,) for patch rows
    patches: int  # patches per tower input

    @property
    def train_counts(self) -> tuple:
        return self.counts["train"]


def gather_vision(recipe: Recipe, model_config: Optional[str], config) -> VisionData:
    """The processor, the data tokenised as the run does, and the images per pair of every split."""
    processor = inspect_processor(recipe, model_config)
    tokenized, stats = tokenize_vision_data(recipe, processor)
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None:
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts, shape = {}, ()
    for key, split in tokenized.items():
        tokens, inputs, split_shape = pair_image_counts(split, image_token_id)
        counts[key] = (tokens, inputs)
        shape = max(shape, split_shape)
    return VisionData(config, processor, tokenized, stats, counts, shape, patches_per_input(config, shape))


def patches_per_input(config, shape: tuple) -> int:
    """Patches the tower makes of one input: (height / patch) x (width / patch) for an image, 1 for a patch row."""
    if len(shape) < 3:
        return 1
    patch = getattr(config.vision_config, "patch_size", 1)
    return max(shape[-2] // patch, 1) * max(shape[-1] // patch, 1)


def image_lines(vision: VisionData) -> list[str]:
    """The `== data` section's images per pair: image tokens, tower inputs, per split."""
    lines = [f"images per pair ({type(vision.processor).__name__}; tower inputs: the images or tiles the vision "
             f"tower runs, {vision.patches} patches each)",
             f"{'split':<8}{'image tokens p50/p90/p99/max':<32}{'tower inputs p50/p90/p99/max':<32}"]
    for key, (tokens, inputs) in vision.counts.items():
        lines.append(f"{key:<8}{percentiles(tokens):<32}{percentiles(inputs):<32}")
    return lines


# ------------------------------------------------------------------------------------------ the model

@dataclass
class VisionParams:
    params: int  # every base weight: tower + projector + language model
    trainable: int  # LoRA (+ the projector), or every weight but the frozen ones
    matmul: int  # what multiplies per language-model token: its body and head (+ LoRA), not the input embedding
    tower: int
    projector: int


def meta_vlm(config, recipe: Recipe, dtype=None):
    """The whole model on the meta device, with the attention implementation the run loads it with."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(
            copy.deepcopy(config), dtype=dtype or torch.float32, trust_remote_code=recipe.model.trust_remote_code,
            attn_implementation=recipe.model.attn_implementation or "sdpa")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


_RESULTS: dict = {}


def memoised(kind: str, config, recipe: Recipe, extra: tuple, build):
    """``build()``, computed once for a result that depends on the config, the recipe's model / LoRA keys and
    `extra` only: the fit search estimates one recipe again under several settings."""
    key = (kind, config.to_json_string(), repr(dataclasses.astuple(recipe.lora)), recipe.model.attn_implementation,
           extra)
    if key not in _RESULTS:
        _RESULTS[key] = build()
    return _RESULTS[key]


def vision_params(config, recipe: Recipe) -> VisionParams:
    """`VisionParams` of the meta model with the recipe's LoRA."""
    return memoised("params", config, recipe, (), lambda: _vision_params(config, recipe))


def _vision_params(config, recipe: Recipe) -> VisionParams:
    from dpo_accel.model.vision import vision_lora_kwargs, vision_projector

    model = meta_vlm(config, recipe)
    tower, projector = _count(model.get_encoder(modality="image")), _count(vision_projector(model))
    base = _count(model)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    language = _count(model.get_decoder()) + (0 if tied or head is None else head.weight.numel())
    adapter, train_projector = 0, recipe.lora.train_projector
    if recipe.lora.use_peft:
        from peft import LoraConfig, inject_adapter_in_model

        targets = recipe.lora.lora_target_modules
        if targets == "all-linear":
            targets = vision_lora_kwargs(model)["target_modules"]
        inject_adapter_in_model(LoraConfig(r=recipe.lora.lora_r, lora_alpha=recipe.lora.lora_alpha,
                                           target_modules=targets), model)
        adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        trainable = adapter + (projector if train_projector else 0)
    else:
        trainable = base - tower - (0 if train_projector else projector)
    return VisionParams(base, trainable, language - (0 if tied else embed.numel()) + adapter, tower, projector)


class PeakLive(TorchDispatchMode):
    """The peak of the bytes of tensors alive while ops run under this mode: each new storage an op makes (not a
    view or an in-place result, which alias an input) counts until it is freed; [square, square] score tensors
    (which sdpa and flash attention never hold) do not count."""

    def __init__(self, square: int = 0):
        super().__init__()
        self.square, self.alive, self.live, self.peak = square, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            aliased = returns[min(i, len(returns) - 1)].alias_info is not None if returns else False
            if isinstance(t, torch.Tensor) and not aliased:
                self.track(t)
        self.peak = max(self.peak, self.live)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        scores = t.dim() >= 2 and t.shape[-1] == t.shape[-2] == self.square > 1
        if key in self.alive or scores:
            return
        size = storage.nbytes()
        self.alive[key] = weakref.ref(storage, functools.partial(self.freed, key, size))
        self.live += size

    def freed(self, key: int, size: int, _ref) -> None:
        self.alive.pop(key, None)
        self.live -= size


def tower_forward(model, shape: tuple, dtype, *modes) -> tuple:
    """The shape of the vision tower's output for one input of `shape`, the meta model run under FakeTensorMode
    (shapes only: some towers check their padding mask's values, which meta tensors do not hold), `modes` (a
    `PeakLive`, a FLOP counter) entered inside it so that they see every op."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), contextlib.ExitStack() as stack, torch.no_grad():
        for mode in modes:
            stack.enter_context(mode)
        pixels = torch.zeros((1, *shape), dtype=dtype, device="meta")
        out = model.get_encoder(modality="image")(pixel_values=pixels)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return tuple(hidden.shape)


def tower_bytes(vision: VisionData, recipe: Recipe, inputs: int, dtype_name: str) -> tuple:
    """(the frozen tower's forward working set, what autograd saves for a trained projector) for `inputs` tower
    inputs in one forward, in bytes: one input traced, times `inputs`."""
    working, saved = memoised("tower", vision.config, recipe, (tuple(vision.input_shape), dtype_name),
                              lambda: _tower_bytes(vision, recipe, dtype_name))
    return working * inputs, saved * inputs


def _tower_bytes(vision: VisionData, recipe: Recipe, dtype_name: str) -> tuple:
    from dpo_accel.model.vision import vision_projector

    if len(vision.input_shape) != 3:
        return 0.0, 0.0  # patch rows (Qwen2-VL): the tower also takes their grid; not traced
    dtype = getattr(torch, dtype_name)
    model = meta_vlm(vision.config, recipe, dtype)
    peak = PeakLive(vision.patches)
    hidden = tower_forward(model, tuple(vision.input_shape), dtype, peak)
    projector = vision_projector(model)
    if not recipe.lora.train_projector or projector is None:
        return float(peak.peak), 0.0
    projector = projector.float().requires_grad_(True)  # the trained copy is float32 (`upcast_trained_copies`)
    own = {p.untyped_storage()._cdata for p in projector.parameters()}
    saved: dict = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in own:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        projector(torch.zeros(hidden, device="meta"))
    return float(peak.peak), float(sum(saved.values()))


def plan_line(vision: VisionData, recipe: Recipe) -> str:
    """The `== plan` section's line on the model's parts: tower, projector, language model."""
    p = vision_params(vision.config, recipe)
    trained = "trained in full" if recipe.lora.train_projector else "frozen"
    return (f"vision         tower {p.tower / 1e6:,.1f}M parameters (frozen) | projector {p.projector / 1e6:,.1f}M "
            f"({trained}) | language model {(p.params - p.tower - p.projector) / 1e6:,.1f}M")


def tower_flops(vision: VisionData, params: VisionParams, inputs: float, image_tokens: float, forwards: int,
                train_projector: bool) -> float:
    """FLOPs of the tower and projector for `inputs` tower inputs and `image_tokens` image tokens per step, run
    `forwards` times (see the module docstring)."""
    v = vision.config.vision_config
    patches = vision.patches
    attention = 2 * 2 * getattr(v, "hidden_size", 0) * getattr(v, "num_hidden_layers", 0) * patches * patches
    tower = (2 * params.tower * patches + attention) * inputs * forwards
    projector = 2 * params.projector * image_tokens * (forwards + (1 if train_projector else 0))
    return tower + projector
