"""Per-sequence log-probs of a vision-language preference batch, each pair's image and prompt run once.

The batch contract: the text keys of `logps.concatenated_logps` (``chosen_input_ids`` /
``chosen_attention_mask`` / ``chosen_labels`` and the three ``rejected_*`` keys, LongTensor [B, T],
right-padded, labels -100 on prompt and padding, not shifted), where the prompt already holds the image
placeholder tokens expanded as the family's processor expands them; plus each pair's image tensors ONCE PER
PAIR, under the processor's names and concatenated over pairs in pair order as the processor returns them
for a batch: ``pixel_values`` and the family's extras (``image_grid_thw`` for Qwen2-VL / Qwen2.5-VL,
``pixel_attention_mask`` for Idefics3 / SmolVLM, ``image_sizes`` where used); and per row
``chosen_token_type_ids`` / ``rejected_token_type_ids`` where the processor returns token_type_ids
(PaliGemma: required, 0 on image and prompt, 1 on the answer; Gemma 3: optional, 1 on image tokens, derived
from the ids when absent). Qwen2-VL's ``mm_token_type_ids`` may come as ``chosen_mm_token_type_ids`` /
``rejected_mm_token_type_ids``; absent, they are derived from the image and video token ids as the
processor does.

Two layouts, both through the model's multimodal base (``model.model``: vision tower, projector, merge of
the image features into the placeholders, language model) and the chunked LM head of `logps` (the
[rows, T, V] logits are never built):

- "stacked": chosen and rejected rows stacked [2B, T], the image tensors repeated for the rejected rows,
  masks and positions made by the model's own forward (what TRL does): the exact baseline.
- "shared": one row per pair ``[shared | chosen rest | rejected rest]`` as in `logps.shared_rows`; the
  vision tower runs on the B pairs' images, not 2B, and the common prompt (image tokens included) runs once.
  Each token keeps the position its own row gives it (own column; PaliGemma column + 1; Qwen2-VL's 3D
  M-RoPE positions computed by the model's ``get_rope_index`` on the stacked rows and gathered) and a 4D mask
  reproduces the family's attention inside each row: causal, Gemma 3's bidirectional attention among one
  image's tokens, PaliGemma's bidirectional prefix (token type 0), sliding windows in own-row positions.
  The shared prefix stops before any bidirectional block that reaches past it, so the shared tokens see
  the same context in both rows; a batch whose image tokens do not all lie in each pair's shared prefix, or
  whose rows outrun a window the forward cannot take per layer type, runs stacked (exact either way).

`vision_layout` says, from the config, which layout a family gets and why; families without rules here
run stacked. `VisionLogpsModel` is the training module (one forward for ``accelerator.prepare``, as
`logps.PreferenceLogpsModel` is for a causal LM); its start-up self-check runs the shared layout against
stacked rows on a probe batch and keeps stacked, saying why, where they differ.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from dpo_accel.config.errors import RecipeError
from dpo_accel.model.logps import (IGNORE_INDEX, PREFIX_SHARING_ATTENTION, SELF_CHECK_RTOL, SELF_CHECK_RTOL_16BIT,
                                   attention_windows, check_padding, concatenated_inputs, float32_weights,
                                   lean_token_logps, logit_transform, relative_difference, sequence_logps,
                                   shared_prefix_lengths, shared_rows, unwrap_decoder)

LAYOUTS = ("shared", "stacked")
GENERIC_IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")


@dataclass(frozen=True)
class VisionRules:
    """What one family's multimodal forward does (read from its transformers 5 modeling file) that the shared
    row must reproduce."""
    image_keys: tuple[str, ...]  # the per-pair image tensors its forward takes, as the batch names them
    token_type_key: Optional[str] = None  # per-row token types its forward takes
    token_types: str = "none"  # "required" in the batch; "image": derived as image (1) / video (2) tokens if absent
    blocks: Optional[str] = None  # "image": bidirectional within one image's tokens; "prefix": over token type 0
    positions: str = "columns"  # "columns": own-row column; "one_based": column + 1; "mrope": get_rope_index
    mask_by_layer_type: bool = True  # the forward hands a dict of masks keyed by layer type to its layers
    text_logit_transform: bool = False  # the forward soft-caps the logits with the text config's cap


_QWEN_VL = VisionRules(("pixel_values", "image_grid_thw"), token_type_key="mm_token_type_ids", token_types="image",
                       positions="mrope")
_IDEFICS = VisionRules(("pixel_values", "pixel_attention_mask"))

VISION_FAMILIES = {
    "llava": VisionRules(("pixel_values", "image_sizes")),
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
    "gemma3": VisionRules(("pixel_values",), token_type_key="token_type_ids", token_types="image", blocks="image"),
    "paligemma": VisionRules(("pixel_values",), token_type_key="token_type_ids", token_types="required",
                             blocks="prefix", positions="one_based", mask_by_layer_type=False,
                             text_logit_transform=True),
}


def vision_layout(config) -> tuple[str, str]:
    """(layout, reason) for a vision-language model's config: "shared" where this module knows the family's
    mask and position rules and its language model takes a custom 4D mask, else "stacked" and why."""
    family = getattr(config, "model_type", "?")
    rules = VISION_FAMILIES.get(family)
    if rules is None:
        return "stacked", f"no sharing rules for model type '{family}' (its masks and positions are unchecked)"
    text = config.get_text_config()
    impl = getattr(text, "_attn_implementation", None)
    if impl not in PREFIX_SHARING_ATTENTION:
        return "stacked", (f"sharing needs a language-model attention that takes a custom 4D mask "
                           f"({', '.join(PREFIX_SHARING_ATTENTION)}); the model uses '{impl}'")
    try:
        attention_windows(text)
    except ValueError as e:
        return "stacked", str(e)
    if getattr(text, "use_bidirectional_attention", False) and family == "gemma3":
        return "stacked", "the language model attends bidirectionally (use_bidirectional_attention)"
    return "shared", shared_reason(rules, text)


def shared_reason(rules: VisionRules, text_config) -> str:
    """The start-up line's account of what the shared row reproduces for the family."""
    parts = ["each pair's image and prompt run once"]
    parts += {"image": ["bidirectional attention within each image"],
              "prefix": ["bidirectional attention over image and prompt"]}.get(rules.blocks, [])
    parts += {"mrope": ["each row's 3D M-RoPE positions"], "one_based": ["1-based positions"]}.get(rules.positions, [])
    windows = sorted({w for w in attention_windows(text_config).values() if w is not None})
    if windows:
        parts.append(f"sliding window {', '.join(map(str, windows))} in own-row positions")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ row inputs

