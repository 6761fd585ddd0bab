"""Per-sequence log-probabilities of the label tokens of a preference batch, in one forward pass.

The batch contract (see data.py): ``chosen_input_ids`` / ``chosen_attention_mask`` / ``chosen_labels``
LongTensor [B, Tc] and the same three ``rejected_*`` keys [B, Tr]; labels are aligned with the input ids
(not shifted), -100 on prompt and padding; padding is on the right; other keys are ignored. Chosen and
rejected rows are padded to one length and stacked, chosen first, into [2B, T], so the policy (and the
reference) runs once per batch, as in the original DPO repository.

Two ways to turn hidden states into log-probs:

- memory-lean (default): the decoder body gives the final hidden states [2B, T, H]; only the positions
  whose NEXT token is a label are kept ([N, H], prompt and padding never reach the LM head); the LM head
  runs on chunks of them with a float32 logsumexp, recomputed in backward instead of kept, so at most one
  chunk's [chunk, V] logits exist at a time. A chunk holds as many positions as fit a memory budget
  (``chunk_mb``, at most ``chunk_size``), so the transient is the same whatever the vocabulary; a plain
  linear head runs through one autograd function that keeps a single [chunk, V] buffer in backward. The
  [2B, T, V] logits are never built.
- naive (``naive=True``): the full model's logits [2B, T, V] -> float32 log_softmax -> gather. It is the
  reference the tests compare against and the baseline of the benchmark.

``packing=True`` drops the padding before the decoder: the real tokens of all rows go into one row
[1, sum(len)] whose ``position_ids`` restart at 0 for each sequence, and transformers builds a mask that
keeps the sequences apart (checked by the tests against the padded result).

``prefix_sharing=True`` runs the tokens a chosen row and its rejected row have in common (the prompt, and
any identical start of the two answers) once: each pair becomes ONE row ``[shared | chosen rest | rejected
rest]`` whose rejected part takes the positions the rejected row had and, through a custom 4D attention
mask, sees the shared part but not the chosen rest. The hidden states are those of the two separate rows
exactly (same tokens, positions and visible context), so log-probs and gradients equal the stacked
forward's; the decoder runs on ``c + r - s`` tokens per pair instead of ``2 max(c, r)``. Prefix sharing is
how DPO's prompt-heavy batches lose most of their FLOPs (the prompt is often the longer half of a row).
Sliding-window layers get their own mask (the window counted in each token's own-row positions), passed
per attention type (``{"full_attention": ..., "sliding_attention": ...}``) where the layers differ.

Any causal LM: the lean path is found through the model's own API (``get_decoder()``,
``get_output_embeddings()``, the config's logit soft-capping / scaling), not from a list of model types,
and a self-check (`settle_logps_path`) compares it, and the prefix-shared layout, with the model's own
forward on a probe batch before training; where either differs, the full-logits path or stacked rows run
instead, and the start-up line says why. Mixture-of-experts models also return the router's
load-balancing loss (``aux_loss``) when gradients are on, computed by the model's own function on the
tokens of the stacked rows (a shared prefix counts once per row it stands for).
"""
from __future__ import annotations

import contextlib
import math
import sys
import weakref
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from dpo_accel.model.attention import PAIR_ATTENTION, PairSegments, skip_masks, use_pair_attention

IGNORE_INDEX = -100

# Relative difference (per sequence, of the summed label log-probs) within which the self-check calls a
# fast path exact. float32 / float64 models: 1e-4, as a missed bias, scale or cap shows at 1e-2 and more.
# 16-bit weights: the model's own logits are rounded to 8 mantissa bits before its soft-cap or scale,
# so the two ways of rounding differ by about 1e-3 where both are right.
SELF_CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4}
SELF_CHECK_RTOL_16BIT = 1e-2

# Attention implementations that keep packed sequences apart when given restarting position_ids and no
# attention mask: sdpa / eager / flex get a block-diagonal causal mask from transformers' mask creation,
# flash-attention derives variable-length boundaries from the position ids.
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                     "flash_attention_4", PAIR_ATTENTION)

# Attention implementations that take a custom 4D mask as it is (prefix sharing): sdpa a boolean one,
# eager an additive float one (sdpa_pairs is sdpa). Flash-attention kernels take no arbitrary mask.
PREFIX_SHARING_ATTENTION = ("sdpa", "eager", PAIR_ATTENTION)

# Layer types (config.layer_types) whose mask prefix sharing can build: causal, or causal within a window.
WINDOWED_LAYER_TYPES = ("full_attention", "sliding_attention")

# --------------------------------------------------------------------------------------------- inputs

