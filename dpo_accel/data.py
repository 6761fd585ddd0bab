"""Preference data: load, normalise to {prompt, chosen, rejected}, tokenise (cached), collate, sample.

The path of the data (each step is a function the training loop calls once)::

    splits = load_preference_splits(recipe.data, seed)        # DatasetDict "train" (+ "eval")
    tokenized, stats = tokenize_splits(splits, tokenizer, recipe.data)
    print(format_stats(stats))
    sampler = LengthGroupedSampler(sequence_lengths(tokenized["train"]), batch_size, seed)
    loader = DataLoader(tokenized["train"], batch_size, sampler=sampler,
                        collate_fn=PreferenceCollator(tokenizer.pad_token_id))

Formats (``data.format``; ``auto`` detects from the columns and the first row). Every one becomes
rows of ``prompt``, ``chosen``, ``rejected`` (``sft``: no ``rejected``), where the prompt is either a
string or a list of ``{"role", "content"}`` messages and the answers are of the same kind:

  explicit        prompt, chosen, rejected: plain strings
  conversational  prompt: messages; chosen / rejected: assistant messages (TRL's format). A string
                  prompt with full conversations as answers (UltraFeedback) is split like implicit.
  implicit        chosen / rejected: whole conversations; their shared leading messages are the prompt
  hh              chosen / rejected: Anthropic HH transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."; the
                  text up to the last "\\n\\nAssistant:" is the prompt (kept as raw text)
  sft             one answer: messages (the last one, an assistant turn, is the answer), or
                  prompt + completion, or prompt + chosen
  unpaired        prompt, completion, label (true: desirable, false: undesirable), text or messages
                  (TRL's unpaired preference format, for KTO): rows of prompt, chosen (the completion),
                  label; dpo_accel/kto.py adds each row's mismatched completion as ``rejected``

Mixtures (``data.dataset_mixture``, the alignment-handbook's block; schema in dpo_accel/mixture.py):
each source is loaded and normalised with its own format, subsampled (``weight``: a seeded fraction,
as the handbook; ``rows``: a count), mixed in a seeded order and carved (``test_split_size``). Where
some sources give text and others messages, single-turn conversations become strings (the same
tokens under a chat template) or, if any is multi-turn or HH, text becomes messages (HH transcripts
parsed into turns). `tokenize_splits` tokenises and caches each source apart and reports each
source's kept / truncated / dropped rows and share.

Tokenisation rule (documented behaviour): a message prompt goes through the tokenizer's chat
template (add_generation_prompt=True); a plain-string prompt is wrapped as one user message and its
answer as the assistant message whenever the tokenizer has a chat template, so an instruct model
sees its own template; HH transcripts and tokenizers without a chat template use raw text: prompt
tokens (+ the tokenizer's BOS if it adds one) + answer tokens + EOS. Every answer ends with exactly
one ``tokenizer.eos_token``; what a template appends after it (SmolLM2: "\\n") is cut.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from dpo_accel.console import log
from dpo_accel.logps import IGNORE_INDEX
from dpo_accel.recipe import DataConfig, RecipeError


HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("explicit", "conversational", "implicit", "hh", "sft", "unpaired")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
STATUS_KEPT, STATUS_TRUNCATED, STATUS_DROPPED = 0, 1, 2
_HELPER_COLUMNS = ("_status", "_raw_length", "chosen_length", "rejected_length")

with open(__file__, "rb") as _f:  # any edit of this module invalidates the datasets caches it made
    _CODE_HASH = hashlib.sha256(_f.read()).hexdigest()[:16]


class DataError(RecipeError):
    """A dataset problem a person must fix (bad path, row or column); one line saying what and how."""


# ----------------------------------------------------------------------------------------- loading

def _resolve_local(name: str) -> Optional[str]:
    """An existing local path for `name`: as given, ~-expanded, or relative to the repository root
    (so the shipped default ``data/arith_prefs`` works from any working directory)."""
    candidates = [name, os.path.expanduser(name)]
    if not os.path.isabs(name):
        candidates.append(os.path.join(REPO_ROOT, name))
    return next((c for c in candidates if os.path.exists(c)), None)


def _looks_local(name: str) -> bool:
    """True when `name` is meant as a local path (it cannot be a hub id "org/name", or its first folder
    exists here, as in a mistyped "data/arith_pref"), so a missing path is an error, not a download."""
    head = name.split("/")[0]
    return (name.startswith((".", "/", "~")) or os.path.splitext(name)[1].lower() in FILE_BUILDERS
            or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or os.path.isdir(head) or os.path.isdir(os.path.join(REPO_ROOT, head)))


def _split_files(folder: str, split: str) -> tuple[Optional[str], list[str]]:
    """(builder, files) of one split in a folder: <split>.jsonl|json|parquet, <split>-*.ext,
    data/<split>-*.ext (the hub's layout) or <split>/*.ext; (None, []) when there is none."""
    for ext, builder in FILE_BUILDERS.items():
        patterns = [f"{split}{ext}", f"{split}-*{ext}", f"{split}_*{ext}", f"data/{split}{ext}",
                    f"data/{split}-*{ext}", f"{split}/*{ext}"]
        files = sorted({f for p in patterns for f in glob.glob(os.path.join(glob.escape(folder), p))})
        if files:
            return builder, files
    return None, []


def _load_files(builder: str, files: list[str], cache_dir: Optional[str]):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files={"train": files}, split="train", cache_dir=cache_dir)
    except Exception as e:  # datasets' errors name neither the file nor the line: find them
        raise DataError(_unreadable(files, e)) from None


