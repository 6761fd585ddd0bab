"""Attention for prefix-shared pairs packed into one row, with no [rows, 1, T, T] mask.

The packed layout (logps.py, ``pack_pairs``) puts every pair of a batch into ONE row with no padding:
``[chosen_1 | rejected_1 after the shared prefix | chosen_2 | rejected_2 rest | ...]``. Within pair b
(chosen length c, shared prefix s, rejected length r) a chosen token attends causally to the chosen
tokens before it, and a rejected-rest token to the rejected row's own tokens before it: the shared prefix
(the chosen row's first s tokens) and the rejected rest. Nothing crosses pairs.

Two ways to run that, chosen by device:

- CPU (and any device without FlexAttention's backward): per pair, two SDPA calls, the chosen block with
  ``is_causal`` and no mask at all, and the rejected rest's queries against the rejected row's keys
  ``[shared | rejected rest]`` with a small [r - s, r] mask (bottom-right causal). The largest mask is
  one pair's, never the batch's, and more than half the queries take SDPA's unmasked causal kernel.
  FlexAttention has no CPU backward in torch 2.13.
- CUDA: one FlexAttention call per layer over the whole row with a ``BlockMask`` built once per forward
  from per-token segment ids (`PairSegments.mask_mod`): a flash-class kernel that skips the empty blocks.

Sliding-window layers keep each row's own window (distance counted in own-row positions).

transformers picks attention by name: `register` adds ``sdpa_pairs`` (attention and mask functions).
Without the ``pair_segments`` keyword it is plain SDPA with SDPA's masks, so a model switched to it
(`use_pair_attention`) generates and evaluates exactly as before; with the keyword the mask creation
is skipped (the layout's positions would otherwise make transformers build a dense block-diagonal mask)
and the attention runs per pair as above. The keyword reaches the attention through the decoder's
``**kwargs``, so gradient checkpointing's recomputation sees it too.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

PAIR_ATTENTION = "sdpa_pairs"

_SKIP_MASKS = contextvars.ContextVar("dpo_accel_skip_masks", default=False)


class PairSegments:
    """Where each pair sits in the packed row, and the small masks and block masks derived from it.

    ``chosen``, ``shared``, ``rejected``: per-pair lengths c, s, r (Python ints); the pair occupies
    ``c + r - s`` positions from its offset. ``windows``: attention type -> sliding window (None: causal),
    ``layer_types``: the type of each layer (None: every layer has the one type of ``windows``).
    """

    def __init__(self, chosen: list[int], shared: list[int], rejected: list[int],
                 windows: dict[str, Optional[int]], layer_types: Optional[list[str]] = None):
        self.chosen, self.shared, self.rejected = chosen, shared, rejected
        self.lengths = [c + r - s for c, s, r in zip(chosen, shared, rejected)]
        self.offsets = [0]
        for n in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.total = sum(self.lengths)
        self.windows, self.layer_types = windows, layer_types
        self._masks: dict = {}

    def query_sizes(self) -> list[int]:
        """Split sizes of the packed row for queries: per pair, its chosen row, then its rejected rest."""
        return [n for c, length in zip(self.chosen, self.lengths) for n in (c, length - c)]

    def key_sizes(self) -> list[int]:
        """Split sizes for keys and values: per pair, the shared prefix, the chosen rest, the rejected rest."""
        return [n for c, s, length in zip(self.chosen, self.shared, self.lengths) for n in (s, c - s, length - c)]

    def window_of(self, module: torch.nn.Module) -> Optional[int]:
        """The sliding window of the layer this attention module belongs to (None: plain causal)."""
        if self.layer_types is not None:
            return self.windows[self.layer_types[module.layer_idx]]
        return next(iter(self.windows.values()))

    def chosen_mask(self, b: int, window: Optional[int], device) -> Optional[torch.Tensor]:
        """None (plain causal, SDPA's is_causal) unless a window cuts into the chosen row: then [1, 1, c, c]."""
        c = self.chosen[b]
        if window is None or c <= window:
            return None
        key = ("c", b, window, device)
        if key not in self._masks:
            i = torch.arange(c, device=device)
            d = i.unsqueeze(1) - i.unsqueeze(0)
            self._masks[key] = ((d >= 0) & (d < window)).view(1, 1, c, c)
        return self._masks[key]

    def rejected_mask(self, b: int, window: Optional[int], device) -> torch.Tensor:
        """[1, 1, r - s, r]: rejected-rest query i (own-row position s + i) sees own-row keys j <= s + i."""
        key = ("r", b, window, device)
        if key not in self._masks:
            s, r = self.shared[b], self.rejected[b]
            q = torch.arange(s, r, device=device).unsqueeze(1)
            k = torch.arange(r, device=device).unsqueeze(0)
            allowed = k <= q
            if window is not None:
                allowed &= (q - k) < window
            self._masks[key] = allowed.view(1, 1, r - s, r)
        return self._masks[key]

    # ------------------------------------------------------------------ FlexAttention (CUDA)

    def token_tables(self, device) -> tuple[torch.Tensor, ...]:
        """Per packed token: pair id, own-row position, rejected-part flag, and the pair's shared length."""
        seg, pos, rej, sh = [], [], [], []
        for b, (c, s, r) in enumerate(zip(self.chosen, self.shared, self.rejected)):
            n = c + r - s
            seg.append(torch.full((n,), b))
            pos.append(torch.cat([torch.arange(c), torch.arange(s, r)]))
            rej.append(torch.cat([torch.zeros(c, dtype=torch.bool), torch.ones(r - s, dtype=torch.bool)]))
            sh.append(torch.full((n,), s))
        return tuple(torch.cat(t).to(device) for t in (seg, pos, rej, sh))

    def mask_mod(self, window: Optional[int], device):
        """FlexAttention's mask_mod of the packed row (True: may attend); also what the tests materialise."""
        seg, pos, rej, sh = self.token_tables(device)

        def mask_mod(b, h, q, kv):
            allowed = (seg[q] == seg[kv]) & (kv <= q)
            allowed = allowed & ~(rej[q] & ~rej[kv] & (pos[kv] >= sh[q]))  # the chosen rest, hidden from rejected
            if window is not None:
                allowed = allowed & ((pos[q] - pos[kv]) < window)
            return allowed
        return mask_mod

    def block_mask(self, window: Optional[int], device):
        key = ("flex", window, device)
        if key not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            self._masks[key] = create_block_mask(self.mask_mod(window, device), None, None, self.total, self.total,
                                                 device=device)
        return self._masks[key]


def flex_available(device: torch.device) -> bool:
    """FlexAttention trains on CUDA; on CPU it has no backward (torch 2.13)."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def pair_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                   pair_segments: Optional[PairSegments] = None, **kwargs):
    """transformers' attention signature: query [1, H, L, D], key / value [1, Hkv, L, D] -> ([1, L, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if pair_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kwargs.pop("is_causal", None)
    window = pair_segments.window_of(module)
    if flex_available(query.device) and dropout == 0.0:
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, pair_segments.block_mask(window, query.device),
                                      scaling=scaling, **kwargs)
    # One split per tensor, not a slice per pair: a slice's backward writes into a zeroed copy of the whole
    # row, so per-pair slicing would cost O(pairs x row) per layer; split's backward is one concatenation.
    q_parts = query.split(pair_segments.query_sizes(), dim=2)  # per pair: chosen, rejected rest
    k_parts = key.split(pair_segments.key_sizes(), dim=2)  # per pair: shared, chosen rest, rejected rest
    v_parts = value.split(pair_segments.key_sizes(), dim=2)
    outs = []
    for b in range(len(pair_segments.offsets)):
        q_c, q_r = q_parts[2 * b], q_parts[2 * b + 1]
        k_s, k_c, k_r = k_parts[3 * b:3 * b + 3]
        v_s, v_c, v_r = v_parts[3 * b:3 * b + 3]
        outs.append(sdpa_attention_forward(module, q_c, torch.cat([k_s, k_c], dim=2), torch.cat([v_s, v_c], dim=2),
                                           pair_segments.chosen_mask(b, window, query.device), dropout=dropout,
                                           scaling=scaling, is_causal=True, **kwargs)[0])
        if q_r.shape[2]:  # the rejected rest against the rejected row's keys: [shared | rejected rest]
            outs.append(sdpa_attention_forward(module, q_r, torch.cat([k_s, k_r], dim=2), torch.cat([v_s, v_r], dim=2),
                                               pair_segments.rejected_mask(b, window, query.device), dropout=dropout,
                                               scaling=scaling, is_causal=False, **kwargs)[0])
    return torch.cat(outs, dim=1), None


def pair_mask(*args, **kwargs):
    """SDPA's mask function, except inside `skip_masks` (the packed pairs' forward needs no mask)."""
    from transformers.masking_utils import sdpa_mask

    if _SKIP_MASKS.get():
        return None
    return sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def skip_masks():
    """Around the packed pairs' decoder call: transformers builds no attention mask."""
    token = _SKIP_MASKS.set(True)
    try:
        yield
    finally:
        _SKIP_MASKS.reset(token)


def register() -> None:
    """Register ``sdpa_pairs`` with transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PAIR_ATTENTION, pair_attention)
    AttentionMaskInterface.register(PAIR_ATTENTION, pair_mask)


def use_pair_attention(config) -> bool:
    """Switch an SDPA model to ``sdpa_pairs`` (SDPA itself without the keyword); False where the model uses
    another implementation (eager's float masks, flash kernels), which then keeps the padded layout."""
    impl = getattr(config, "_attn_implementation", None)
    if impl == PAIR_ATTENTION:
        return True
    if impl != "sdpa":
        return False
    register()
    config._attn_implementation = PAIR_ATTENTION
    return True
