"""Dataset mixtures: the alignment-handbook's ``dataset_mixture`` block, checked when the recipe loads.

    data:
      dataset_mixture:
        datasets:
          - id: data/arith_prefs            # local folder / .jsonl / .json / .parquet, or a hub id
            split: train
            weight: 0.75                    # keep this fraction of the source's rows (seeded), as the handbook
          - id: data/hh_arith.jsonl
            columns: {question: prompt}     # rename {theirs: ours}; a list keeps those columns (handbook)
            rows: 500                       # or exactly this many rows (more than the source has: repeated)
            format: hh                      # this source's data.format (default: data.format)
        seed: 0                             # subsampling, mixing and the held-out carve (default: train.seed)
        test_split_size: 0.1                # held out from the mixed rows: a fraction (< 1) or a number of rows
        form: dataset_mixture               # or dataset_mixer: the older handbook's semantics (below)

Semantics follow the handbook's ``get_dataset`` row for row: each source is subsampled to
``ds.shuffle(seed=seed).select(range(int(len(ds) * weight)))``, the sources are concatenated and
shuffled with the seed, and ``test_split_size`` carves the held-out rows from that mixture by
``train_test_split(test_size=test_split_size, seed=seed)`` (which shuffles again: the held-out rows
are not the first ones of the mixture). ``form: dataset_mixer`` reproduces the older handbook's
``mix_datasets`` (its ``dataset_mixer: {id: fraction}``, which ``dpo_accel.config.handbook`` converts):
``weight`` keeps a source's first ``int(fraction * len(ds))`` rows (``ds.select(range(...))``, no
shuffle) and the sources' ``eval_split`` rows are concatenated and shuffled with the seed (that mixer's
``concatenate_datasets(tests).shuffle(seed=42)``). Beyond the handbook: ``rows``, per-source ``format``
and ``eval_split`` (a source's own held-out split, added to eval whole, as the handbook's older mixer
kept test splits unsubsampled), and sources of different formats, which are normalised before mixing
(``dpo_accel.data.formats``). This module is plain Python so the recipe can check a mixture before
anything heavy is imported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Union

from dpo_accel.config.errors import RecipeError, did_you_mean

FORMATS = ("auto", "explicit", "conversational", "implicit", "hh", "sft")
FORMS = ("dataset_mixture", "dataset_mixer")  # the handbook's get_dataset / its older mix_datasets


class MixtureError(RecipeError):
    """A dataset_mixture problem; one line naming the key and what to write instead."""


@dataclass(frozen=True)
class Source:
    id: str  # local path or hub id
    config: Optional[str] = None  # hub dataset configuration
    split: str = "train"
    columns: Optional[Union[list, dict]] = None  # list: keep these columns; dict: rename {theirs: ours}
    weight: Optional[float] = None  # fraction of the source's rows kept, in (0, 1] (handbook)
    rows: Optional[int] = None  # exact number of rows kept (repeats the source when larger)
    format: Optional[str] = None  # data.format of this source (None: data.format)
    eval_split: Optional[str] = None  # this source's own held-out split, added to eval in full

    @property
    def label(self) -> str:
        """How summaries and errors name the source: its id, plus config and split when not the defaults."""
        extra = [x for x in (self.config, None if self.split == "train" else self.split) if x]
        return self.id + (f" [{', '.join(extra)}]" if extra else "")


@dataclass(frozen=True)
class Mixture:
    sources: tuple
    seed: Optional[int] = None
    test_split_size: Optional[Union[float, int]] = None
    form: str = "dataset_mixture"  # "dataset_mixer": weight keeps the first rows, eval splits shuffled

    @property
    def first_rows(self) -> bool:
        """True when `weight` keeps a source's first rows (the older dataset_mixer), not a seeded sample."""
        return self.form == "dataset_mixer"


SOURCE_KEYS = [f.name for f in fields(Source)]
MIXTURE_KEYS = ["datasets", "seed", "test_split_size", "form"]