def _unreadable(files: list[str], error: Exception) -> str:
    """One line for a data file datasets could not read: the empty file, or the file and line of bad JSON."""
    for path in files:
        if os.path.getsize(path) == 0 or not open(path, "rb").read(4096).strip():
            return f"data file '{path}' is empty (no rows); fill it or fix data.dataset_name"
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except ValueError as e:
                            return f"data file '{path}' line {number} is not valid JSON ({e}); fix or remove that line"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return f"data file(s) {', '.join(repr(f) for f in files[:3])} cannot be read ({type(error).__name__}: {first})"


def _load_raw(cfg: DataConfig, cache_dir: Optional[str], keys: Optional[dict] = None) -> dict:
    """{"train": Dataset, "eval": Dataset (only if the source has the eval split)}, rows as stored.
    `keys` names the recipe keys errors point at (a mixture source's id / split / config)."""
    import datasets

    name = cfg.dataset_name
    k = {"name": "data.dataset_name", "split": "data.train_split", "config": "data.dataset_config", **(keys or {})}
    path = _resolve_local(name)
    out = {}
    if path is not None and os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):  # a DatasetDict.save_to_disk folder
            saved = datasets.load_from_disk(path)
            if cfg.train_split not in saved:
                raise DataError(f"saved dataset '{path}' has splits {sorted(saved)}, not '{cfg.train_split}'; "
                                f"set {k['split']}")
            out["train"] = saved[cfg.train_split]
            if cfg.eval_split and cfg.eval_split in saved:
                out["eval"] = saved[cfg.eval_split]
            return out
        builder, files = _split_files(path, cfg.train_split)
        if not files:
            found = sorted(os.listdir(path))[:10]
            raise DataError(f"directory '{path}' has no {cfg.train_split}.jsonl/.json/.parquet (it holds {found}); "
                            f"add that file or set {k['split']}")
        out["train"] = _load_files(builder, files, cache_dir)
        if cfg.eval_split:
            builder, files = _split_files(path, cfg.eval_split)
            if files:
                out["eval"] = _load_files(builder, files, cache_dir)
        return out
    if path is not None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in FILE_BUILDERS:
            raise DataError(f"dataset file '{path}' is not .jsonl, .json or .parquet; convert it or fix {k['name']}")
        out["train"] = _load_files(FILE_BUILDERS[ext], [path], cache_dir)
        return out
    if _looks_local(name):
        raise DataError(f"dataset path '{name}' does not exist; fix {k['name']} (a local folder, "
                        f".jsonl/.json/.parquet file, or a hub id)")
    try:
        loaded = datasets.load_dataset(name, cfg.dataset_config, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown id, missing config: all end the run here
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"dataset '{name}' is not a local path and loading it from the hub failed "
                        f"({type(e).__name__}: {first}); fix {k['name']} / {k['config']}") from None
    if cfg.train_split not in loaded:
        raise DataError(f"dataset '{name}' has splits {sorted(loaded)}, not '{cfg.train_split}'; set {k['split']}")
    out["train"] = loaded[cfg.train_split]
    if cfg.eval_split and cfg.eval_split in loaded:
        out["eval"] = loaded[cfg.eval_split]
    return out


def load_preference_splits(cfg: DataConfig, seed: int, cache_dir: Optional[str] = None):
    """Load the recipe's dataset and normalise it to prompt/chosen/rejected rows.

    Returns a ``datasets.DatasetDict`` with "train" and, when the source has ``cfg.eval_split`` or
    ``cfg.eval_fraction > 0`` (a seeded ``train_test_split`` of train), "eval". Rows are checked and
    normalised before anything is tokenised, so a bad row stops the run with its index (0-based, in
    the split as stored). ``max_train_samples`` / ``max_eval_samples`` keep a seeded random subset.
    ``cache_dir``: datasets' cache folder (default: HF_DATASETS_CACHE). With ``cfg.dataset_mixture``
    the result is a `MixtureDict` (same interface; see `_load_mixture`).
    """
    import datasets

    if cfg.dataset_mixture is not None:
        return _load_mixture(cfg, seed, cache_dir)
    raw = _load_raw(cfg, cache_dir)
    splits = {}
    for key, ds in raw.items():
        split_name = cfg.train_split if key == "train" else cfg.eval_split
        try:
            splits[key] = normalise_split(ds, cfg.format, split_name)
        except DataError as e:  # the row and column are in the message; name the source too
            raise DataError(f"{e} (in {cfg.dataset_name})") from None
    if "eval" not in splits:
        if cfg.eval_fraction > 0:
            carved = splits["train"].train_test_split(test_size=cfg.eval_fraction, seed=seed)
            splits["train"], splits["eval"] = carved["train"], carved["test"]
        elif cfg.eval_split:
            log(f"dataset '{cfg.dataset_name}' has no '{cfg.eval_split}' split and data.eval_fraction is 0: "
                "no held-out evaluation")
    for key, cap in (("train", cfg.max_train_samples), ("eval", cfg.max_eval_samples)):
        if cap is None or key not in splits:
            continue
        if cap < 1:
            raise DataError(f"data.max_{key}_samples must be at least 1 (or null for all rows), got {cap}")
        if cap < len(splits[key]):
            splits[key] = splits[key].shuffle(seed=seed).select(range(cap))
    return datasets.DatasetDict(splits)