def concatenated_inputs(batch: dict, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stack chosen then rejected rows, right-padded to a common length.

    Returns (input_ids, attention_mask, labels) each [R, T] with R = 2B (or B when the batch has no
    ``rejected_*`` keys, as for SFT) and T = max(Tc, Tr), and the number of chosen rows B. Padding uses
    ``pad_token_id`` (any id works: the attention mask hides it), label -100 and mask 0.
    """
    for key in ("chosen_input_ids", "chosen_attention_mask", "chosen_labels"):
        if key not in batch:
            raise KeyError(f"batch has no '{key}'; the collator must produce chosen_input_ids/_attention_mask/_labels")
    sides = ["chosen"]
    if "rejected_input_ids" in batch:
        sides.append("rejected")
    ids = [batch[f"{s}_input_ids"] for s in sides]
    masks = [batch[f"{s}_attention_mask"] for s in sides]
    labels = [batch[f"{s}_labels"] for s in sides]
    n_chosen = ids[0].shape[0]
    for s, i, m, l in zip(sides, ids, masks, labels):
        if i.dim() != 2 or i.shape != m.shape or i.shape != l.shape:
            raise ValueError(f"{s}_input_ids, _attention_mask and _labels must share one [B, T] shape; got "
                             f"{tuple(i.shape)}, {tuple(m.shape)}, {tuple(l.shape)}")
        if i.shape[0] != n_chosen:
            raise ValueError(f"chosen has {n_chosen} rows but {s} has {i.shape[0]}; pairs must line up")
    T = max(i.shape[1] for i in ids)

    def pad(xs, value):
        return torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value) for x in xs], dim=0)

    return pad(ids, pad_token_id), pad(masks, 0).long(), pad(labels, IGNORE_INDEX), n_chosen


def check_padding(attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
    """One-line errors for batches that would give silently wrong log-probs."""
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise ValueError("attention_mask has padding before real tokens; pad on the right (tokenizer.padding_side='right')")
    if ((labels != IGNORE_INDEX) & (attention_mask == 0)).any():
        raise ValueError("labels must be -100 wherever attention_mask is 0 (padding is never a label)")


# ------------------------------------------------------------------------------------ model plumbing

def unwrap_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM inside a (peft) model: what holds the decoder body and the LM head.

    DDP hides the model in `.module`; calling its pieces directly would bypass DDP's gradient hooks, so
    that is refused while gradients are on (give the `PreferenceLogpsModel` to accelerator.prepare).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        if torch.is_grad_enabled():
            raise TypeError("the memory-lean path cannot run through a DDP-wrapped HF model; wrap it in "
                            "PreferenceLogpsModel and give that to accelerator.prepare")
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "active_peft_config"):  # peft.PeftModel
        if model.active_peft_config.is_prompt_learning:
            raise ValueError("prompt-learning peft adapters (prompt/prefix tuning) are not supported; use LoRA")
        model = model.get_base_model()  # the HF model, with the LoRA layers injected in place
    return model


def _unwrap_for_config(model: torch.nn.Module) -> torch.nn.Module:
    """Whatever carries `.config` (the naive path calls the model itself, wrappers included)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def logit_transform(config) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What the causal-LM forward applies after the LM head, read from the config's own fields:
    ``final_logit_softcapping`` (Gemma 2/3: cap * tanh(x / cap)), ``logits_scaling`` (Granite: x / s),
    ``logit_scale`` (Cohere: x * s). A family doing anything else is caught by the self-check."""
    steps = []
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        steps.append(lambda x: x / scaling)
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        steps.append(lambda x: x * scale)
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap > 0:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def transform(x):
        for step in steps:
            x = step(x)
        return x
    return transform


def lean_problem(hf_model: torch.nn.Module) -> Optional[str]:
    """Why the model's structure offers no lean path (None: decoder body and output embedding found)."""
    try:
        decoder = hf_model.get_decoder()
    except Exception as e:  # a family with no lookup rule raises here
        return f"get_decoder() fails ({type(e).__name__}: {e})"
    if decoder is None or decoder is hf_model:
        return "get_decoder() gives no decoder body apart from the model"
    if hf_model.get_output_embeddings() is None:
        return "get_output_embeddings() gives no LM head"
    return None


def _packed_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real tokens of every row in one row: input ids [1, L] and position ids [1, L] restarting at 0
    for each sequence (L = attention_mask.sum())."""
    keep = attention_mask.bool()
    positions = attention_mask.long().cumsum(-1) - 1  # [R, T]; position of each real token in its row
    return input_ids[keep].unsqueeze(0), positions[keep].unsqueeze(0)


def _check_packing(config) -> None:
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise ValueError(f"packing needs an attention implementation that separates packed sequences "
                         f"({', '.join(PACKING_ATTENTION)}); the model uses '{impl}'; set packing=False")


def attention_windows(config) -> dict[str, Optional[int]]:
    """The attention types of the model's layers and the window of each (None: plain causal).

    From ``config.layer_types`` where the family has it (Gemma 2/3, Qwen2, Cohere 2, ...: the model then
    takes a dict of masks keyed by these names), else one type whose window is ``config.sliding_window``
    (Mistral, Mixtral, Phi-3, StarCoder2: one mask for every layer). Raises ValueError for a layer type
    whose mask prefix sharing cannot build (chunked or linear attention, ...)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {"full_attention" if window is None else "sliding_attention": window}
    unknown = sorted(set(layer_types) - set(WINDOWED_LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer type '{unknown[0]}' has a mask prefix sharing cannot build")
    return {t: (window if t == "sliding_attention" else None) for t in dict.fromkeys(layer_types)}


def _prefix_sharing_problem(config) -> Optional[str]:
    """Why prefix sharing cannot run on this model, seen from its config (None: it can; the self-check
    then confirms it on data)."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PREFIX_SHARING_ATTENTION:
        return (f"prefix sharing needs an attention implementation that takes a custom 4D mask "
                f"({', '.join(PREFIX_SHARING_ATTENTION)}); the model uses '{impl}'")
    try:
        attention_windows(config)
    except ValueError as e:
        return str(e)
    return None


def resolve_prefix_sharing(config, requested: Optional[bool], packing: bool = False) -> bool:
    """The recipe's ``train.prefix_sharing`` as far as the config decides it: True requires it (one-line
    error when the model cannot), False turns it off, None (auto) turns it on wherever the attention
    implementation and layer types allow and there is no packing (the self-check may still turn it off)."""
    if requested is False:
        return False
    if requested and packing:
        raise ValueError("packing and prefix_sharing are exclusive; choose one")
    problem = _prefix_sharing_problem(config)
    if requested:
        if problem:
            raise ValueError(f"{problem}; set prefix_sharing to false")
        return True
    return problem is None and not packing


def shared_prefix_lengths(batch: dict) -> torch.Tensor:
    """[B] longest common prefix of each chosen row and its rejected row (real tokens only)."""
    width = min(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    same = ((batch["chosen_input_ids"][:, :width] == batch["rejected_input_ids"][:, :width])
            & batch["chosen_attention_mask"][:, :width].bool() & batch["rejected_attention_mask"][:, :width].bool())
    return same.long().cumprod(-1).sum(-1)


def processed_tokens(batch: dict, layout: str) -> int:
    """Tokens the decoder runs on for this batch, padding included, under `layout`: "concat" ([2B, T], T the
    longest real row), "shared" (prefix sharing: B rows of max(c + r - s)), "packed_shared" (prefix sharing,
    the pairs packed into one row: sum(c + r - s)) or "packed" (real tokens only)."""
    masks = [batch[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch]
    lengths = [m.sum(-1) for m in masks]
    if layout == "packed" or (layout == "packed_shared" and len(masks) < 2):
        return int(sum(int(n.sum()) for n in lengths))
    if layout == "packed_shared":
        return int((lengths[0] + lengths[1] - shared_prefix_lengths(batch)).sum())
    if layout == "shared" and len(masks) == 2:
        return masks[0].shape[0] * int((lengths[0] + lengths[1] - shared_prefix_lengths(batch)).max())
    return len(masks) * masks[0].shape[0] * int(max(int(n.max()) for n in lengths))


def attention_calls(batch: dict, layout: str, flex: bool = False) -> int:
    """Attention kernel calls per layer for `batch` under `layout`: one over the whole batch, except packed pairs
    without FlexAttention (the CPU), which call SDPA per pair for its chosen part and for its rejected rest."""
    if layout != "packed_shared" or flex or "rejected_attention_mask" not in batch:
        return 1
    rest = batch["rejected_attention_mask"].sum(-1) - shared_prefix_lengths(batch)
    return int(batch["chosen_attention_mask"].shape[0] + (rest > 0).sum())


class LayoutCost:
    """A batch's forward time under each exact layout, modelled as ``per_call`` x attention calls +
    ``per_token`` x processed tokens (plus what every layout shares: the LM head on the same label tokens),
    with both coefficients fitted on this machine at start-up (`calibrate_layout_cost`). ``choose`` picks the
    cheapest of ``candidates`` for a batch: packed pairs save padding, one padded row per pair saves calls,
    so many short pairs go padded and long ones packed."""

    def __init__(self, per_call: float, per_token: float, candidates: tuple, flex: bool = False):
        self.per_call, self.per_token, self.candidates, self.flex = per_call, per_token, tuple(candidates), flex

    def seconds(self, batch: dict, layout: str) -> float:
        return (self.per_call * attention_calls(batch, layout, self.flex)
                + self.per_token * processed_tokens(batch, layout))

    def choose(self, batch: dict) -> str:
        return min(self.candidates, key=lambda layout: self.seconds(batch, layout))

    def as_dict(self) -> dict:
        return {"per_call": self.per_call, "per_token": self.per_token, "candidates": list(self.candidates),
                "flex": self.flex}

    @classmethod
    def from_dict(cls, d: dict) -> "LayoutCost":
        return cls(d["per_call"], d["per_token"], tuple(d["candidates"]), d["flex"])

    def describe(self) -> str:
        return (f"chosen per batch by measured cost ({self.per_call * 1e3:.2f} ms per attention call, "
                f"{self.per_token * 1e6:.1f} us per token)")


LAYOUT_OPTIONS = {"packed_shared": dict(prefix_sharing=True, pack_pairs=True),
                  "shared": dict(prefix_sharing=True, pack_pairs=False),
                  "concat": dict(prefix_sharing=False, pack_pairs=False)}


def _first_pairs(batch: dict, n: int) -> dict:
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in batch.items()}


def _forward_seconds(model: torch.nn.Module, batch: dict, layout: str, repeats: int, **opts) -> float:
    """The fastest of `repeats` forwards (no gradients) of `batch` under `layout`, synchronised on CUDA so that
    the clock sees the kernels, not their launch."""
    import time

    cuda = batch["chosen_input_ids"].is_cuda
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        concatenated_logps(model, batch, **LAYOUT_OPTIONS[layout], **opts)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def calibrate_layout_cost(model: torch.nn.Module, batch: dict, candidates: tuple, *, flex: bool = False,
                          repeats: int = 3, **opts) -> Optional[LayoutCost]:
    """Fit `LayoutCost` from timed forwards of `batch`, its first half and first quarter under each candidate
    layout: the differences between layouts on one batch cancel what they share, leaving calls and tokens.
    None where the batch cannot tell the two apart (a single pair, or a singular fit)."""
    sizes = sorted({max(1, batch["chosen_input_ids"].shape[0] // d) for d in (1, 2, 4)}, reverse=True)
    if len(candidates) < 2 or sizes[0] < 2:
        return None
    rows, seconds = [], []
    for size in sizes:
        sub = _first_pairs(batch, size)
        times = {layout: _forward_seconds(model, sub, layout, repeats, **opts) for layout in candidates}
        base = candidates[-1]
        for layout in candidates[:-1]:
            rows.append([attention_calls(sub, layout, flex) - attention_calls(sub, base, flex),
                         processed_tokens(sub, layout) - processed_tokens(sub, base)])
            seconds.append(times[layout] - times[base])
    a = torch.tensor(rows, dtype=torch.float64)
    if torch.linalg.matrix_rank(a) < 2:
        return None
    per_call, per_token = torch.linalg.lstsq(a, torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)).solution.flatten()
    return LayoutCost(max(float(per_call), 0.0), max(float(per_token), 0.0), candidates, flex)


def shared_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_chosen: int):
    """One row per pair, ``[chosen (c tokens) | rejected tokens after the shared prefix (r - s)]``, right-padded:
    ids [B, L], own-row positions [B, L], real-token flags [B, L], and per pair s, c and c + r - s [B]."""
    B = n_chosen
    c_len, r_len = attention_mask[:B].sum(-1), attention_mask[B:].sum(-1)
    shared = shared_prefix_lengths({"chosen_input_ids": input_ids[:B], "chosen_attention_mask": attention_mask[:B],
                                    "rejected_input_ids": input_ids[B:], "rejected_attention_mask": attention_mask[B:]})
    row_len = c_len + r_len - shared
    L = int(row_len.max().clamp(min=1))
    j = torch.arange(L, device=input_ids.device).unsqueeze(0)  # [1, L] column in the shared row
    in_chosen = j < c_len.unsqueeze(1)
    source = torch.where(in_chosen, j, j - c_len.unsqueeze(1) + shared.unsqueeze(1))  # column in its own row
    real = j < row_len.unsqueeze(1)
    source = torch.where(real, source, torch.zeros_like(source)).clamp(max=input_ids.shape[1] - 1)
    ids = torch.where(in_chosen, input_ids[:B].gather(1, source), input_ids[B:].gather(1, source))
    ids = torch.where(real, ids, torch.zeros_like(ids))
    return ids, source, real, shared, c_len, row_len


def _pair_packed_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_chosen: int, config):
    """The prefix-shared rows of `shared_rows` packed into ONE row with no padding: input ids [1, L] and
    own-row position ids [1, L] (L = sum of c + r - s), and the `PairSegments` that tell the ``sdpa_pairs``
    attention where each pair sits (no mask tensor over the row). Returns (forward kwargs, shared [B],
    chosen lengths [B], pair offsets [B])."""
    ids, source, real, shared, c_len, row_len = shared_rows(input_ids, attention_mask, n_chosen)
    r_len = attention_mask[n_chosen:].sum(-1)
    segments = PairSegments(c_len.tolist(), shared.tolist(), r_len.tolist(), attention_windows(config),
                            getattr(config, "layer_types", None) or None)
    offsets = torch.tensor(segments.offsets, device=input_ids.device)
    kwargs = dict(input_ids=ids[real].unsqueeze(0), position_ids=source[real].unsqueeze(0), attention_mask=None,
                  pair_segments=segments)
    return kwargs, shared, c_len, offsets


def _prefix_shared_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_chosen: int, config):
    """One row per pair: ``[chosen (c tokens) | rejected tokens after the shared prefix (r - s)]``.

    Returns (forward kwargs, shared [B], chosen lengths [B], row length L): input ids [B, L], position ids
    [B, L] (the rejected part keeps its own row's positions s..r-1, which is also what learned absolute
    position embeddings and partial rotary read) and a 4D mask [B, 1, L, L] that is causal except that
    rejected-part queries never see the chosen part after the shared prefix. A sliding-window layer type
    also hides keys whose own-row position is ``window`` or more behind the query's (transformers'
    ``kv > q - window``), so the rejected part sees exactly the window of its own row; with several layer
    types the mask is a dict keyed by type, as the model's forward accepts. Padding sits at the end of a
    row; its queries see what is before them (no empty softmax row)."""
    B = n_chosen
    ids, source, real, shared, c_len, row_len = shared_rows(input_ids, attention_mask, n_chosen)
    L = ids.shape[1]
    j = torch.arange(L, device=input_ids.device).unsqueeze(0)  # [1, L] column in the shared row
    query, key = j.unsqueeze(2), j.unsqueeze(1)  # [1, L, 1], [1, 1, L]
    c, s = c_len.view(B, 1, 1), shared.view(B, 1, 1)
    hidden_from_rejected = (query >= c) & (query < row_len.view(B, 1, 1)) & (key >= s) & (key < c)
    allowed = (key <= query) & ~hidden_from_rejected  # [B, L, L] True = may attend
    distance = source.unsqueeze(2) - source.unsqueeze(1)  # own-row position of the query minus the key's
    eager = getattr(config, "_attn_implementation", None) == "eager"  # eager adds the mask to the scores
    masks = {}
    for layer_type, window in attention_windows(config).items():
        mask = (allowed if window is None else allowed & (distance < window)).unsqueeze(1)
        if eager:
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
                ~mask, torch.finfo(torch.float32).min)
        masks[layer_type] = mask
    mask = next(iter(masks.values())) if len(masks) == 1 else masks
    return dict(input_ids=ids, position_ids=source, attention_mask=mask), shared, c_len, L


# ------------------------------------------------------------------------- mixture-of-experts routers

def router_aux_spec(hf_model: torch.nn.Module) -> Optional[tuple]:
    """(load-balancing function, experts, experts per token, config coefficient) of an MoE causal LM whose
    forward takes ``output_router_logits`` (Mixtral, Qwen2/3-MoE, OLMoE, JetMoE, ...), else None.

    The function is the family's own ``load_balancing_loss_func`` (the one its forward uses for
    ``aux_loss``); the coefficient is ``config.router_aux_loss_coef`` (``aux_loss_coef`` where the family
    names it so), 0 where neither exists."""
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "output_router_logits"):
        return None
    fn = getattr(sys.modules.get(type(hf_model).__module__), "load_balancing_loss_func", None)
    experts = (getattr(hf_model, "num_experts", None) or getattr(config, "num_local_experts", None)
               or getattr(config, "num_experts", None))
    top_k = getattr(hf_model, "num_experts_per_tok", None) or getattr(config, "num_experts_per_tok", None)
    if fn is None or not experts or not top_k:
        return None
    coef = getattr(config, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(config, "aux_loss_coef", None)
    return fn, int(experts), int(top_k), float(coef or 0.0)


# ------------------------------------------------------------------------------------------ the head

def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16/fp32 logits (bf16 under autocast: upcast before any reduction over V);
    float64 logits stay float64, so a float64 model gives float64 log-probs (exact checks in tests)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunk_logps(head: torch.nn.Module, transform, wpo: bool, hidden: torch.Tensor, targets: torch.Tensor):
    """Log-probs of `targets` [n] given final hidden states [n, H]; float32 [n] (and, with wpo, the
    detached logsumexp_v(2 * logp_v) [n] of TRL's WPO weight). Any head (LoRA on it, a logit transform);
    run under checkpoint, so autograd keeps about three to four [n, V] buffers in its backward."""
    logits = _upcast(head(hidden))
    if transform is not None:
        logits = transform(logits)
    lse = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not wpo:
        return token_logps
    with torch.no_grad():
        adjust = torch.logsumexp(2.0 * (logits - lse.unsqueeze(-1)), dim=-1)
    return token_logps, adjust


class _LinearHeadLogps(torch.autograd.Function):
    """log p(target) [n] through a plain linear head, holding one float32 [n, V] buffer at a time.

    Forward keeps only the hidden states and the logsumexp; backward recomputes the logits and turns them
    into d loss / d logits = g (onehot - softmax) in place, then the two matmuls. Autograd's version of the
    same (checkpointed `_chunk_logps`) keeps the logits, their exp, the softmax and the scattered one-hot
    alive together. Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        logits = torch.nn.functional.linear(hidden, weight, bias)  # autocast applies here, as in the head
        ctx.compute_dtype = logits.dtype
        logits = _upcast(logits)
        target = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        top = logits.amax(-1)
        lse = logits.sub_(top.unsqueeze(-1)).exp_().sum(-1).log_().add_(top)  # in place: no second buffer
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return target - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = ctx.compute_dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        logits = _upcast(torch.nn.functional.linear(h, w, None if bias is None else bias.to(dtype)))
        g = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.to(logits.dtype).unsqueeze(-1))  # -g softmax
        g.scatter_add_(-1, targets.unsqueeze(-1), grad.to(g.dtype).unsqueeze(-1))  # + g onehot
        g = g.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = (g @ w).to(hidden.dtype) if need_h else None
        grad_w = (g.t() @ h).to(weight.dtype) if need_w else None
        grad_b = g.sum(0).to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None