def _pad_to(x: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    x = x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def stacked_token_types(batch: dict, rules: VisionRules, config, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[2B, T] token types of the stacked rows for the family's forward (None where it takes none)."""
    key = rules.token_type_key
    if key is None:
        return None
    width = input_ids.shape[1]
    if f"chosen_{key}" in batch and f"rejected_{key}" in batch:
        return torch.cat([_pad_to(batch[f"{s}_{key}"], width) for s in ("chosen", "rejected")]).long()
    if rules.token_types == "required":
        raise KeyError(f"model type '{config.model_type}' needs chosen_{key} / rejected_{key} in the batch "
                       f"(its processor's {key})")
    types = (input_ids == config.image_token_id).long()
    video = getattr(config, "video_token_id", None)
    return types if video is None else types + 2 * (input_ids == video).long()


def block_ids(token_types: Optional[torch.Tensor], attention_mask: torch.Tensor, rules: VisionRules) -> torch.Tensor:
    """[R, T] id of the bidirectional block each token belongs to (-1: none, attention is causal for it):
    each run of image tokens (token type 1) its own block for "image", the token-type-0 prefix for "prefix"."""
    real = attention_mask.bool()
    none = torch.full_like(attention_mask, -1, dtype=torch.long)
    if rules.blocks is None or token_types is None:
        return none
    if rules.blocks == "prefix":
        return torch.where((token_types == 0) & real, 0, none)
    image = (token_types == 1) & real
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(-1) - 1, none)


def shared_lengths(input_ids, attention_mask, token_types, blocks, n_chosen: int) -> torch.Tensor:
    """[B] shared prefix of each pair: equal ids and token types, cut back to the start of any bidirectional
    block that reaches past it in either row (its tokens would see different futures in the two rows)."""
    B = n_chosen
    keys = input_ids if token_types is None else input_ids * (int(token_types.max()) + 1) + token_types
    s = shared_prefix_lengths({"chosen_input_ids": keys[:B], "chosen_attention_mask": attention_mask[:B],
                               "rejected_input_ids": keys[B:], "rejected_attention_mask": attention_mask[B:]})
    R, T = blocks.shape
    cols = torch.arange(T, device=blocks.device).expand(R, T)
    in_block = blocks >= 0
    groups = int(blocks.max()) + 1
    if groups == 0:
        return s
    first = torch.full((R, groups), T, dtype=torch.long, device=blocks.device)  # first column of each block
    first = first.scatter_reduce(1, blocks.clamp(min=0), torch.where(in_block, cols, T), "amin")
    starts = first.gather(1, blocks.clamp(min=0))  # start of each token's block
    row_s = torch.cat([s, s]).unsqueeze(1)
    past = in_block & (cols >= row_s)  # block tokens at or past the shared prefix
    cut = torch.where(past, starts, T).amin(-1)  # [R] earliest start of such a block
    return torch.minimum(s, torch.minimum(cut[:B], cut[B:]))


def gather_rows(stacked: torch.Tensor, source: torch.Tensor, in_chosen: torch.Tensor, n_chosen: int) -> torch.Tensor:
    """Per-token values of the stacked rows ([..., 2B, T]) moved into the shared rows ([..., B, L]): each
    shared-row token takes its own row's value at its own-row column ``source``."""
    lead = stacked.shape[:-2]
    idx = source.expand(*lead, *source.shape)
    chosen = stacked[..., :n_chosen, :].gather(-1, idx)
    rejected = stacked[..., n_chosen:, :].gather(-1, idx)
    return torch.where(in_chosen, chosen, rejected)


def shared_vision_mask(source, blocks, shared, c_len, row_len, windows: dict, eager: bool, by_layer_type: bool):
    """The shared rows' 4D mask [B, 1, L, L] (a dict per layer type where the layers differ): a query sees
    the keys of its own row (the shared part, then its own side's rest), causally or within its
    bidirectional block, and within a sliding window counted in own-row columns (``kv > q - window``)."""
    B, L = source.shape
    j = torch.arange(L, device=source.device)
    q, k = j.view(1, L, 1), j.view(1, 1, L)
    c, s, n = c_len.view(B, 1, 1), shared.view(B, 1, 1), row_len.view(B, 1, 1)
    own_row = torch.where(q < c, k < c, torch.where(q < n, (k < s) | ((k >= c) & (k < n)), k <= q))
    same_block = (blocks.unsqueeze(2) == blocks.unsqueeze(1)) & (blocks.unsqueeze(2) >= 0)
    allowed = own_row & ((k <= q) | same_block)
    distance = source.unsqueeze(2) - source.unsqueeze(1)
    masks = {}
    for layer_type, window in windows.items():
        mask = (allowed if window is None else allowed & (distance < window)).unsqueeze(1)
        if eager:  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
                ~mask, torch.finfo(torch.float32).min)
        masks[layer_type] = mask
    if len(masks) == 1 or not by_layer_type:
        return masks.get("full_attention", next(iter(masks.values())))
    return masks


