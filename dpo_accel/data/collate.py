"""Batches of tokenised preference rows: the right-padded collator (the contract of
`concatenated_forward`), the length-grouped sampler and the epoch-seeded shuffle, both pure functions of
(seed, epoch) so a resumed run sees the straight run's order.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from dpo_accel.data.formats import DataError
from dpo_accel.model.logps import IGNORE_INDEX



def sequence_lengths(tokenized, layout: str = "concat") -> list:
    """Per row, the length that sets a batch's width, for LengthGroupedSampler: max(len(chosen_input_ids),
    len(rejected_input_ids)), or with ``layout="shared"`` (prefix sharing, one row per pair) c + r - s,
    s the common prefix of the two rows' ids."""
    import pyarrow.compute as pc

    cols = [c for c in ("chosen_input_ids", "rejected_input_ids") if c in tokenized.column_names]
    table = tokenized.select_columns(cols).with_format("arrow")[:]
    lengths = [pc.list_value_length(table.column(c)).to_numpy().astype(np.int64) for c in cols]
    if layout != "shared" or len(cols) < 2:
        return np.maximum.reduce(lengths).tolist()
    c_len, r_len = lengths
    c_ids, r_ids = (pc.list_flatten(table.column(c)).to_numpy() for c in cols)
    c_start, r_start = np.cumsum(c_len) - c_len, np.cumsum(r_len) - r_len
    m = np.minimum(c_len, r_len)  # compare the first m ids of each pair at once
    row = np.repeat(np.arange(len(m)), m)
    k = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
    differs_at = np.where(c_ids[c_start[row] + k] == r_ids[r_start[row] + k], m[row], k)
    shared = np.zeros(len(m), dtype=np.int64)
    some = m > 0
    if some.any():
        shared[some] = np.minimum.reduceat(differs_at, (np.cumsum(m) - m)[some])
    return (c_len + r_len - shared).tolist()


# ------------------------------------------------------------------------------ batching

class PreferenceCollator:
    """Rows of `tokenize_splits` -> one batch (right padding), the contract of logps.concatenated_forward:

    chosen_input_ids, chosen_attention_mask, chosen_labels        LongTensor [B, Tc]
    rejected_input_ids, rejected_attention_mask, rejected_labels  LongTensor [B, Tr] (absent for sft rows)
    idx                                                           LongTensor [B]
    desirable                                                     BoolTensor [B] (unpaired rows only)

    Tc and Tr are each side's longest row (rounded up to `pad_to_multiple_of`); padding positions have
    `pad_token_id`, attention 0 and label -100.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise DataError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list) -> dict:
        batch = {}
        for side in ("chosen", "rejected"):
            if f"{side}_input_ids" not in rows[0]:
                continue
            seqs = [r[f"{side}_input_ids"] for r in rows]
            width = max(len(s) for s in seqs)
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for b, r in enumerate(rows):
                n = len(r[f"{side}_input_ids"])
                ids[b, :n] = torch.as_tensor(r[f"{side}_input_ids"], dtype=torch.long)
                labels[b, :n] = torch.as_tensor(r[f"{side}_labels"], dtype=torch.long)
                mask[b, :n] = 1
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"] = ids, mask, labels
        batch["idx"] = torch.as_tensor([int(r["idx"]) for r in rows], dtype=torch.long)
        if "label" in rows[0]:  # unpaired (KTO) rows: whether each completion is desirable
            batch["desirable"] = torch.as_tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
        return batch


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in an order where consecutive `batch_size` groups have similar lengths (less padding).

    A seeded permutation (seed + epoch: call `set_epoch` for a new order each epoch, as Accelerate's
    DataLoader does) is cut into mega-batches of mega_batch_mult * batch_size indices, each sorted by
    length, longest first; the overall longest row is moved to the very first batch so an
    out-of-memory error shows at step one. The order is a pure function of (lengths, seed, epoch).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError("batch_size and mega_batch_mult must be at least 1")
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.seed, self.mega_batch_mult = batch_size, seed, mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        if not self.lengths:
            return iter([])
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.mega_batch_mult * self.batch_size
        mega = [sorted(perm[i:i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(perm), size)]
        longest = max(range(len(mega)), key=lambda m: self.lengths[mega[m][0]])
        mega[0][0], mega[longest][0] = mega[longest][0], mega[0][0]
        return iter([i for m in mega for i in m])


class EpochRandomSampler(torch.utils.data.Sampler):
    """A shuffle that is a pure function of (seed, epoch), like LengthGroupedSampler.

    torch's RandomSampler draws each epoch from a generator that advanced with every earlier epoch, and
    Accelerate's prepared loader calls ``set_epoch`` with its own iteration counter (0 in a fresh
    process): a run resumed in epoch 2 would replay epoch 0's order. Here the epoch alone decides.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())
