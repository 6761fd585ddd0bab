"""Per-sequence log-probabilities of the label tokens of a preference batch, in one forward pass.

The batch contract (see data.py): ``chosen_input_ids`` / ``chosen_attention_mask`` / ``chosen_labels``
LongTensor [B, Tc] and the same three ``rejected_*`` keys [B, Tr]; labels are aligned with the input ids
(not shifted), -100 on prompt and padding; padding is on the right; other keys are ignored. Chosen and
rejected rows are padded to one length and stacked, chosen first, into [2B, T], so the policy (and the
reference) runs once per batch, as in the original DPO repository.

Two ways to turn hidden states into log-probs:

- memory-lean (default): the decoder body gives the final hidden states [2B, T, H]; only the positions
  whose NEXT token is a label are kept ([N, H], prompt and padding never reach the LM head); the LM head
  runs on chunks of ``chunk_size`` of them with a float32 logsumexp under non-reentrant
  ``torch.utils.checkpoint``, so at most one chunk's [chunk_size, V] logits exist at a time, in the
  forward and in the backward. The [2B, T, V] logits are never built.
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
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Model types whose causal-LM forward is ``transform(lm_head(decoder(...).last_hidden_state))``, checked
# against the model's own logits with a tiny random model of each type (transformers 5.23). The value
# names the transform of the logits: None, "softcap" (config.final_logit_softcapping, Gemma 2/3),
# "divide" (config.logits_scaling, Granite) or "multiply" (config.logit_scale, Cohere).
LEAN_MODEL_TYPES: dict[str, Optional[str]] = {
    "llama": None, "mistral": None, "qwen2": None, "qwen3": None, "phi3": None, "olmo2": None,
    "smollm3": None, "gemma": None, "gemma2": "softcap", "gemma3_text": "softcap",
    "granite": "divide", "cohere": "multiply", "cohere2": "multiply",
}

# Attention implementations that keep packed sequences apart when given restarting position_ids and no
# attention mask: sdpa / eager / flex get a block-diagonal causal mask from transformers' mask creation,
# flash-attention derives variable-length boundaries from the position ids.
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                     "flash_attention_4")

# Attention implementations that take a custom 4D mask as it is (prefix sharing): sdpa a boolean one,
# eager an additive float one. Flash-attention kernels take no arbitrary mask.
PREFIX_SHARING_ATTENTION = ("sdpa", "eager")


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


def _check_padding(attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
    """One-line errors for batches that would give silently wrong log-probs."""
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise ValueError("attention_mask has padding before real tokens; pad on the right (tokenizer.padding_side='right')")
    if ((labels != IGNORE_INDEX) & (attention_mask == 0)).any():
        raise ValueError("labels must be -100 wherever attention_mask is 0 (padding is never a label)")


# ------------------------------------------------------------------------------------ model plumbing

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
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


def _logit_transform(config) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The function the model's causal-LM forward applies after the LM head, from its config."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LEAN_MODEL_TYPES:
        raise ValueError(f"memory-lean log-probs are not verified for model type '{model_type}' (known: "
                         f"{', '.join(sorted(LEAN_MODEL_TYPES))}); pass naive=True")
    kind = LEAN_MODEL_TYPES[model_type]
    if kind == "softcap":
        cap = getattr(config, "final_logit_softcapping", None)
        return None if cap is None else (lambda x: torch.tanh(x / cap) * cap)
    if kind == "divide":
        scale = config.logits_scaling
        return lambda x: x / scale
    if kind == "multiply":
        scale = config.logit_scale
        return lambda x: x * scale
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


def _prefix_sharing_problem(config) -> Optional[str]:
    """Why prefix sharing cannot run on this model (None: it can)."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PREFIX_SHARING_ATTENTION:
        return (f"prefix sharing needs an attention implementation that takes a custom 4D mask "
                f"({', '.join(PREFIX_SHARING_ATTENTION)}); the model uses '{impl}'")
    if getattr(config, "model_type", None) not in LEAN_MODEL_TYPES:
        return (f"prefix sharing is not verified for model type '{getattr(config, 'model_type', None)}' "
                f"(known: {', '.join(sorted(LEAN_MODEL_TYPES))})")
    return None


def _has_sliding_window(config) -> bool:
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