# ---------------------------------------------------------------------------------------------- forwards

def image_inputs(batch: dict, rules: VisionRules, copies: int, dtype: Optional[torch.dtype] = None) -> dict:
    """The batch's per-pair image tensors, each repeated ``copies`` times along the image axis (2: the rejected
    rows get the same images again, in the same order); floating ones in ``dtype`` (the vision tower's)."""
    out = {}
    for key in rules.image_keys:
        x = batch.get(key)
        if x is not None:
            x = torch.cat([x] * copies)
            out[key] = x.to(dtype) if dtype is not None and x.is_floating_point() else x
    return out


def stacked_positions(base, rules: VisionRules, input_ids, attention_mask, token_types, batch) -> torch.Tensor:
    """The position ids the family's forward gives each stacked row: [2B, T], or [3, 2B, T] for M-RoPE."""
    cols = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if rules.positions == "one_based":
        return cols + 1
    if rules.positions == "mrope":
        grids = batch.get("image_grid_thw")
        grids = None if grids is None else torch.cat([grids, grids])  # the rejected rows' images again
        return base.get_rope_index(input_ids, mm_token_type_ids=token_types, image_grid_thw=grids,
                                   attention_mask=attention_mask)[0]
    return cols


def sharing_problem(input_ids, attention_mask, shared, n_chosen: int, config, rules: VisionRules) -> Optional[str]:
    """Why this batch cannot run shared (None: it can): an image token outside its pair's shared prefix
    (its features would be needed twice), or a row longer than a sliding window where the forward applies
    one mask to every layer."""
    B = n_chosen
    image = (input_ids == config.image_token_id) & attention_mask.bool()
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)
    in_prefix = (image[:B] & (cols < shared.unsqueeze(1))).sum(-1)
    if not (torch.equal(in_prefix, image[:B].sum(-1)) and torch.equal(in_prefix, image[B:].sum(-1))):
        return "an image token lies outside its pair's shared prefix"
    windows = [w for w in attention_windows(config.get_text_config()).values() if w is not None]
    if windows and not rules.mask_by_layer_type and int(attention_mask.sum(-1).max()) > min(windows):
        return "a row is longer than the sliding window and the forward takes one mask for every layer"
    return None