# ------------------------------------------------------------------------------------- mixtures

class MixtureDict(dict):
    """The splits of a mixture ({"train": Dataset, maybe "eval": Dataset} of normalised rows in mixed order,
    read as a DatasetDict is) plus how they were made, so `tokenize_splits` tokenises and caches each source
    apart:

    parts   [(label, Dataset)]: each source's kept rows, normalised (eval_split sources add a part)
    orders  {split: int array}: rows of concatenate(parts) in the split's order
    specs   [str]: what each part's recipe asked for ("weight 0.75", "rows 500", "all", "eval split")
    """

    def __init__(self, splits: dict, parts: list, orders: dict, specs: list):
        super().__init__(splits)
        self.parts, self.orders, self.specs = parts, orders, specs


def _select_columns(ds, src, label: str, at: str):
    """A source's `columns`: a list keeps those columns, a mapping renames {theirs: ours} and keeps them."""
    if src.columns is None:
        return ds
    wanted = list(src.columns)
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise DataError(f"'{label}' has no column '{missing[0]}' (columns: {sorted(ds.column_names)}); "
                        f"fix {at}.columns")
    ds = ds.select_columns(wanted)
    return ds.rename_columns(dict(src.columns)) if isinstance(src.columns, dict) else ds


def _hh_turns(text: str) -> list:
    """An HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as user/assistant messages."""
    import re

    parts = re.split(r"(\n\nHuman:|\n\nAssistant:)", text)
    out = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        if content.strip():
            out.append({"role": "user" if marker == HH_HUMAN else "assistant", "content": content.strip()})
    return out


def _lift_row(row: dict, hh: bool) -> dict:
    """Plain-text prompt/answers as messages, so sources of text and messages can share one column type.
    A plain string becomes one user (prompt) or assistant (answer) message, which is what the chat
    template sees for it anyway; an HH transcript is parsed into its turns."""
    if isinstance(row["prompt"], list):
        return row
    out = {"prompt": _hh_turns(row["prompt"]) if hh else [{"role": "user", "content": row["prompt"]}]}
    for side in ("chosen", "rejected"):
        if side in row:
            text = row[side].strip() if hh else row[side]
            out[side] = [{"role": "assistant", "content": text}]
    return out


def _single_turn(ds) -> bool:
    """Every row is one user message answered by one assistant message (no system turn, no history)."""
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    for col in [c for c in ("prompt", "chosen", "rejected") if c in ds.column_names]:
        lengths = pc.list_value_length(table.column(col))
        roles = pc.list_flatten(table.column(col)).combine_chunks().field("role")
        want = "user" if col == "prompt" else "assistant"
        if pc.min(lengths).as_py() != 1 or pc.max(lengths).as_py() != 1 or not pc.all(pc.equal(roles, want)).as_py():
            return False
    return True


def _lower_row(row: dict) -> dict:
    """A single-turn conversation as plain strings: under a chat template the same tokens (a string
    prompt is wrapped as one user message, an answer as one assistant message)."""
    return {col: row[col][0]["content"] for col in ("prompt", "chosen", "rejected") if col in row}