def _fused_head(head: torch.nn.Module, transform) -> bool:
    """Whether `_LinearHeadLogps` can stand in for calling the head: a plain ``nn.Linear`` (tied or not)
    that no hook wraps (device-map / offload, DeepSpeed ZeRO-3's gather), with no logit transform after it.
    Anything else (LoRA on the head, a soft-cap) runs the head module itself under checkpoint."""
    weight = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and transform is None and weight is not None
            and not hasattr(weight, "ds_id") and not hasattr(head, "_hf_hook")
            and not head._forward_hooks and not head._forward_pre_hooks)


# Float32 [positions, V] buffers one LM-head chunk holds at its peak, which size the chunks. `_LinearHeadLogps`:
# the logits, or in backward the gradient made from them in place, plus a bf16 copy under autocast (measured
# 1.1 buffers in float32). The checkpointed autograd chunk of any other head: measured 5 (logits, their exp,
# the softmax, the scattered one-hot and the sum of the two gradients), 7 with a soft-cap's tanh on top.
HEAD_CHUNK_BUFFERS = 2
GENERIC_CHUNK_BUFFERS = 7


def head_chunk_positions(vocab_size: int, chunk_size: int = 256, chunk_mb: Optional[float] = 64.0,
                         buffers: int = HEAD_CHUNK_BUFFERS) -> int:
    """Label positions per LM-head chunk: ``chunk_size`` at most, and as many as keep the chunk's transient
    (``buffers`` float32 [positions, V] buffers) within ``chunk_mb`` MiB, so the peak stays the same whatever
    the vocabulary (fused head, 64 MiB: SmolLM2's 49k vocabulary 170 positions; 131k: 64; 256k: 32).
    ``chunk_mb`` None: ``chunk_size`` alone."""
    if chunk_mb is None:
        return chunk_size
    per_position = buffers * 4 * max(int(vocab_size), 1)
    return max(1, min(chunk_size, int(chunk_mb * 2 ** 20) // per_position))


def _synced_chunk_count(head: torch.nn.Module, n_chunks: int) -> int:
    """Under DeepSpeed ZeRO-3 every call of the head gathers its weight from all ranks, so every rank
    must call it equally often: run the largest chunk count of any rank (the extra chunks are empty)."""
    weight = getattr(head, "weight", None)
    if weight is None or not hasattr(weight, "ds_id") or not torch.distributed.is_initialized():
        return n_chunks
    count = torch.tensor([n_chunks], device=weight.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def lean_token_logps(head, transform, wpo, hidden, targets, chunk_size, chunk_mb, vocab):
    """Chunked log-probs over [N, H]: a plain linear head through `_LinearHeadLogps` (one buffer), any other
    under checkpointed `_chunk_logps` (its [chunk, V] logits recomputed in backward instead of kept); each
    chunk as many positions as `head_chunk_positions` allows for the vocabulary and the path."""
    outs = []
    fused = _fused_head(head, transform)
    chunk_size = head_chunk_positions(vocab, chunk_size, chunk_mb, HEAD_CHUNK_BUFFERS if fused else GENERIC_CHUNK_BUFFERS)
    n_chunks = _synced_chunk_count(head, max(math.ceil(hidden.shape[0] / chunk_size), 1))
    for i in range(n_chunks):  # an empty chunk (no label left) gives zeros, still in the graph
        start = i * chunk_size
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if fused:
            token = _LinearHeadLogps.apply(h, head.weight, head.bias, t)
            if wpo:  # detached: one more forward of the chunk, no graph
                with torch.no_grad():
                    outs.append((token, _chunk_logps(head, None, True, h, t)[1]))
            else:
                outs.append(token)
        elif torch.is_grad_enabled():
            outs.append(checkpoint(_chunk_logps, head, transform, wpo, h, t, use_reentrant=False))
        else:
            outs.append(_chunk_logps(head, transform, wpo, h, t))
    if wpo:
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    return torch.cat(outs), None


# ------------------------------------------------------------------------------------------ public

def settle_logps_options(model: torch.nn.Module, has_rejected: bool, *, naive: bool, packing: bool,
                         prefix_sharing: bool, pack_pairs: bool, router_aux: bool):
    """Refuse, with one line and before any compute, the options the model cannot run, and settle what they
    leave: (HF model, None on the naive path; config; prefix_sharing; pack_pairs; router-loss spec or None)."""
    hf_model = unwrap_decoder(model) if not naive else None
    config = (hf_model if hf_model is not None else _unwrap_for_config(model)).config
    if hf_model is not None:
        problem = lean_problem(hf_model)
        if problem:
            raise ValueError(f"no memory-lean path for model type '{config.model_type}': {problem}; pass naive=True")
    if packing:
        _check_packing(config)
    if prefix_sharing:
        resolve_prefix_sharing(config, True, packing)  # one-line error where it cannot run
        prefix_sharing = has_rejected  # nothing to share without rejected rows
    pack_pairs = bool(pack_pairs and prefix_sharing)
    if pack_pairs and not use_pair_attention(config):
        raise ValueError(f"pack_pairs runs on SDPA attention; the model uses '{config._attn_implementation}'; "
                         f"set pack_pairs=False")
    aux_spec = router_aux_spec(unwrap_decoder(_unwrap_for_config(model)) if naive else hf_model) if router_aux else None
    if aux_spec and naive and prefix_sharing:
        raise ValueError("the full-logits path of an MoE model computes its router loss on stacked rows; "
                         "set prefix_sharing=False")
    return hf_model, config, prefix_sharing, pack_pairs, aux_spec


def decoder_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   n_chosen: int, config, *, packing: bool, prefix_sharing: bool, pack_pairs: bool):
    """The decoder's forward kwargs for the layout, and where each kept (row, col) of the stacked rows lands
    in its flattened output (flat_pos [N]), so every layout gives the stacked rows' log-probs; plus how many
    stacked rows each decoder token stands for (token_weight, the router loss's weights)."""
    R, T = input_ids.shape
    token_weight = attention_mask  # per decoder token: how many stacked rows it stands for (router loss)
    if packing:  # index of (row, col) among the real tokens, in the packed row's order
        flat_pos = (attention_mask.reshape(-1).cumsum(0) - 1).view(R, T)[rows, cols]
        packed_ids, position_ids = _packed_inputs(input_ids, attention_mask)
        forward_kwargs = dict(input_ids=packed_ids, position_ids=position_ids, attention_mask=None)
        token_weight = torch.ones_like(packed_ids)
    elif pack_pairs:  # as below, each pair's row starting at its offset in the one packed row
        forward_kwargs, shared, c_len, offsets = _pair_packed_inputs(input_ids, attention_mask, n_chosen, config)
        segments = forward_kwargs["pair_segments"]
        pair = rows % n_chosen
        moved = (rows >= n_chosen) & (cols >= shared[pair])
        flat_pos = offsets[pair] + torch.where(moved, c_len[pair] + cols - shared[pair], cols)
        lengths = torch.tensor(segments.lengths, device=shared.device)
        column = torch.arange(segments.total, device=shared.device) - torch.repeat_interleave(offsets, lengths)
        token_weight = (1 + (column < torch.repeat_interleave(shared, lengths)).long()).unsqueeze(0)
    elif prefix_sharing:  # chosen rows keep their columns; rejected columns past the shared prefix move
        forward_kwargs, shared, c_len, L = _prefix_shared_inputs(input_ids, attention_mask, n_chosen, config)
        pair = rows % n_chosen
        moved = (rows >= n_chosen) & (cols >= shared[pair])
        flat_pos = pair * L + torch.where(moved, c_len[pair] + cols - shared[pair], cols)
        j = torch.arange(L, device=input_ids.device).unsqueeze(0)
        row_len = c_len + attention_mask[n_chosen:].sum(-1) - shared
        token_weight = (j < row_len.unsqueeze(1)).long() + (j < shared.unsqueeze(1)).long()
    else:
        flat_pos = rows * T + cols
        forward_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    return forward_kwargs, flat_pos, token_weight


def label_token_logps(model: torch.nn.Module, hf_model: Optional[torch.nn.Module], config, forward_kwargs: dict,
                      flat_pos: torch.Tensor, targets: torch.Tensor, *, naive: bool, wpo: bool, pack_pairs: bool,
                      chunk_size: int, chunk_mb: Optional[float]):
    """The one forward pass, and the log-prob of each kept label token [N]: through the full logits (naive)
    or the decoder body and the chunked head (lean). Returns (model outputs, which carry the router logits;
    token log-probs [N]; with wpo the detached logsumexp_v(2 logp_v) [N], else None)."""
    wpo_adjust = None
    no_masks = skip_masks() if pack_pairs else contextlib.nullcontext()  # the pairs' attention needs none
    if naive:
        with no_masks:
            outputs = model(**forward_kwargs, use_cache=False)
        logits = outputs.logits  # [R, T, V] or [1, L, V]
        logps = torch.log_softmax(_upcast(logits), dim=-1).flatten(0, 1)[flat_pos]  # [N, V]
        token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if wpo:
            with torch.no_grad():
                wpo_adjust = torch.logsumexp(2.0 * logps, dim=-1)
    else:
        transform = logit_transform(config)
        with no_masks:
            outputs = hf_model.get_decoder()(**forward_kwargs, use_cache=False)
        hidden = outputs.last_hidden_state.flatten(0, 1)[flat_pos]  # post final norm; [N, H]
        head = hf_model.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or config.vocab_size
        token_logps, wpo_adjust = lean_token_logps(head, transform, wpo, hidden, targets, chunk_size, chunk_mb, vocab)
    return outputs, token_logps, wpo_adjust


def sequence_logps(token_logps: torch.Tensor, wpo_adjust: Optional[torch.Tensor], rows: torch.Tensor,
                   next_labels: torch.Tensor, n_chosen: int, wpo: bool) -> dict:
    """The per-token log-probs summed back into their rows: the chosen_* (and rejected_*) entries of the
    `concatenated_logps` dict (summed log-probs, label-token counts, with wpo the WPO means)."""
    R = next_labels.shape[0]
    device = token_logps.device
    sums = torch.zeros(R, dtype=token_logps.dtype, device=device).index_add_(0, rows, token_logps)
    counts = (next_labels != IGNORE_INDEX).sum(-1).float()
    out = {"chosen_logps": sums[:n_chosen], "chosen_tokens": counts[:n_chosen]}
    if R > n_chosen:
        out.update(rejected_logps=sums[n_chosen:], rejected_tokens=counts[n_chosen:])
    if wpo:
        adjusted = token_logps.detach() - wpo_adjust
        means = torch.zeros(R, dtype=adjusted.dtype, device=device).index_add_(0, rows, adjusted)
        means = means / counts.clamp(min=1)
        out["chosen_wpo_logps"] = means[:n_chosen]
        if R > n_chosen:
            out["rejected_wpo_logps"] = means[n_chosen:]
    return out


def router_aux_loss(aux_spec: tuple, outputs, token_weight: torch.Tensor, device: torch.device) -> dict:
    """``aux_loss`` and ``aux_loss_coef`` of an MoE model from the forward's router logits, so a shared or
    packed layout reports the loss the stacked rows would."""
    fn, experts, top_k, coef = aux_spec
    # The family's own function with each token weighted by the stacked rows it stands for (a shared
    # prefix twice, padding never): the value its forward gives for the stacked [2B, T] rows.
    return {"aux_loss": torch.as_tensor(fn(outputs.router_logits, experts, top_k, token_weight), device=device),
            "aux_loss_coef": torch.tensor(coef, device=device)}


def concatenated_logps(model: torch.nn.Module, batch: dict, *, chunk_size: int = 256,
                       chunk_mb: Optional[float] = 64.0, wpo: bool = False, naive: bool = False,
                       packing: bool = False, prefix_sharing: bool = False, pack_pairs: bool = False,
                       router_aux: bool = False) -> dict:
    """Summed log-probs of the label tokens of every chosen and rejected row, from one forward pass.

    Args:
        model: an HF causal LM or a peft model around one (LoRA; the LM head may carry LoRA or be tied).
        batch: the collator's dict (see module docstring); without ``rejected_*`` keys only chosen is done.
        chunk_size: label positions per LM-head chunk on the lean path, at most.
        chunk_mb: memory budget (MiB) of one LM-head chunk's transient; fewer positions per chunk where the
            vocabulary is larger (`head_chunk_positions`), so the peak does not grow with V. None: chunk_size alone.
        wpo: also return TRL's WPO per-sequence terms (detached).
        naive: full [R, T, V] logits -> float32 log_softmax -> gather (the model's own forward); False runs
            the lean path as given, unchecked (`PreferenceLogpsModel` / `concatenated_forward` check it).
        packing: run the decoder on the real tokens only, packed into one row (padding-free).
        prefix_sharing: run each pair's common prefix once (one row per pair, custom 4D mask; see module
            docstring). Exclusive with packing; a no-op without rejected rows.
        pack_pairs: with prefix_sharing, the pairs' rows packed into one row with no padding, attention run per
            pair by ``sdpa_pairs`` (attention.py; the model's SDPA is switched to it), no [rows, 1, T, T] mask.
        router_aux: on an MoE model, also return ``aux_loss`` (the router load-balancing loss over the
            tokens of the stacked rows, as the model's own forward computes it) and ``aux_loss_coef``.

    Returns a dict of float32 [B] tensors (float64 for a float64 model): ``chosen_logps`` (sum over label tokens of log p(token | prefix);
    the token at t is predicted by position t-1), ``chosen_tokens`` (label-token count), with wpo
    ``chosen_wpo_logps`` = mean over label tokens of (log p(token) - logsumexp_v(2 log p_v)), and the same
    ``rejected_*`` keys when the batch has rejected rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    input_ids, attention_mask, labels, n_chosen = concatenated_inputs(batch)
    check_padding(attention_mask, labels)
    hf_model, config, prefix_sharing, pack_pairs, aux_spec = settle_logps_options(
        model, input_ids.shape[0] > n_chosen, naive=naive, packing=packing, prefix_sharing=prefix_sharing,
        pack_pairs=pack_pairs, router_aux=router_aux)
    if not naive and not packing:
        # Right padding: columns past the longest real row change nothing; drop them before the decoder.
        T = int(attention_mask.sum(-1).max().clamp(min=1))
        input_ids, attention_mask, labels = input_ids[:, :T], attention_mask[:, :T], labels[:, :T]

    # Position t predicts the label at t + 1; keep only positions whose next token is a label.
    next_labels = labels[:, 1:]
    rows, cols = (next_labels != IGNORE_INDEX).nonzero(as_tuple=True)  # [N] each, row-major order
    targets = next_labels[rows, cols]
    forward_kwargs, flat_pos, token_weight = decoder_inputs(input_ids, attention_mask, rows, cols, n_chosen, config,
                                                            packing=packing, prefix_sharing=prefix_sharing,
                                                            pack_pairs=pack_pairs)
    if aux_spec:
        forward_kwargs["output_router_logits"] = True

    outputs, token_logps, wpo_adjust = label_token_logps(model, hf_model, config, forward_kwargs, flat_pos, targets,
                                                         naive=naive, wpo=wpo, pack_pairs=pack_pairs,
                                                         chunk_size=chunk_size, chunk_mb=chunk_mb)
    out = sequence_logps(token_logps, wpo_adjust, rows, next_labels, n_chosen, wpo)
    if aux_spec:
        out.update(router_aux_loss(aux_spec, outputs, token_weight, token_logps.device))
    return out


def relative_difference(a: dict, b: dict) -> float:
    """max over sequences of |a - b| / |b| for the summed log-probs (the self-check's measure)."""
    worst = 0.0
    for key in ("chosen_logps", "rejected_logps"):
        if key in a and key in b:
            ref = b[key].double()
            diff = (a[key].double() - ref).abs() / ref.abs().clamp(min=1e-12)
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def broadcast_cost(cost: Optional[LayoutCost]) -> Optional[LayoutCost]:
    """Rank 0's fitted cost on every process, so every rank runs a batch in the same layout."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return cost
    box = [cost]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _probe(batch: dict, model: torch.nn.Module, pairs: int = 2) -> dict:
    """The first ``pairs`` pairs of a batch (tensors sliced on rows, other keys dropped), on the model's device."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    return {k: v[:pairs].to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 2
            and k.split("_", 1)[0] in ("chosen", "rejected")}


def _self_check_rtol(hf_model: torch.nn.Module) -> float:
    param = next(hf_model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    return SELF_CHECK_RTOL.get(dtype, SELF_CHECK_RTOL_16BIT)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # accelerate's dependency

    return psutil.virtual_memory().available


@contextlib.contextmanager
def float32_weights(model: torch.nn.Module):
    """The model's 16-bit float weights and buffers held as float32 for the duration (restored exactly after:
    every bf16 / fp16 value is a float32 value), where the float32 copies fit the device's free memory with
    room to spare; yields whether they were upcast. The self-check then measures its layouts' structure in
    float32, as on a float32 model, instead of two different roundings of 16-bit arithmetic (a 16-bit
    forward differs from itself by about 1e-2 relative between layouts). 4-bit weights are left as they are."""
    low = [t for t in list(model.parameters()) + list(model.buffers()) if t.dtype in (torch.bfloat16, torch.float16)]
    need = sum(t.numel() for t in low) * 4
    if not low or free_memory_bytes(low[0].device) < 2 * need:
        yield False
        return
    dtypes = [t.dtype for t in low]
    for t in low:
        t.data = t.data.float()
    try:
        yield True
    finally:
        for t, dtype in zip(low, dtypes):
            t.data = t.data.to(dtype)


def _agree_across_processes(ok: bool) -> bool:
    """All ranks must take the same path (ZeRO-3 counts head calls across ranks): any rank's no wins."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return ok
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    flag = torch.tensor([0 if ok else 1], device=f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) == 0


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


class PathDecision:
    """What the self-check found for one model: the log-prob path, the layout, and why."""

    def __init__(self):
        self.path: Optional[str] = None  # "lean" | "full"; None until checked
        self.path_diff: Optional[float] = None  # lean vs the model's own logits (relative)
        self.path_reason = "not checked yet"
        self.sharing: Optional[bool] = None
        self.sharing_diff: Optional[float] = None  # prefix-shared vs stacked rows (relative)
        self.sharing_reason = "not checked yet"
        self.pack_pairs: bool = False  # with sharing: the pairs packed into one row (else one padded row per pair)
        self.padded_exact: bool = False  # with packed pairs exact: whether a padded row per pair is exact too
        self.cost: Optional[LayoutCost] = None  # both exact: the fitted cost that picks one per batch
        self.layout_text = ""  # with sharing: how the pairs reach the decoder (the start-up line names it)


def check_lean_path(model: torch.nn.Module, probe: dict, hf_model: torch.nn.Module, decision: PathDecision, *,
                    path: str, family: str, rtol: float, packing: bool, chunk_size: int,
                    chunk_mb: Optional[float]):
    """Settle ``decision.path`` by comparing the lean log-probs with the model's own on the probe (the part
    of `self_check` that picks lean or full logits; "lean" requested and not exact raises one line).
    Returns (full-logits result, lean result or None where the lean path did not run)."""
    lean = None
    full = concatenated_logps(model, probe, naive=True, packing=packing)
    problem = lean_problem(hf_model)
    if path == "full":
        decision.path, decision.path_reason = "full", "forced by the recipe (train.logps_path: full)"
    elif problem:
        decision.path, decision.path_reason = "full", f"cannot run: {problem}"
    else:
        lean = concatenated_logps(model, probe, chunk_size=chunk_size, chunk_mb=chunk_mb, packing=packing)
        decision.path_diff = relative_difference(lean, full)
        ok = _agree_across_processes(decision.path_diff <= rtol)
        decision.path = "lean" if ok else "full"
        decision.path_reason = (f"equal to the model's own logits within {rtol:g}" if ok else
                                f"differs from the model's own logits by {decision.path_diff:.1e} relative "
                                f"(more than {rtol:g})")
    if path == "lean" and decision.path != "lean":
        raise ValueError(f"train.logps_path: lean, but for model type '{family}' the lean log-probs "
                         f"{decision.path_reason}; set train.logps_path: auto or full")
    return full, lean


def try_shared_layout(model: torch.nn.Module, probe: dict, decision: PathDecision, stacked: dict, pack: bool, *,
                      naive: bool, rtol: float, chunk_size: int, chunk_mb: Optional[float]) -> tuple[bool, str]:
    """Whether one prefix-shared layout (``pack``: the pairs packed into one row, else a padded row per pair)
    gives the stacked rows' log-probs on the probe, agreed by all ranks, and why not (records the difference
    in ``decision.sharing_diff``). A forward that refuses the layout counts as a no, not an error."""
    try:
        shared = concatenated_logps(model, probe, chunk_size=chunk_size, chunk_mb=chunk_mb, naive=naive,
                                    prefix_sharing=True, pack_pairs=pack)
        decision.sharing_diff = relative_difference(shared, stacked)
        ok = decision.sharing_diff <= rtol
        reason = (f"the shared layout differs from stacked rows by {decision.sharing_diff:.1e} "
                  f"relative (the family's attention does not follow the "
                  f"{'per-pair attention' if pack else '4D mask'} or position ids)")
    except Exception as e:  # e.g. ALiBi built from a 2D mask
        ok, reason = False, (f"the family's forward refuses "
                             f"{'the packed pairs' if pack else 'a 4D mask'} ({type(e).__name__}: {str(e)[:120]})")
    return _agree_across_processes(ok), reason


def describe_shared_layout(decision: PathDecision, config, probe: dict, ok: bool, reason: str) -> None:
    """Fill ``decision.layout_text`` and ``decision.sharing_reason`` for the start-up line: the layout that
    runs (and its attention kernel) and any sliding windows where sharing is exact, else why it is off."""
    windows = attention_windows(config)
    sliding = {t: w for t, w in windows.items() if w is not None}
    if ok and decision.pack_pairs:
        from dpo_accel.model.attention import flex_available

        kernel = "FlexAttention block mask" if flex_available(probe["chosen_input_ids"].device) else \
            "SDPA per pair, no mask over the row"
        decision.layout_text = f"pairs packed into one row ({kernel})"
    elif ok:
        decision.layout_text = "one padded row per pair (4D mask)"
    decision.sharing_reason = (("exact" + (f", sliding window {', '.join(str(w) for w in sliding.values())} "
                                           f"in its own-row positions" if sliding else ""))
                               if ok else reason)


def choose_shared_layout(model: torch.nn.Module, probe: dict, decision: PathDecision, stacked: dict, config, *,
                         naive: bool, rtol: float, family: str, prefix_sharing: Optional[bool],
                         pack_pairs: Optional[bool], chunk_size: int, chunk_mb: Optional[float]) -> None:
    """Settle prefix sharing on the probe, fastest exact layout first: the pairs packed into one row (SDPA),
    then one padded row per pair; ``prefix_sharing`` / ``pack_pairs`` True raise one line where theirs is not
    exact. Sets ``decision.sharing``, ``.pack_pairs``, ``.layout_text`` and ``.sharing_reason``."""
    def attempt(pack: bool) -> tuple[bool, str]:
        return try_shared_layout(model, probe, decision, stacked, pack, naive=naive, rtol=rtol,
                                 chunk_size=chunk_size, chunk_mb=chunk_mb)

    impl = getattr(config, "_attn_implementation", None)
    ok, reason = False, "not tried"
    if pack_pairs is not False and impl in ("sdpa", PAIR_ATTENTION):  # fastest first: no padding, no mask
        ok, reason = attempt(True)
        decision.pack_pairs = ok
        if not ok:
            config._attn_implementation = impl  # back to what the model had
        elif pack_pairs is None:  # auto: a padded row per pair too, if exact, for the batches it runs faster
            decision.padded_exact = attempt(False)[0]
    elif pack_pairs is True:
        raise ValueError(f"train.pack_pairs: true runs on SDPA attention; model type '{family}' uses "
                         f"'{impl}'; set train.pack_pairs: null or false")
    if not ok and pack_pairs is not True:
        ok, reason = attempt(False)
        decision.pack_pairs = False
    decision.sharing = ok
    describe_shared_layout(decision, config, probe, ok, reason)
    if pack_pairs is True and not decision.pack_pairs:
        raise ValueError(f"train.pack_pairs: true, but for model type '{family}' {reason}; "
                         f"set train.pack_pairs: null or false")
    if prefix_sharing is True and not ok:
        raise ValueError(f"train.prefix_sharing: true, but for model type '{family}' {reason}; "
                         f"set train.prefix_sharing: null or false")


def self_check(model: torch.nn.Module, probe: dict, *, path: str = "auto", prefix_sharing: Optional[bool] = None,
               packing: bool = False, chunk_size: int = 256, chunk_mb: Optional[float] = 64.0,
               pack_pairs: Optional[bool] = None) -> PathDecision:
    """Settle the log-prob path and the layout on a probe batch (a couple of real pairs), without gradients.

    path "auto": lean where its log-probs equal those of the model's own forward (full logits ->
    float32 log-softmax) within `SELF_CHECK_RTOL`, full otherwise; "lean" raises one line where they do not;
    "full" skips the check. prefix_sharing None (auto): on where the config allows it and the shared layout
    gives the stacked rows' log-probs on the probe (a family whose attention ignores a 4D mask or position
    ids fails here, or raises, and gets stacked rows); True raises one line where it does not; False: off.
    With sharing on, ``pack_pairs`` None (auto) tries the fastest exact layout first: the pairs packed into one
    row (SDPA models; `attention.py`), then one padded row per pair; True requires the packed one; False skips it.
    """
    if path not in ("auto", "lean", "full"):
        raise ValueError(f"logps path must be auto, lean or full; got '{path}'")
    hf_model = unwrap_decoder(_unwrap_for_config(model))
    config = hf_model.config
    family = getattr(config, "model_type", type(hf_model).__name__)
    decision = PathDecision()
    static_sharing = resolve_prefix_sharing(config, prefix_sharing, packing)  # raises where True cannot run
    has_pairs = "rejected_input_ids" in probe and probe["rejected_input_ids"].shape[0] > 0
    was_training = model.training
    model.eval()  # dropout off: the two paths must see the same function
    device_type = probe["chosen_input_ids"].device.type
    try:  # no autocast: under it a soft-cap rounds differently in the two paths; 16-bit weights as float32
        with torch.no_grad(), torch.autocast(device_type, enabled=False), float32_weights(model) as upcast:
            rtol = SELF_CHECK_RTOL[torch.float32] if upcast else _self_check_rtol(hf_model)
            full, lean = check_lean_path(model, probe, hf_model, decision, path=path, family=family, rtol=rtol,
                                         packing=packing, chunk_size=chunk_size, chunk_mb=chunk_mb)
            naive = decision.path == "full"
            if prefix_sharing is False:
                decision.sharing, decision.sharing_reason = False, "off in the recipe"
            elif packing:
                decision.sharing, decision.sharing_reason = False, "padding-free packing instead"
            elif not static_sharing:
                decision.sharing, decision.sharing_reason = False, _prefix_sharing_problem(config)
            elif naive and router_aux_spec(hf_model):
                decision.sharing, decision.sharing_reason = False, ("the full-logits path of an MoE model "
                                                                    "computes its router loss on stacked rows")
            elif not has_pairs:
                decision.sharing, decision.sharing_reason = static_sharing, "no rejected rows in the probe to check"
            else:
                choose_shared_layout(model, probe, decision, full if naive else lean, config, naive=naive,
                                     rtol=rtol, family=family, prefix_sharing=prefix_sharing,
                                     pack_pairs=pack_pairs, chunk_size=chunk_size, chunk_mb=chunk_mb)
    finally:
        model.train(was_training)
    return decision


def decision_line(decision: PathDecision, hf_model: torch.nn.Module) -> str:
    """The one start-up line: the path (and, for the full one, what it costs), the layout and why."""
    config = hf_model.config
    family = getattr(config, "model_type", type(hf_model).__name__)
    if decision.path == "lean":
        head = type(hf_model.get_output_embeddings()).__name__
        path = (f"log-probs: memory-lean ({type(hf_model.get_decoder()).__name__} -> {head} in chunks; "
                f"{decision.path_reason}, measured {decision.path_diff:.1e})")
    else:
        vocab = getattr(config, "vocab_size", None) or hf_model.get_input_embeddings().num_embeddings
        cost = _bytes(8 * vocab * 1024)  # float32 logits and their log-softmax, per 1k tokens of the batch
        path = (f"log-probs: full logits for model type '{family}' ({decision.path_reason}; costs about "
                f"{cost} per 1k tokens of the batch, vocab {vocab})")
    sharing = "on" if decision.sharing else "off"
    layout = f"; {decision.layout_text}" if decision.sharing and decision.layout_text else ""
    if decision.sharing and decision.cost is not None:
        layout += f" or one padded row per pair (4D mask), {decision.cost.describe()}"
    return f"{path} | prefix sharing {sharing}: {decision.sharing_reason}{layout}"


class PreferenceLogpsModel(torch.nn.Module):
    """The (peft) HF model plus the concatenated log-prob computation as ONE module forward.

    Give this module, not the HF model, to ``accelerator.prepare``: DDP/FSDP then see a single forward
    that covers the decoder body and the chunked LM head, so gradient synchronisation (DDP) and parameter
    gathering of the root unit (FSDP) cover the head too. ``.model`` is the wrapped HF model (save and
    merge through it); the options are plain attributes and may be changed between calls.

    ``logps_path`` ("auto", "lean", "full"; ``naive=True`` is "full"), ``prefix_sharing`` and ``pack_pairs``
    (None = auto: the pairs packed into one row where exact, else one padded row per pair; where both are
    exact, each batch in the one a cost fitted at start-up calls cheaper, or in ``layout_cost``'s pick when
    given) are settled by `settle_logps_path` on a probe batch before training, or else on the first batch
    this module sees (its first two pairs). On an MoE model (``router_aux`` None = auto) the output gains
    ``aux_loss`` / ``aux_loss_coef`` whenever gradients are on, so a reference forward never computes it.
    """

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = 256, chunk_mb: Optional[float] = 64.0,
                 wpo: bool = False,
                 naive: bool = False, packing: bool = False, prefix_sharing: Optional[bool] = False,
                 pack_pairs: Optional[bool] = None, logps_path: str = "auto", router_aux: Optional[bool] = None,
                 layout_cost: Optional[LayoutCost] = None):
        super().__init__()
        if logps_path not in ("auto", "lean", "full"):
            raise ValueError(f"logps_path must be auto, lean or full; got '{logps_path}'")
        hf_model = unwrap_decoder(_unwrap_for_config(model))
        config = hf_model.config
        if packing:  # refused at build time, before any compute
            _check_packing(config)
        self.model = model
        self.chunk_size = chunk_size
        self.chunk_mb = chunk_mb
        self.wpo = wpo
        self.packing = packing
        self.requested_path = "full" if naive else logps_path
        self.requested_sharing = prefix_sharing
        self.prefix_sharing = resolve_prefix_sharing(config, prefix_sharing, packing)  # until the self-check
        self.requested_pack = pack_pairs
        self.pack_pairs = (self.prefix_sharing and pack_pairs is not False
                           and getattr(config, "_attn_implementation", None) in ("sdpa", PAIR_ATTENTION))
        self.router_aux = router_aux_spec(hf_model) is not None if router_aux is None else router_aux
        self.layout_cost = layout_cost  # a cost fitted elsewhere (the policy's, for its reference copy): not re-timed
        self.decision: Optional[PathDecision] = None
        if self.requested_path == "full" and prefix_sharing is not None:  # nothing left to check
            self.decision = PathDecision()
            self.decision.path, self.decision.path_reason = "full", "requested"
            self.decision.sharing = self.prefix_sharing
            self.decision.pack_pairs = self.pack_pairs
            self.decision.sharing_reason = "requested" if self.prefix_sharing else "off as requested"

    @property
    def naive(self) -> bool:
        """Whether the full-logits path runs (settled, or forced)."""
        return (self.decision.path if self.decision else self.requested_path) == "full"

    @property
    def layout(self) -> str:
        """How the decoder sees a batch: "packed", "packed_shared" (prefix sharing, pairs packed into one row),
        "shared" (prefix sharing, a padded row per pair) or "concat" (see processed_tokens)."""
        if self.packing:
            return "packed"
        if self.prefix_sharing:
            return "packed_shared" if self.pack_pairs else "shared"
        return "concat"

    @property
    def layout_reason(self) -> str:
        """Why prefix sharing is on or off (the self-check's finding, or the config's before it ran)."""
        if self.decision is not None:
            return self.decision.sharing_reason
        return _prefix_sharing_problem(unwrap_decoder(_unwrap_for_config(self.model)).config) or "not checked yet"

    def settle(self, probe: dict) -> PathDecision:
        """Run the self-check on ``probe`` (its first two pairs) and adopt its path and layout; where packed
        pairs and a padded row per pair are both exact, time them on the whole probe and keep the fitted
        `LayoutCost`, which then picks the cheaper one for every batch."""
        self.decision = self_check(self.model, _probe(probe, self.model), path=self.requested_path,
                                   prefix_sharing=self.requested_sharing, packing=self.packing,
                                   chunk_size=self.chunk_size, chunk_mb=self.chunk_mb, pack_pairs=self.requested_pack)
        self.prefix_sharing = bool(self.decision.sharing)
        self.pack_pairs = self.prefix_sharing and self.decision.pack_pairs
        if self.pack_pairs and self.decision.padded_exact:
            self.decision.cost = self.layout_cost or self.calibrate(
                _probe(probe, self.model, pairs=probe["chosen_input_ids"].shape[0]))
        return self.decision

    def calibrate(self, batch: dict) -> Optional[LayoutCost]:
        """The fitted cost of packed pairs against a padded row per pair (`calibrate_layout_cost`), measured
        the way training runs (no gradients, the model's own dtype), agreed by every process."""
        from dpo_accel.model.attention import flex_available

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                cost = calibrate_layout_cost(self.model, batch, ("packed_shared", "shared"),
                                             flex=flex_available(batch["chosen_input_ids"].device),
                                             chunk_size=self.chunk_size, chunk_mb=self.chunk_mb, naive=self.naive)
        finally:
            self.model.train(was_training)
        return broadcast_cost(cost)

    def layout_of(self, batch: dict) -> str:
        """The layout this batch runs in: the fitted cost's pick where there is one, else the settled layout."""
        cost = self.decision.cost if self.decision is not None else None
        if cost is not None and not self.packing and "rejected_input_ids" in batch:
            return cost.choose(batch)
        return self.layout

    def forward(self, **batch) -> dict:
        """``module(**batch)`` -> the dict of `concatenated_logps`; keys outside the contract are ignored."""
        if self.decision is None:
            self.settle(batch)
        pack_pairs = self.pack_pairs and self.layout_of(batch) == "packed_shared"
        return concatenated_logps(self.model, batch, chunk_size=self.chunk_size, chunk_mb=self.chunk_mb, wpo=self.wpo,
                                  naive=self.naive, packing=self.packing, prefix_sharing=self.prefix_sharing,
                                  pack_pairs=pack_pairs, router_aux=self.router_aux and torch.is_grad_enabled())


def settle_logps_path(module: PreferenceLogpsModel, probe_batch: dict, requested: str = "auto") -> str:
    """The start-up self-check for the training loop (call it before accelerator.prepare, on a collated
    batch of a couple of real training pairs): sets ``module``'s path and layout and returns the one line
    to print. ``requested`` is ``train.logps_path``; "lean" on a model where the lean log-probs differ from
    the model's own raises ValueError (one line), as does ``prefix_sharing: true`` where sharing is not exact."""
    module.requested_path = requested
    decision = module.settle(probe_batch)
    return decision_line(decision, unwrap_decoder(_unwrap_for_config(module.model)))


_PLAIN_DECISIONS: "weakref.WeakKeyDictionary[torch.nn.Module, PathDecision]" = weakref.WeakKeyDictionary()


def concatenated_forward(model: torch.nn.Module, batch: dict, average_log_prob: bool = False, **opts):
    """(chosen_logps, rejected_logps), each float32 [B]: the sum over label tokens of log p(token | prefix),
    or with ``average_log_prob`` the mean per label token. One forward for chosen and rejected together.

    ``model`` is any HF causal LM, a peft model around one, or a `PreferenceLogpsModel` (possibly wrapped
    by accelerate/DDP), whose own options then apply; ``opts`` go to `concatenated_logps` (chunk_size, wpo,
    naive, packing, prefix_sharing). The path is chosen as the training module chooses it: without
    ``naive``, the self-check runs on this batch's first pairs the first time a model is seen (remembered
    per model) and picks lean or full logits; ``prefix_sharing=None`` is checked the same way. Without
    ``rejected_*`` keys in the batch, rejected_logps is None.
    """
    inner = getattr(model, "module", model)
    if isinstance(inner, PreferenceLogpsModel):
        if opts:
            raise TypeError(f"options {sorted(opts)} are set on the PreferenceLogpsModel, not per call")
        out = model(**batch)
    else:
        auto_sharing = opts.get("prefix_sharing", False) is None
        if "naive" not in opts or auto_sharing:
            key = unwrap_decoder(_unwrap_for_config(model))
            decision = _PLAIN_DECISIONS.get(key)
            if decision is None:  # both questions at once, answered for this model once
                decision = _PLAIN_DECISIONS[key] = self_check(model, _probe(batch, model))
            opts.setdefault("naive", decision.path == "full")
            if auto_sharing:
                opts["prefix_sharing"] = bool(decision.sharing) and not opts.get("packing", False)
                opts.setdefault("pack_pairs", decision.pack_pairs)
        out = concatenated_logps(model, batch, **opts)
    chosen, rejected = out["chosen_logps"], out.get("rejected_logps")
    if average_log_prob:
        chosen = chosen / out["chosen_tokens"].clamp(min=1)
        if rejected is not None:
            rejected = rejected / out["rejected_tokens"].clamp(min=1)
    return chosen, rejected