def _unknown(key: str, where: str, allowed: list) -> MixtureError:
    return MixtureError(f"unknown key '{key}' in {where}{did_you_mean(key, allowed, list_choices=True)}")


def parse_mixture(raw, where: str = "data.dataset_mixture") -> Mixture:
    """The checked mixture of a recipe's ``dataset_mixture`` mapping (a bare list of sources is accepted)."""
    if isinstance(raw, list):
        raw = {"datasets": raw}
    if not isinstance(raw, dict):
        raise MixtureError(f"{where} must be a mapping with 'datasets' (a list of sources), got {raw!r}")
    for key in raw:
        if key not in MIXTURE_KEYS:
            raise _unknown(key, where, MIXTURE_KEYS)
    entries = raw.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise MixtureError(f"{where}.datasets must be a non-empty list of sources (each with an 'id')")
    sources = []
    for k, entry in enumerate(entries):
        at = f"{where}.datasets[{k}]"
        if isinstance(entry, str):
            entry = {"id": entry}
        if not isinstance(entry, dict):
            raise MixtureError(f"{at} must be a mapping with at least 'id', got {entry!r}")
        for key in entry:
            if key not in SOURCE_KEYS:
                raise _unknown(key, at, SOURCE_KEYS)
        if not isinstance(entry.get("id"), str) or not entry["id"].strip():
            raise MixtureError(f"{at} needs 'id': a local dataset path or a hub id")
        src = Source(**entry)
        if src.weight is not None and src.rows is not None:
            raise MixtureError(f"{at} sets both 'weight' and 'rows'; keep one")
        if src.weight is not None and (isinstance(src.weight, bool) or not isinstance(src.weight, (int, float))
                                       or not 0 < src.weight <= 1):
            raise MixtureError(f"{at}.weight is the fraction of the source's rows kept and must be in (0, 1], "
                               f"got {src.weight!r}; use 'rows' to repeat a source")
        if src.rows is not None and (isinstance(src.rows, bool) or not isinstance(src.rows, int) or src.rows < 1):
            raise MixtureError(f"{at}.rows must be a whole number of rows >= 1, got {src.rows!r}")
        if src.format is not None and src.format not in FORMATS:
            raise MixtureError(f"{at}.format is {src.format!r}; choose one of: {', '.join(FORMATS)}")
        cols = src.columns
        if cols is not None and not (isinstance(cols, list) and cols and all(isinstance(c, str) for c in cols)
                                     or isinstance(cols, dict) and cols
                                     and all(isinstance(a, str) and isinstance(b, str) for a, b in cols.items())):
            raise MixtureError(f"{at}.columns must be a list of column names to keep or a mapping "
                               f"{{their_column: our_column}}, got {cols!r}")
        sources.append(src)
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise MixtureError(f"{where}.seed must be an integer, got {seed!r}")
    size = raw.get("test_split_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0
                             or isinstance(size, float) and size >= 1 and not size.is_integer()):
        raise MixtureError(f"{where}.test_split_size must be a fraction in (0, 1) or a number of rows, got {size!r}")
    if isinstance(size, float) and size >= 1:
        size = int(size)
    form = raw.get("form", "dataset_mixture")
    if form not in FORMS:
        raise MixtureError(f"{where}.form is {form!r}; choose one of: {', '.join(FORMS)}")
    return Mixture(tuple(sources), seed, size, form)


def held_out_rows(size: Optional[Union[float, int]], total: int) -> int:
    """Rows carved from `total` mixed rows: ceil(fraction * total) exactly as datasets' train_test_split
    computes it (no rounding of the product first), or a count."""
    if size is None:
        return 0
    n = int(size) if isinstance(size, int) else math.ceil(size * total)
    if not 0 < n < total:
        raise MixtureError(f"data.dataset_mixture.test_split_size {size} holds out {n} of {total} mixed rows; "
                           f"it must leave at least one row on each side")
    return n