def _subsample(n: int, src, seed: int) -> np.ndarray:
    """Row indices kept of a source of n rows: handbook weight (int(n * weight) of a seeded shuffle),
    a row count (whole shuffles repeated when it exceeds n), or all rows in order."""
    perm = np.random.default_rng(seed).permutation(n)
    if src.weight is not None:
        return perm[:int(n * src.weight)]
    if src.rows is not None:
        return np.concatenate([perm] * (src.rows // n) + [perm[:src.rows % n]])
    return np.arange(n)


def _load_mixture(cfg: DataConfig, seed: int, cache_dir: Optional[str]) -> MixtureDict:
    """Load, check and normalise every source of `cfg.dataset_mixture`, subsample each, mix, carve eval."""
    import datasets

    from dpo_accel.mixture import held_out_rows, parse_mixture

    mixture = parse_mixture(cfg.dataset_mixture)
    seed = seed if mixture.seed is None else mixture.seed
    parts, specs, train_parts, kinds = [], [], [], []
    for k, src in enumerate(mixture.sources):
        at = f"data.dataset_mixture.datasets[{k}]"
        one = DataConfig(dataset_name=src.id, dataset_config=src.config, train_split=src.split,
                         eval_split=src.eval_split)
        raw = _load_raw(one, cache_dir, {"name": f"{at}.id", "split": f"{at}.split", "config": f"{at}.config"})
        if src.eval_split and "eval" not in raw:
            raise DataError(f"'{src.label}' has no split '{src.eval_split}'; fix or remove {at}.eval_split")
        fmt = src.format or cfg.format
        for key, ds in raw.items():
            split = src.split if key == "train" else src.eval_split
            label = src.label if key == "train" else f"{src.id} [{split}]"
            ds = normalise_split(_select_columns(ds, src, label, at), fmt, label)
            if key == "train":
                keep = _subsample(len(ds), src, seed)
                if len(keep) == 0:
                    raise DataError(f"{at}.weight {src.weight} keeps no row of the {len(ds)} in '{label}'; raise it")
                ds = ds.select(keep, new_fingerprint=_hash("subsample", ds._fingerprint, _digest(keep)))
                train_parts.append(len(parts))
                specs.append(f"weight {src.weight}" if src.weight is not None else
                             f"rows {src.rows}" if src.rows is not None else "all rows")
            else:
                specs.append("eval split")
            kinds.append(("messages" if isinstance(ds[0]["prompt"], list) else "text",
                          "rejected" in ds.column_names, fmt == "hh" or fmt == "auto" and _is_hh(ds)))
            parts.append((label, ds))
    if len({paired for _, paired, _ in kinds}) > 1:
        raise DataError("data.dataset_mixture mixes single-answer (sft) sources with preference pairs; "
                        "mix one kind, or give the sft sources a 'rejected' column")
    if len({kind for kind, _, _ in kinds}) > 1:  # some text, some messages: one column type for all
        lower = not any(hh for _, _, hh in kinds) and all(
            _single_turn(ds) for (_, ds), (kind, _, _) in zip(parts, kinds) if kind == "messages")
        for j, ((label, ds), (kind, _, hh)) in enumerate(zip(parts, kinds)):
            if lower and kind == "messages":
                parts[j] = (label, ds.map(_lower_row, remove_columns=ds.column_names,
                                          new_fingerprint=_hash("lower", ds._fingerprint), desc=f"as text {label}"))
            elif not lower and kind == "text":
                parts[j] = (label, ds.map(_lift_row, fn_kwargs={"hh": hh}, remove_columns=ds.column_names,
                                          new_fingerprint=_hash("lift", ds._fingerprint, hh), desc=f"lift {label}"))
    offsets = np.cumsum([0] + [len(ds) for _, ds in parts])
    pool = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in train_parts])
    pool = pool[np.random.default_rng(seed).permutation(len(pool))]
    n_eval = held_out_rows(mixture.test_split_size, len(pool))
    orders = {"train": pool[n_eval:]}
    own_eval = [np.arange(offsets[j], offsets[j + 1]) for j, spec in enumerate(specs) if spec == "eval split"]
    if n_eval or own_eval:
        orders["eval"] = np.concatenate([pool[:n_eval]] + own_eval)
    for key, cap in (("train", cfg.max_train_samples), ("eval", cfg.max_eval_samples)):
        if cap is not None and key in orders:
            if cap < 1:
                raise DataError(f"data.max_{key}_samples must be at least 1 (or null for all rows), got {cap}")
            orders[key] = orders[key][:cap]  # already in a seeded random order
    whole = datasets.concatenate_datasets([ds for _, ds in parts])
    fps = [ds._fingerprint for _, ds in parts]
    splits = {key: whole.select(order, new_fingerprint=_hash("mix", fps, key, _digest(order)))
              for key, order in orders.items()}
    return MixtureDict(splits, parts, orders, specs)


def _is_hh(ds) -> bool:
    """A normalised split whose prompts are HH transcripts (raw text ending in the Assistant marker)."""
    return isinstance(ds[0]["prompt"], str) and _is_transcript(ds[0]["prompt"])


# ----------------------------------------------------------------------------------- normalising

def detect_format(columns: Sequence[str], row: dict, split: str = "train") -> str:
    """The format of a split from its column names and first row (see the module docstring)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        if "prompt" in cols:
            return "conversational" if isinstance(row.get("prompt"), list) or isinstance(row.get("chosen"), list) \
                else "explicit"
        if isinstance(row.get("chosen"), list):
            return "implicit"
        if isinstance(row.get("chosen"), str) and HH_ASSISTANT in row["chosen"]:
            return "hh"
        raise DataError(f"split '{split}' has chosen/rejected but no prompt column and they are neither "
                        f"conversations nor HH transcripts; add a 'prompt' column or set data.format")
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    if "messages" in cols or {"prompt", "completion"} <= cols:
        return "sft"
    raise DataError(f"split '{split}' has columns {sorted(cols)}; a preference dataset needs prompt/chosen/rejected "
                    f"(or chosen/rejected conversations), an sft one messages or prompt+completion; see data.format")


def _required_columns(fmt: str, cols: set) -> tuple:
    if fmt in ("explicit", "conversational"):
        return ("prompt", "chosen", "rejected")
    if fmt in ("implicit", "hh"):
        return ("chosen", "rejected")
    if fmt == "unpaired":
        return ("prompt", "completion", "label")
    if "messages" in cols:
        return ("messages",)
    return ("prompt", "completion") if "completion" in cols else ("prompt", "chosen")


def _bad(i: int, split: str, col: str, what: str) -> DataError:
    return DataError(f"row {i} of split '{split}': column '{col}' {what}; fix or remove that row")


def _text(value: Any, i: int, split: str, col: str) -> str:
    if value is None:
        raise _bad(i, split, col, "is missing")
    if not isinstance(value, str):
        raise _bad(i, split, col, f"must be a string for this format, got {type(value).__name__} "
                                  f"(set data.format to match the data)")
    if not value.strip():
        raise _bad(i, split, col, "is empty")
    return value


def _messages(value: Any, i: int, split: str, col: str) -> list:
    """A checked list of {"role", "content"} messages (other keys dropped)."""
    if value is None:
        raise _bad(i, split, col, "is missing")
    if not isinstance(value, list):
        raise _bad(i, split, col, f"must be a list of messages for this format, got {type(value).__name__} "
                                  f"(set data.format to match the data)")
    if not value:
        raise _bad(i, split, col, "is an empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _bad(i, split, col, "has a message without a string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if not "".join(m["content"] for m in out).strip():
        raise _bad(i, split, col, "has only empty messages")
    return out


def _split_conversations(chosen: list, rejected: list, i: int, split: str) -> tuple:
    """Shared leading messages are the prompt; the rest of each conversation is its answer."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1]["role"] == "assistant" and (k == len(chosen) or k == len(rejected)):
        k -= 1  # identical final answers: keep them as answers (the pair is dropped at tokenisation)
    if k == 0:
        raise _bad(i, split, "chosen", "shares no leading messages with 'rejected', so there is no prompt")
    for col, conv in (("chosen", chosen), ("rejected", rejected)):
        if k == len(conv) or conv[k]["role"] != "assistant":
            raise _bad(i, split, col, "does not continue the shared prompt with an assistant message")
        if not "".join(m["content"] for m in conv[k:]).strip():
            raise _bad(i, split, col, "has an empty answer after the shared prompt")
    return chosen[:k], chosen[k:], rejected[k:]