def shared_forward_inputs(base, batch, rules, config, input_ids, attention_mask, token_types, n_chosen: int,
                          image_dtype):
    """The shared rows' forward kwargs for ``base`` and (shared [B], chosen lengths [B], row length L), or
    None where `sharing_problem` finds the batch cannot share."""
    B = n_chosen
    blocks = block_ids(token_types, attention_mask, rules)
    shared = shared_lengths(input_ids, attention_mask, token_types, blocks, B)
    if sharing_problem(input_ids, attention_mask, shared, B, config, rules):
        return None
    # Make each rejected row differ at the settled shared length, so `shared_rows` cuts there too.
    keys = input_ids.clone()
    pairs = (shared < attention_mask[B:].sum(-1)).nonzero(as_tuple=True)[0]
    keys[B + pairs, shared[pairs]] = -1
    _, source, real, shared, c_len, row_len = shared_rows(keys, attention_mask, B)
    in_chosen = torch.arange(source.shape[1], device=source.device).unsqueeze(0) < c_len.unsqueeze(1)
    ids = torch.where(real, gather_rows(input_ids, source, in_chosen, B), 0)
    row_blocks = torch.where(real, gather_rows(blocks, source, in_chosen, B), -1)
    positions = gather_rows(stacked_positions(base, rules, input_ids, attention_mask, token_types, batch),
                            source, in_chosen, B)
    text = config.get_text_config()
    mask = shared_vision_mask(source, row_blocks, shared, c_len, row_len, attention_windows(text),
                              getattr(text, "_attn_implementation", None) == "eager", rules.mask_by_layer_type)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions,
                  **image_inputs(batch, rules, 1, image_dtype))
    return kwargs, shared, c_len, ids.shape[1]