def resolve_prefix_sharing(config, requested: Optional[bool], packing: bool = False) -> bool:
    """The recipe's ``train.prefix_sharing``: True requires it (one-line error when the model cannot),
    False turns it off, None (auto) turns it on wherever it is exact for every batch: a verified model
    type, sdpa/eager attention, no sliding window, no packing."""
    if requested is False:
        return False
    if requested and packing:
        raise ValueError("packing and prefix_sharing are exclusive; choose one")
    problem = _prefix_sharing_problem(config)
    if requested:
        if problem:
            raise ValueError(f"{problem}; set prefix_sharing to false")
        return True
    return problem is None and not packing and not _has_sliding_window(config)


def shared_prefix_lengths(batch: dict) -> torch.Tensor:
    """[B] longest common prefix of each chosen row and its rejected row (real tokens only)."""
    width = min(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    same = ((batch["chosen_input_ids"][:, :width] == batch["rejected_input_ids"][:, :width])
            & batch["chosen_attention_mask"][:, :width].bool() & batch["rejected_attention_mask"][:, :width].bool())
    return same.long().cumprod(-1).sum(-1)


def processed_tokens(batch: dict, layout: str) -> int:
    """Tokens the decoder runs on for this batch, padding included, under `layout`: "concat" ([2B, T], T the
    longest real row), "shared" (prefix sharing: B rows of max(c + r - s)) or "packed" (real tokens only)."""
    masks = [batch[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch]
    lengths = [m.sum(-1) for m in masks]
    if layout == "packed":
        return int(sum(int(n.sum()) for n in lengths))
    if layout == "shared" and len(masks) == 2:
        return masks[0].shape[0] * int((lengths[0] + lengths[1] - shared_prefix_lengths(batch)).max())
    return len(masks) * masks[0].shape[0] * int(max(int(n.max()) for n in lengths))


def _prefix_shared_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_chosen: int, config):
    """One row per pair: ``[chosen (c tokens) | rejected tokens after the shared prefix (r - s)]``.

    Returns (forward kwargs, shared [B], chosen lengths [B], row length L): input ids [B, L], position ids
    [B, L] (the rejected part keeps its own row's positions s..r-1) and a 4D mask [B, 1, L, L] that is
    causal except that rejected-part queries never see the chosen part after the shared prefix. Padding
    sits at the end of a row; its queries see everything before them (no empty softmax row)."""
    B = n_chosen
    c_len, r_len = attention_mask[:B].sum(-1), attention_mask[B:].sum(-1)
    shared = shared_prefix_lengths({"chosen_input_ids": input_ids[:B], "chosen_attention_mask": attention_mask[:B],
                                    "rejected_input_ids": input_ids[B:], "rejected_attention_mask": attention_mask[B:]})
    window = config.sliding_window if _has_sliding_window(config) else None
    if window is not None and int(torch.maximum(c_len, r_len).max()) > window:
        raise ValueError(f"prefix sharing needs every sequence within the model's sliding window ({window}) "
                         f"tokens; set prefix_sharing=False for longer ones")
    row_len = c_len + r_len - shared
    L = int(row_len.max().clamp(min=1))
    j = torch.arange(L, device=input_ids.device).unsqueeze(0)  # [1, L] column in the shared row
    in_chosen = j < c_len.unsqueeze(1)
    source = torch.where(in_chosen, j, j - c_len.unsqueeze(1) + shared.unsqueeze(1))  # column in its own row
    real = j < row_len.unsqueeze(1)
    source = torch.where(real, source, torch.zeros_like(source)).clamp(max=input_ids.shape[1] - 1)
    ids = torch.where(in_chosen, input_ids[:B].gather(1, source), input_ids[B:].gather(1, source))
    ids = torch.where(real, ids, torch.zeros_like(ids))
    query, key = j.unsqueeze(2), j.unsqueeze(1)  # [1, L, 1], [1, 1, L]
    c, s = c_len.view(B, 1, 1), shared.view(B, 1, 1)
    hidden_from_rejected = (query >= c) & (query < row_len.view(B, 1, 1)) & (key >= s) & (key < c)
    mask = (key <= query) & ~hidden_from_rejected  # [B, L, L] True = may attend
    mask = mask.unsqueeze(1)
    if getattr(config, "_attn_implementation", None) == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    return dict(input_ids=ids, position_ids=source, attention_mask=mask), shared, c_len, L


# ------------------------------------------------------------------------------------------ the head

def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16/fp32 logits (bf16 under autocast: upcast before any reduction over V);
    float64 logits stay float64, so a float64 model gives float64 log-probs (exact checks in tests)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunk_logps(head: torch.nn.Module, transform, wpo: bool, hidden: torch.Tensor, targets: torch.Tensor):
    """Log-probs of `targets` [n] given final hidden states [n, H]; float32 [n] (and, with wpo, the
    detached logsumexp_v(2 * logp_v) [n] of TRL's WPO weight)."""
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


def _synced_chunk_count(head: torch.nn.Module, n_chunks: int) -> int:
    """Under DeepSpeed ZeRO-3 every call of the head gathers its weight from all ranks, so every rank
    must call it equally often: run the largest chunk count of any rank (the extra chunks are empty)."""
    weight = getattr(head, "weight", None)
    if weight is None or not hasattr(weight, "ds_id") or not torch.distributed.is_initialized():
        return n_chunks
    count = torch.tensor([n_chunks], device=weight.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def _lean_token_logps(head, transform, wpo, hidden, targets, chunk_size):
    """Chunked `_chunk_logps` over [N, H]; each chunk is checkpointed so its [chunk, V] logits are
    recomputed in backward instead of kept."""
    outs = []
    n_chunks = _synced_chunk_count(head, max(math.ceil(hidden.shape[0] / chunk_size), 1))
    for i in range(n_chunks):  # an empty chunk (no label left) gives zeros, still in the graph
        start = i * chunk_size
        args = (head, transform, wpo, hidden[start:start + chunk_size], targets[start:start + chunk_size])
        if torch.is_grad_enabled():
            outs.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            outs.append(_chunk_logps(*args))
    if wpo:
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    return torch.cat(outs), None


# ------------------------------------------------------------------------------------------ public

def concatenated_logps(model: torch.nn.Module, batch: dict, *, chunk_size: int = 256, wpo: bool = False,
                       naive: bool = False, packing: bool = False, prefix_sharing: bool = False) -> dict:
    """Summed log-probs of the label tokens of every chosen and rejected row, from one forward pass.

    Args:
        model: an HF causal LM or a peft model around one (LoRA; the LM head may carry LoRA or be tied).
        batch: the collator's dict (see module docstring); without ``rejected_*`` keys only chosen is done.
        chunk_size: label positions per LM-head chunk on the lean path (peak extra memory ~ chunk_size * V * 4 B
            for the float32 logits, plus their softmax in backward).
        wpo: also return TRL's WPO per-sequence terms (detached).
        naive: full [R, T, V] logits -> float32 log_softmax -> gather (the reference path).
        packing: run the decoder on the real tokens only, packed into one row (padding-free).
        prefix_sharing: run each pair's common prefix once (one row per pair, custom 4D mask; see module
            docstring). Exclusive with packing; a no-op without rejected rows.

    Returns a dict of float32 [B] tensors (float64 for a float64 model): ``chosen_logps`` (sum over label tokens of log p(token | prefix);
    the token at t is predicted by position t-1), ``chosen_tokens`` (label-token count), with wpo
    ``chosen_wpo_logps`` = mean over label tokens of (log p(token) - logsumexp_v(2 log p_v)), and the same
    ``rejected_*`` keys when the batch has rejected rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    input_ids, attention_mask, labels, n_chosen = concatenated_inputs(batch)
    _check_padding(attention_mask, labels)
    hf_model = _unwrap(model) if not naive else None
    config = (hf_model if hf_model is not None else _unwrap_for_config(model)).config
    if packing:
        _check_packing(config)
    if prefix_sharing:
        resolve_prefix_sharing(config, True, packing)  # one-line error where it cannot run
        prefix_sharing = input_ids.shape[0] > n_chosen  # nothing to share without rejected rows
    if not naive and not packing:
        # Right padding: columns past the longest real row change nothing; drop them before the decoder.
        T = int(attention_mask.sum(-1).max().clamp(min=1))
        input_ids, attention_mask, labels = input_ids[:, :T], attention_mask[:, :T], labels[:, :T]
    R, T = input_ids.shape

    # Position t predicts the label at t + 1; keep only positions whose next token is a label.
    next_labels = labels[:, 1:]
    rows, cols = (next_labels != IGNORE_INDEX).nonzero(as_tuple=True)  # [N] each, row-major order
    targets = next_labels[rows, cols]
    if packing:  # index of (row, col) among the real tokens, in the packed row's order
        flat_pos = (attention_mask.reshape(-1).cumsum(0) - 1).view(R, T)[rows, cols]
        packed_ids, position_ids = _packed_inputs(input_ids, attention_mask)
        forward_kwargs = dict(input_ids=packed_ids, position_ids=position_ids, attention_mask=None)
    elif prefix_sharing:  # chosen rows keep their columns; rejected columns past the shared prefix move
        forward_kwargs, shared, c_len, L = _prefix_shared_inputs(input_ids, attention_mask, n_chosen, config)
        pair = rows % n_chosen
        moved = (rows >= n_chosen) & (cols >= shared[pair])
        flat_pos = pair * L + torch.where(moved, c_len[pair] + cols - shared[pair], cols)
    else:
        flat_pos = rows * T + cols
        forward_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)

    wpo_adjust = None
    if naive:
        logits = model(**forward_kwargs, use_cache=False).logits  # [R, T, V] or [1, L, V]
        logps = torch.log_softmax(_upcast(logits), dim=-1).flatten(0, 1)[flat_pos]  # [N, V]
        token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if wpo:
            with torch.no_grad():
                wpo_adjust = torch.logsumexp(2.0 * logps, dim=-1)
    else:
        transform = _logit_transform(config)
        hidden = hf_model.get_decoder()(**forward_kwargs, use_cache=False).last_hidden_state  # post final norm
        hidden = hidden.flatten(0, 1)[flat_pos]  # [N, H]
        token_logps, wpo_adjust = _lean_token_logps(hf_model.get_output_embeddings(), transform, wpo,
                                                    hidden, targets, chunk_size)

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


class PreferenceLogpsModel(torch.nn.Module):
    """The (peft) HF model plus the concatenated log-prob computation as ONE module forward.

    Give this module, not the HF model, to ``accelerator.prepare``: DDP/FSDP then see a single forward
    that covers the decoder body and the chunked LM head, so gradient synchronisation (DDP) and parameter
    gathering of the root unit (FSDP) cover the head too. ``.model`` is the wrapped HF model (save and
    merge through it); the options are plain attributes and may be changed between calls.
    """

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = 256, wpo: bool = False,
                 naive: bool = False, packing: bool = False, prefix_sharing: Optional[bool] = False):
        super().__init__()
        config = _unwrap_for_config(_unwrap(model) if not naive else model).config
        if packing:  # refused at build time, before any compute
            _check_packing(config)
        self.model = model
        self.chunk_size = chunk_size
        self.wpo = wpo
        self.naive = naive
        self.packing = packing
        self.prefix_sharing = resolve_prefix_sharing(config, prefix_sharing, packing)

    @property
    def layout(self) -> str:
        """How the decoder sees a batch: "packed", "shared" (prefix sharing) or "concat" (see processed_tokens)."""
        return "packed" if self.packing else "shared" if self.prefix_sharing else "concat"

    def forward(self, **batch) -> dict:
        """``module(**batch)`` -> the dict of `concatenated_logps`; keys outside the contract are ignored."""
        return concatenated_logps(self.model, batch, chunk_size=self.chunk_size, wpo=self.wpo,
                                  naive=self.naive, packing=self.packing, prefix_sharing=self.prefix_sharing)


def concatenated_forward(model: torch.nn.Module, batch: dict, average_log_prob: bool = False, **opts):
    """(chosen_logps, rejected_logps), each float32 [B]: the sum over label tokens of log p(token | prefix),
    or with ``average_log_prob`` the mean per label token. One forward over the stacked [2B, T] rows.

    ``model`` is an HF causal LM, a peft model, or a `PreferenceLogpsModel` (possibly wrapped by
    accelerate/DDP), whose own options then apply; ``opts`` go to `concatenated_logps` (chunk_size, wpo,
    naive, packing, prefix_sharing). Without ``rejected_*`` keys in the batch, rejected_logps is None.
    """
    inner = getattr(model, "module", model)
    if isinstance(inner, PreferenceLogpsModel):
        if opts:
            raise TypeError(f"options {sorted(opts)} are set on the PreferenceLogpsModel, not per call")
        out = model(**batch)
    else:
        out = concatenated_logps(model, batch, **opts)
    chosen, rejected = out["chosen_logps"], out.get("rejected_logps")
    if average_log_prob:
        chosen = chosen / out["chosen_tokens"].clamp(min=1)
        if rejected is not None:
            rejected = rejected / out["rejected_tokens"].clamp(min=1)
    return chosen, rejected