def _normalise_row(row: dict, i: int, fmt: str, split: str) -> dict:
    """One stored row -> {prompt, chosen, rejected} (sft: {prompt, chosen}). Picklable for datasets.map."""
    if fmt == "explicit":
        return {"prompt": _text(row["prompt"], i, split, "prompt"), "chosen": _text(row["chosen"], i, split, "chosen"),
                "rejected": _text(row["rejected"], i, split, "rejected")}
    if fmt == "conversational":
        chosen = _messages(row["chosen"], i, split, "chosen")
        rejected = _messages(row["rejected"], i, split, "rejected")
        if isinstance(row["prompt"], str) and chosen[0]["role"] != "assistant":  # UltraFeedback: full conversations
            prompt, chosen, rejected = _split_conversations(chosen, rejected, i, split)
        elif isinstance(row["prompt"], str):
            prompt = [{"role": "user", "content": _text(row["prompt"], i, split, "prompt")}]
        else:
            prompt = _messages(row["prompt"], i, split, "prompt")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt == "implicit":
        prompt, chosen, rejected = _split_conversations(
            _messages(row["chosen"], i, split, "chosen"), _messages(row["rejected"], i, split, "rejected"), i, split)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt == "hh":
        chosen, rejected = _text(row["chosen"], i, split, "chosen"), _text(row["rejected"], i, split, "rejected")
        cut = chosen.rfind(HH_ASSISTANT)
        if cut < 0:
            raise _bad(i, split, "chosen", f"has no '{HH_ASSISTANT.strip()}' turn (not HH text)")
        prompt = chosen[:cut + len(HH_ASSISTANT)]
        if not rejected.startswith(prompt):
            raise _bad(i, split, "rejected", "does not share the chosen transcript up to its last 'Assistant:'")
        for col, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer[len(prompt):].strip():
                raise _bad(i, split, col, "has an empty final Assistant answer")
        return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}
    if fmt == "sft":
        if "messages" in row:
            messages = _messages(row["messages"], i, split, "messages")
            if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
                raise _bad(i, split, "messages", "must end with a non-empty assistant message after the prompt")
            return {"prompt": messages[:-1], "chosen": messages[-1:]}
        answer_col = "completion" if "completion" in row else "chosen"
        prompt, answer = row["prompt"], row[answer_col]
        if isinstance(prompt, list) or isinstance(answer, list):
            return {"prompt": _messages(prompt, i, split, "prompt"), "chosen": _messages(answer, i, split, answer_col)}
        return {"prompt": _text(prompt, i, split, "prompt"), "chosen": _text(answer, i, split, answer_col)}
    if fmt == "unpaired":
        if not isinstance(row["label"], bool) and row["label"] not in (0, 1):
            raise _bad(i, split, "label", f"must be true or false, got {row['label']!r}")
        prompt, answer = row["prompt"], row["completion"]
        if isinstance(prompt, list) or isinstance(answer, list):
            prompt, answer = _messages(prompt, i, split, "prompt"), _messages(answer, i, split, "completion")
        else:
            prompt, answer = _text(prompt, i, split, "prompt"), _text(answer, i, split, "completion")
        return {"prompt": prompt, "chosen": answer, "label": bool(row["label"])}
    raise DataError(f"data.format '{fmt}' is unknown; choose one of: auto, {', '.join(FORMATS)}")


def _normalise_pair(row: dict, i: int, fmt: str, split: str) -> dict:
    """`_normalise_row`, refusing a pair whose two answers are the same (it carries no preference)."""
    out = _normalise_row(row, i, fmt, split)
    if out.get("rejected") is not None and out["rejected"] == out["chosen"]:
        raise _bad(i, split, "rejected", "is the same as 'chosen' (a pair must differ)")
    return out