def stacked_forward_inputs(batch, rules, input_ids, attention_mask, token_types, image_dtype) -> dict:
    """The stacked rows' forward kwargs: the model makes its own masks and positions."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, **image_inputs(batch, rules, 2, image_dtype))
    if token_types is not None:
        kwargs[rules.token_type_key] = token_types
    return kwargs


def family_rules(config, batch: dict) -> VisionRules:
    """The family's rules; for a family without any (it runs stacked), whichever image tensors and row token
    types of the usual names the batch carries."""
    rules = VISION_FAMILIES.get(config.model_type)
    if rules is not None:
        return rules
    types_key = next((k for k in ("token_type_ids", "mm_token_type_ids") if f"chosen_{k}" in batch), None)
    return VisionRules(GENERIC_IMAGE_KEYS, token_type_key=types_key, token_types="required")


def vision_concatenated_logps(model: torch.nn.Module, batch: dict, *, layout: str = "shared", chunk_size: int = 256,
                              chunk_mb: Optional[float] = 64.0, wpo: bool = False) -> dict:
    """Summed log-probs of the label tokens of every chosen and rejected row of a vision-language batch (the
    module docstring's contract), from one forward of the model's multimodal base and the chunked LM head.

    ``model``: an ``AutoModelForImageTextToText`` model, or a peft model around one. ``layout``: "shared"
    (each pair's image and prompt once, the vision tower on B pairs' images; a family that `vision_layout`
    keeps stacked, or a batch that `sharing_problem` refuses, runs stacked instead) or "stacked". Returns the dict of `logps.concatenated_logps`: ``chosen_logps``,
    ``chosen_tokens``, ``rejected_logps``, ``rejected_tokens`` [B] (with wpo the ``*_wpo_logps`` too)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got '{layout}'")
    if "rejected_input_ids" not in batch:
        raise KeyError("a vision preference batch needs rejected_* rows")
    hf_model = unwrap_decoder(model)
    config = hf_model.config
    rules = family_rules(config, batch)
    input_ids, attention_mask, labels, B = concatenated_inputs(batch)
    check_padding(attention_mask, labels)
    T = int(attention_mask.sum(-1).max().clamp(min=1))  # columns past the longest real row change nothing
    input_ids, attention_mask, labels = input_ids[:, :T], attention_mask[:, :T], labels[:, :T]
    token_types = stacked_token_types(batch, rules, config, input_ids)
    base = hf_model.base_model
    image_dtype = next(hf_model.get_encoder(modality="image").parameters()).dtype

    next_labels = labels[:, 1:]  # position t predicts the label at t + 1
    rows, cols = (next_labels != IGNORE_INDEX).nonzero(as_tuple=True)
    targets = next_labels[rows, cols]
    inputs = None
    if layout == "shared" and vision_layout(config)[0] == "shared":
        inputs = shared_forward_inputs(base, batch, rules, config, input_ids, attention_mask, token_types, B,
                                       image_dtype)
    if inputs is None:
        kwargs = stacked_forward_inputs(batch, rules, input_ids, attention_mask, token_types, image_dtype)
        flat_pos = rows * T + cols
    else:
        kwargs, shared, c_len, L = inputs
        pair = rows % B
        moved = (rows >= B) & (cols >= shared[pair])  # rejected columns past the shared prefix
        flat_pos = pair * L + torch.where(moved, c_len[pair] + cols - shared[pair], cols)
    hidden = base(**kwargs, use_cache=False).last_hidden_state.flatten(0, 1)[flat_pos]  # [N, H]
    head = hf_model.get_output_embeddings()
    text = config.get_text_config()
    transform = logit_transform(text if rules.text_logit_transform else config)
    vocab = getattr(head, "out_features", None) or text.vocab_size
    token_logps, wpo_adjust = lean_token_logps(head, transform, wpo, hidden, targets, chunk_size, chunk_mb, vocab)
    return sequence_logps(token_logps, wpo_adjust, rows, next_labels, B, wpo)


# ------------------------------------------------------------------------------------ the training module

def layout_difference(model: torch.nn.Module, probe: dict, chunk_size: int = 256,
                      chunk_mb: Optional[float] = 64.0) -> tuple[float, float]:
    """(relative difference of the shared layout's log-probs from the stacked rows' on `probe`, the tolerance
    that calls them equal): no gradients, eval mode, no autocast, 16-bit weights held as float32 (so the
    measure is the layouts' structure, not two roundings of 16-bit arithmetic)."""
    was_training = model.training
    model.eval()
    device_type = probe["chosen_input_ids"].device.type
    try:
        with torch.no_grad(), torch.autocast(device_type, enabled=False), float32_weights(model) as upcast:
            param = next(unwrap_decoder(model).parameters())
            rtol = SELF_CHECK_RTOL[torch.float32] if upcast else SELF_CHECK_RTOL.get(param.dtype, SELF_CHECK_RTOL_16BIT)
            shared, stacked = (vision_concatenated_logps(model, probe, layout=layout, chunk_size=chunk_size,
                                                         chunk_mb=chunk_mb) for layout in LAYOUTS)
    finally:
        model.train(was_training)
    return relative_difference(shared, stacked), rtol


class VisionLogpsModel(torch.nn.Module):
    """A vision-language model plus `vision_concatenated_logps` as ONE module forward: give this module, not the
    HF model, to ``accelerator.prepare`` (DDP / FSDP then see one forward covering the vision tower, the
    language model and the chunked LM head). ``.model`` is the (peft) HF model, saved and merged through it.

    ``prefix_sharing`` (train.prefix_sharing): None, the layout `vision_layout` gives the family; False,
    stacked rows; True, shared or one RecipeError line. `settle` (the start-up self-check, on a probe batch
    of a couple of real pairs) keeps stacked rows where the shared layout's log-probs differ from theirs;
    a module not settled settles on the first batch it sees; ``settled_layout`` (a reference copy taking
    the policy's finding) settles it at once. ``layout`` speaks the text module's names ("shared" /
    "concat") for the processed-token counts."""

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = 256, chunk_mb: Optional[float] = 64.0,
                 wpo: bool = False, prefix_sharing: Optional[bool] = None, settled_layout: Optional[str] = None):
        super().__init__()
        self.model = model
        self.chunk_size, self.chunk_mb, self.wpo = chunk_size, chunk_mb, wpo
        self.requested_sharing = prefix_sharing
        config = unwrap_decoder(model).config
        self.vision_layout, self.reason = vision_layout(config)
        if prefix_sharing is False:
            self.vision_layout, self.reason = "stacked", "prefix sharing off in the recipe"
        elif prefix_sharing and self.vision_layout != "shared":
            raise RecipeError(f"train.prefix_sharing is true but model type '{config.model_type}' runs stacked rows "
                              f"({self.reason}); set train.prefix_sharing: null")
        self.settled = prefix_sharing is False
        if settled_layout is not None:
            if settled_layout not in LAYOUTS:
                raise ValueError(f"settled_layout must be one of {', '.join(LAYOUTS)}; got '{settled_layout}'")
            self.vision_layout, self.reason, self.settled = settled_layout, "settled by the policy's self-check", True

    @property
    def layout(self) -> str:
        return "shared" if self.vision_layout == "shared" else "concat"

    def settle(self, probe: dict) -> str:
        """The start-up self-check on ``probe``: the layout kept, and the one line saying it and why."""
        if self.vision_layout == "shared":
            diff, rtol = layout_difference(self.model, probe, self.chunk_size, self.chunk_mb)
            pairs = probe["chosen_input_ids"].shape[0]
            if diff > rtol:
                if self.requested_sharing:
                    raise RecipeError(f"train.prefix_sharing is true but the shared layout's log-probs differ from "
                                      f"stacked rows by {diff:.1e} (relative) on {pairs} training pairs; set "
                                      "train.prefix_sharing: null")
                self.vision_layout = "stacked"
                self.reason = f"the shared layout differs from stacked rows by {diff:.1e} on {pairs} pairs"
            else:
                self.reason += f"; self-check on {pairs} pairs: equal to stacked rows within {diff:.0e}"
        self.settled = True
        return self.startup_line()

    def startup_line(self) -> str:
        hf_model = unwrap_decoder(self.model)
        head = type(hf_model.get_output_embeddings()).__name__
        what = "shared rows (one per pair)" if self.vision_layout == "shared" else "chosen and rejected rows stacked"
        return (f"log-probs: vision-language model '{hf_model.config.model_type}', memory-lean "
                f"({type(hf_model.base_model).__name__} -> {head} in chunks) | layout {self.vision_layout}, "
                f"{what}: {self.reason}")

    def forward(self, **batch) -> dict:
        """``module(**batch)`` -> the dict of `vision_concatenated_logps` (the batch contract of this module)."""
        if not self.settled:
            self.settle(batch)
        return vision_concatenated_logps(self.model, batch, layout=self.vision_layout, chunk_size=self.chunk_size,
                                         chunk_mb=self.chunk_mb, wpo=self.wpo)