def normalise_split(ds, fmt: str = "auto", split: str = "train"):
    """Rows of any supported format -> prompt/chosen/rejected rows (other columns dropped but a reward dataset's
    ``margin``).

    Checks every row first (column present, right type, non-empty answer) and raises a one-line
    DataError naming the row index and the column. Cached by datasets like any map.
    """
    if len(ds) == 0:
        raise DataError(f"split '{split}' of the dataset is empty; check data.dataset_name / data.{split}_split")
    cols = set(ds.column_names)
    if fmt == "auto":
        fmt = detect_format(ds.column_names, ds[0], split)
    elif fmt not in FORMATS:
        raise DataError(f"data.format '{fmt}' is unknown; choose one of: auto, {', '.join(FORMATS)}")
    for col in _required_columns(fmt, cols):
        if col not in cols:
            raise DataError(f"split '{split}' has no column '{col}' (columns: {sorted(cols)}), which data.format "
                            f"'{fmt}' needs; rename the column or set data.format")
    fingerprint = _hash("normalise", ds._fingerprint, fmt, split)
    out = ds.map(_normalise_pair, with_indices=True, fn_kwargs={"fmt": fmt, "split": split},
                 remove_columns=ds.column_names, new_fingerprint=fingerprint, desc=f"normalise {split} ({fmt})")
    if "margin" in cols:  # a reward dataset's per-pair margin (TRL's RewardTrainer), read by loss_type bradley_terry
        out = out.add_column("margin", ds["margin"], new_fingerprint=_hash("margin", fingerprint))
    return out


# ---------------------------------------------------------------------------------- tokenising

def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([_CODE_HASH, *parts], default=str).encode()).hexdigest()[:32]


def _auto_bos(tokenizer) -> Optional[int]:
    """The BOS id when the tokenizer prepends it to plain text by itself (Llama-style), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of everything that decides token ids: vocabulary and merges (the fast backend's
    JSON, else the sorted vocabulary), chat template, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _hash(type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
                 hashlib.sha256(body.encode()).hexdigest(), getattr(tokenizer, "chat_template", None),
                 tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, _auto_bos(tokenizer))


def _is_transcript(prompt: str) -> bool:
    return prompt.endswith(HH_ASSISTANT)


def _as_messages(prompt, tokenizer) -> Optional[list]:
    """The prompt as chat messages when it goes through the chat template, else None (raw text)."""
    if isinstance(prompt, list):
        return prompt
    if getattr(tokenizer, "chat_template", None) and not _is_transcript(prompt):
        return [{"role": "user", "content": prompt}]
    return None


def _encode_text(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list, add_generation_prompt: bool) -> list:
    """Chat-template token ids. Rendered to text and tokenised without special tokens: the template
    already holds BOS where the model wants it, so none is added twice."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _encode_text(tokenizer, text)


def prompt_input_ids(tokenizer, prompt) -> list:
    """Token ids of a prompt exactly as training sees it before an answer (for generation)."""
    messages = _as_messages(prompt, tokenizer)
    if messages is not None:
        return _render(tokenizer, messages, add_generation_prompt=True)
    bos = _auto_bos(tokenizer)
    ids = _encode_text(tokenizer, prompt)
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def encode_example(tokenizer, prompt, answers: list, where: str = "a row", auto_bos: Optional[int] = -1) -> tuple:
    """(prompt ids, [answer ids, ...]) of one row, before truncation; each answer ends with one EOS.

    Chat template: the answer is the template of prompt+answer minus the template of the prompt with
    add_generation_prompt=True; the prompt's ids must be a prefix of the full ids (DataError
    otherwise), and whatever follows the answer's last EOS is cut. Raw text: prompt ids (+ BOS) and
    answer ids + EOS. `where` names the row in errors; `auto_bos`: precomputed `_auto_bos(tokenizer)`
    (-1: compute it).
    """
    eos = tokenizer.eos_token_id
    if (isinstance(prompt, list) or isinstance(answers[0], list)) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: conversational rows need a tokenizer with a chat template; "
                        f"set model.tokenizer_name_or_path to one that has it")
    messages = _as_messages(prompt, tokenizer)
    if messages is not None:
        prompt_ids = _render(tokenizer, messages, add_generation_prompt=True)
        out = []
        for answer in answers:
            if isinstance(answer, str):
                answer = [{"role": "assistant", "content": answer}]
            full = _render(tokenizer, messages + list(answer), add_generation_prompt=False)
            if full[:len(prompt_ids)] != prompt_ids:
                raise DataError(f"{where}: the chat template of prompt+answer does not start with the tokens of the "
                                f"prompt with add_generation_prompt=True (prefix check failed); this template cannot "
                                f"be split into prompt and answer tokens: use a tokenizer whose template can")
            ids = full[len(prompt_ids):]
            ends = [j for j, t in enumerate(ids) if t == eos]
            out.append(ids[:ends[-1] + 1] if ends else ids + [eos])
        return prompt_ids, out
    bos = _auto_bos(tokenizer) if auto_bos == -1 else auto_bos
    prompt_ids = _encode_text(tokenizer, prompt)
    if bos is not None and prompt_ids[:1] != [bos]:
        prompt_ids = [bos] + prompt_ids
    out = []
    for answer in answers:
        ids = _encode_text(tokenizer, answer)
        while ids and ids[-1] == eos:
            ids.pop()
        out.append(ids + [eos])
    return prompt_ids, out


def truncate(prompt_ids: list, answers: list, max_length: int, max_prompt_length: int,
             truncation_mode: str) -> tuple:
    """(prompt ids, answers, truncated?) within max_length, TRL's rule.

    When prompt + the longer answer exceeds max_length: the prompt is first cut to max_prompt_length
    (keep_end keeps its end, keep_start its start), then every answer to max_length - prompt length
    (keeping its start, so a cut answer loses its EOS).
    """
    longest = max(len(a) for a in answers)
    truncated = False
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:] if truncation_mode == "keep_end" else prompt_ids[:max_prompt_length]
        truncated = True
    if len(prompt_ids) + longest > max_length:
        limit = max(max_length - len(prompt_ids), 0)
        truncated = truncated or any(len(a) > limit for a in answers)
        answers = [a[:limit] for a in answers]
    return prompt_ids, answers, truncated


def _tokenize_row(row: dict, i: int, tokenizer, max_length: int, max_prompt_length: int, truncation_mode: str,
                  paired: bool, auto_bos: Optional[int], split: str) -> dict:
    """One normalised row -> token columns + helper columns for the statistics. Picklable for datasets.map.

    Drop rule: a pair is dropped when after truncation an answer has no token left, or (paired) the
    chosen and rejected answer tokens are identical (their difference was cut off, or the data has the
    same answer twice): such a pair carries no preference signal.
    """
    answers = [row["chosen"], row["rejected"]] if paired else [row["chosen"]]
    prompt_ids, answer_ids = encode_example(tokenizer, row["prompt"], answers, f"row {i} of split '{split}'", auto_bos)
    raw_length = len(prompt_ids) + max(len(a) for a in answer_ids)
    prompt_ids, answer_ids, truncated = truncate(prompt_ids, answer_ids, max_length, max_prompt_length,
                                                 truncation_mode)
    dropped = any(len(a) == 0 for a in answer_ids) or (paired and answer_ids[0] == answer_ids[1])
    out = {"prompt_length": len(prompt_ids), "source_idx": i,
           "_status": STATUS_DROPPED if dropped else STATUS_TRUNCATED if truncated else STATUS_KEPT,
           "_raw_length": raw_length}
    for side, ids in zip(("chosen", "rejected"), answer_ids):
        out[f"{side}_input_ids"] = prompt_ids + ids
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + ids
        out[f"{side}_length"] = len(prompt_ids) + len(ids)
    if not paired:
        out["rejected_length"] = 0
    if "label" in row:  # unpaired (KTO) rows: chosen is the completion, rejected its mismatched KL completion
        out["label"] = bool(row["label"])
    return out


def _keep_row(status: int) -> bool:
    return status != STATUS_DROPPED