# -------------------------------------------------------------------------------------- what trains

def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def vision_projector(hf_model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module mapping vision features into the language model's space (LLaVA / Gemma 3 / PaliGemma
    ``multi_modal_projector``, Idefics3 ``connector``, Qwen2-VL ``visual.merger``), None where none is found."""
    base = hf_model.base_model
    for holder, name in ((base, "multi_modal_projector"), (base, "connector"),
                         (hf_model.get_encoder(modality="image"), "merger")):
        if isinstance(getattr(holder, name, None), torch.nn.Module):
            return getattr(holder, name)
    return None


def language_model_lora_targets(hf_model: torch.nn.Module) -> str:
    """peft ``target_modules`` regex matching the linear layers of the language model only (vision tower,
    projector and LM head left out): the language model's dotted path, then any of its linear leaf names."""
    decoder = hf_model.get_decoder()
    prefix = _module_name(hf_model, decoder)
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)})
    return rf"{re.escape(prefix)}\.(?:.*\.)?(?:{'|'.join(leaves)})"


def vision_lora_kwargs(hf_model: torch.nn.Module, train_projector: bool = False) -> dict:
    """``target_modules`` (and with ``train_projector`` ``modules_to_save``: a trained full copy of the
    projector) for ``peft.LoraConfig``: LoRA on the language model, the vision tower frozen."""
    kwargs = {"target_modules": language_model_lora_targets(hf_model)}
    projector = vision_projector(hf_model)
    if train_projector:
        if projector is None:
            raise ValueError(f"no projector found in model type '{hf_model.config.model_type}'")
        kwargs["modules_to_save"] = [_module_name(hf_model, projector)]
    return kwargs


def freeze_vision_tower(hf_model: torch.nn.Module, train_projector: bool = False) -> None:
    """Full fine-tuning: no gradient for the vision tower (nor the projector unless ``train_projector``)."""
    tower = hf_model.get_encoder(modality="image")
    projector = vision_projector(hf_model)
    for module in (tower, projector):
        if module is not None and module is not hf_model:
            module.requires_grad_(False)
    if train_projector and projector is not None:
        projector.requires_grad_(True)