def _percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    q = np.percentile(values, [50, 90, 99], method="higher")
    return {"p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(values.max())}


def tokenize_splits(splits, tokenizer, cfg: DataConfig) -> tuple:
    """Tokenise normalised splits: (DatasetDict of token rows, {split: stats}).

    Row columns: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels (lists of ints;
    labels are -100 over the prompt; sft rows have no rejected_*), prompt_length, source_idx (row in
    the normalised split) and idx (0..N-1, the row's index in the tokenised split, contiguous after
    dropped pairs are removed). Truncation and the drop rule: `truncate` and `_tokenize_row`.

    Stats per split: pairs (in), kept (out, truncated included), truncated, dropped, chosen_len and
    rejected_len percentiles {p50, p90, p99, max} of the kept sequences (prompt + answer, as trained),
    raw_max (the longest prompt + answer before truncation).

    Each step is a datasets.map/filter whose fingerprint is a hash of the input split's fingerprint,
    the tokenizer (`tokenizer_fingerprint`), the truncation settings and this module's source, so a
    second run with the same inputs loads the cached result instead of tokenising again (only for
    datasets backed by cache files, as any loaded from disk is). Wrap it in
    ``accelerator.main_process_first()`` so one process writes the cache.
    """
    import datasets

    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set model.tokenizer_name_or_path to one that does")
    tok = (tokenizer, tokenizer_fingerprint(tokenizer), _auto_bos(tokenizer))
    if isinstance(splits, MixtureDict):
        return _tokenize_mixture(splits, tok, cfg)
    out, stats = {}, {}
    for key, ds in splits.items():
        mapped = _tokenize_split(ds, key, tok, cfg)
        helpers = _helpers(mapped)
        stats[key] = _split_stats(helpers, "rejected" in ds.column_names)
        out[key] = _finish_split(mapped, helpers["_status"], key, cfg, stats[key]["kept"])
    return datasets.DatasetDict(out), stats


def _tokenize_split(ds, key: str, tok: tuple, cfg: DataConfig):
    """datasets.map of `_tokenize_row` over one split, fingerprinted by its inputs (so cached)."""
    tokenizer, tok_hash, auto_bos = tok
    settings = (cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode)
    return ds.map(
        _tokenize_row, with_indices=True, remove_columns=ds.column_names, num_proc=cfg.num_proc,
        fn_kwargs=dict(tokenizer=tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                       truncation_mode=cfg.truncation_mode, paired="rejected" in ds.column_names,
                       auto_bos=auto_bos, split=key),
        new_fingerprint=_hash("tokenize", ds._fingerprint, tok_hash, settings), desc=f"tokenize {key}")


def _helpers(mapped) -> dict:
    return mapped.select_columns(list(_HELPER_COLUMNS)).with_format("numpy")[:]


def _split_stats(helpers: dict, paired: bool) -> dict:
    status = helpers["_status"]
    kept = status != STATUS_DROPPED
    out = {"pairs": int(status.size), "kept": int(kept.sum()), "truncated": int((status == STATUS_TRUNCATED).sum()),
           "dropped": int((~kept).sum()), "chosen_len": _percentiles(helpers["chosen_length"][kept]),
           "raw_max": int(helpers["_raw_length"].max()) if status.size else 0}
    if paired:
        out["rejected_len"] = _percentiles(helpers["rejected_length"][kept])
    return out


def _finish_split(mapped, status: np.ndarray, key: str, cfg: DataConfig, kept: int):
    """Drop the dropped pairs, remove the helper columns, number the rows (idx)."""
    if kept == 0:
        raise DataError(f"every pair of split '{key}' was dropped by truncation; raise data.max_length "
                        f"(now {cfg.max_length}) or data.max_prompt_length (now {cfg.max_prompt_length})")
    if kept < status.size:
        mapped = mapped.filter(_keep_row, input_columns="_status", new_fingerprint=_hash("drop", mapped._fingerprint))
    mapped = mapped.remove_columns(list(_HELPER_COLUMNS))
    return mapped.add_column("idx", np.arange(len(mapped), dtype=np.int64),
                             new_fingerprint=_hash("idx", mapped._fingerprint))


def _tokenize_mixture(splits: MixtureDict, tok: tuple, cfg: DataConfig) -> tuple:
    """Tokenise each source's rows on their own (cached per source: another source's weight or a
    new seed leaves it cached), then assemble each split in the mixture's order. Stats gain
    ``sources``: per source pairs / kept / truncated / dropped, length percentiles, what the recipe
    asked for (``spec``) and its ``share`` of the split's kept pairs."""
    import datasets

    tokenized = [_tokenize_split(ds, label, tok, cfg) for label, ds in splits.parts]
    helpers = [_helpers(m) for m in tokenized]
    every = {col: np.concatenate([h[col] for h in helpers]) for col in _HELPER_COLUMNS}
    part_of = np.repeat(np.arange(len(tokenized)), [len(m) for m in tokenized])
    whole = datasets.concatenate_datasets(tokenized)
    fps = [m._fingerprint for m in tokenized]
    paired = "rejected_input_ids" in whole.column_names
    out, stats = {}, {}
    for key, order in splits.orders.items():
        h = {col: v[order] for col, v in every.items()}
        stats[key] = _split_stats(h, paired)
        stats[key]["sources"] = {}
        for j, (label, _) in enumerate(splits.parts):
            mine = part_of[order] == j
            if mine.any():
                s = _split_stats({col: v[mine] for col, v in h.items()}, paired)
                s.update(spec=splits.specs[j], share=s["kept"] / max(stats[key]["kept"], 1))
                stats[key]["sources"][label] = s
        mapped = whole.select(order, new_fingerprint=_hash("mix-tokenized", fps, key, _digest(order)))
        mapped = mapped.remove_columns(["source_idx"])  # the row in this split (as load_preference_splits gave it)
        mapped = mapped.add_column("source_idx", np.arange(len(order), dtype=np.int64),
                                   new_fingerprint=_hash("mix-source-idx", mapped._fingerprint))
        out[key] = _finish_split(mapped, h["_status"], key, cfg, stats[key]["kept"])
    return datasets.DatasetDict(out), stats


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


def format_stats(stats: dict) -> str:
    """A short table of `tokenize_splits` statistics, one line per split."""
    def q(d: Optional[dict]) -> str:
        return "-" if d is None else f"{d['p50']}/{d['p90']}/{d['p99']}/{d['max']}"

    head = f"{'split':<8}{'pairs':>8}{'kept':>8}{'trunc':>8}{'dropped':>9}{'raw max':>9}   " \
           f"{'chosen p50/p90/p99/max':<24}{'rejected p50/p90/p99/max':<24}"
    lines = [head]
    for key, s in stats.items():
        lines.append(f"{key:<8}{s['pairs']:>8}{s['kept']:>8}{s['truncated']:>8}{s['dropped']:>9}{s['raw_max']:>9}   "
                     f"{q(s['chosen_len']):<24}{q(s.get('rejected_len')):<24}")
        for label, src in s.get("sources", {}).items():  # a mixture: one line per source, its share of the split
            lines.append(f"  {'':<6}{src['pairs']:>8}{src['kept']:>8}{src['truncated']:>8}{src['dropped']:>9}"
                         f"{src['raw_max']:>9}   {q(src['chosen_len']):<24}{q(src.get('rejected_len')):<24}"
                         f"{src['share']:>6.1%} of {key}  {label} ({src['spec']})")
    return "\n".join(lines)


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
