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
                  label; dpo_accel/data/unpaired.py adds each row's mismatched completion as ``rejected``

Mixtures (``data.dataset_mixture``, the alignment-handbook's block; schema in dpo_accel/config/mixture.py):
each source is loaded and normalised with its own format, subsampled (``weight``: a seeded fraction,
as the handbook, or with ``form: dataset_mixer`` the first rows, as its older mixer; ``rows``: a count),
mixed in a seeded order and carved (``test_split_size``: datasets' own ``train_test_split`` of the
mixture), the rows the handbook's own calls give. Where
some sources give text and others messages, single-turn conversations become strings (the same
tokens under a chat template) or, if any is multi-turn or HH, text becomes messages (HH transcripts
parsed into turns). `tokenize_splits` tokenises and caches each source apart and reports each
source's kept / truncated / dropped rows and share.

Tokenisation (chat template, BOS / EOS, truncation) is dpo_accel/data/tokenize.py.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from dpo_accel.outputs.console import log
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import DataConfig


HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("explicit", "conversational", "implicit", "hh", "sft", "unpaired")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
STATUS_KEPT, STATUS_TRUNCATED, STATUS_DROPPED = 0, 1, 2
_HELPER_COLUMNS = ("_status", "_raw_length", "chosen_length", "rejected_length")

# Any edit of the modules that normalise and tokenise rows invalidates the datasets caches they made.
_CODE_HASH = hashlib.sha256(b"".join(
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb").read()
    for name in ("formats.py", "tokenize.py"))).hexdigest()[:16]


# Token ids a row may carry besides its text (the pairs an iterative round sampled): tokenisation then takes them
# as they are instead of encoding the text again (which could differ: a raw-text answer's leading space, an EOS).
SAMPLED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


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
    import logging

    import datasets

    # The builder logs a failed read at ERROR (with a traceback) before it raises; the one line below says
    # it better, so the builder's logger is held to CRITICAL for this call.
    builder_log = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    level = builder_log.level
    builder_log.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files={"train": files}, split="train", cache_dir=cache_dir)
    except Exception as e:  # datasets' errors name neither the file nor the line: find them
        raise DataError(_unreadable(files, e)) from None
    finally:
        builder_log.setLevel(level)


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


def _index_rows(rows: np.ndarray):
    """A one-column in-memory Dataset of row numbers, so datasets' own shuffle / train_test_split pick rows."""
    import datasets

    return datasets.Dataset.from_dict({"row": np.asarray(rows, dtype=np.int64)})


def _rows_of(ds) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")["row"], dtype=np.int64)


def _shuffled(rows: np.ndarray, seed: int) -> np.ndarray:
    """`rows` in the order datasets' ``Dataset.shuffle(seed=seed)`` puts them."""
    return _rows_of(_index_rows(rows).shuffle(seed=seed))


def _subsample(n: int, src, seed: int, first_rows: bool = False) -> np.ndarray:
    """Row indices kept of a source of n rows: handbook weight (``ds.shuffle(seed=seed).select(range(int(n *
    weight)))``; with `first_rows`, the older dataset_mixer's ``ds.select(range(int(weight * n)))``), a row
    count (whole shuffles repeated when it exceeds n), or all rows in order."""
    if src.weight is not None and first_rows:
        return np.arange(int(src.weight * n))
    if src.weight is None and src.rows is None:
        return np.arange(n)
    perm = _shuffled(np.arange(n), seed)
    if src.weight is not None:
        return perm[:int(n * src.weight)]
    return np.concatenate([perm] * (src.rows // n) + [perm[:src.rows % n]])


def _carve(pool: np.ndarray, size, seed: int) -> dict:
    """{"train": rows, "eval": held-out rows} of the mixed `pool` (row numbers in mixed order): datasets'
    own ``train_test_split(test_size=size, seed=seed)`` of the mixture, the handbook's call (it shuffles
    again, so the held-out rows are not the mixture's first); {"train": pool} when size is None."""
    from dpo_accel.config.mixture import held_out_rows

    if size is None:
        return {"train": pool}
    held_out_rows(size, len(pool))  # one line naming the recipe key when a side would be empty
    carved = _index_rows(pool).train_test_split(test_size=size, seed=seed)
    return {"train": _rows_of(carved["train"]), "eval": _rows_of(carved["test"])}


def _load_mixture(cfg: DataConfig, seed: int, cache_dir: Optional[str]) -> MixtureDict:
    """Load, check and normalise every source of `cfg.dataset_mixture`, subsample each, mix, carve eval."""
    import datasets

    from dpo_accel.config.mixture import parse_mixture

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
                keep = _subsample(len(ds), src, seed, mixture.first_rows)
                if len(keep) == 0:
                    raise DataError(f"{at}.weight {src.weight} keeps no row of the {len(ds)} in '{label}'; raise it")
                ds = ds.select(keep, new_fingerprint=content_hash("subsample", ds._fingerprint, index_digest(keep)))
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
                                          new_fingerprint=content_hash("lower", ds._fingerprint), desc=f"as text {label}"))
            elif not lower and kind == "text":
                parts[j] = (label, ds.map(_lift_row, fn_kwargs={"hh": hh}, remove_columns=ds.column_names,
                                          new_fingerprint=content_hash("lift", ds._fingerprint, hh), desc=f"lift {label}"))
    offsets = np.cumsum([0] + [len(ds) for _, ds in parts])
    pool = _shuffled(np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in train_parts]), seed)
    orders = _carve(pool, mixture.test_split_size, seed)
    own_eval = [np.arange(offsets[j], offsets[j + 1]) for j, spec in enumerate(specs) if spec == "eval split"]
    if own_eval:  # the older mixer shuffled its concatenated test splits with the seed
        own = _shuffled(np.concatenate(own_eval), seed) if mixture.first_rows else np.concatenate(own_eval)
        orders["eval"] = np.concatenate([orders.get("eval", own[:0]), own])
    for key, cap in (("train", cfg.max_train_samples), ("eval", cfg.max_eval_samples)):
        if cap is not None and key in orders:
            if cap < 1:
                raise DataError(f"data.max_{key}_samples must be at least 1 (or null for all rows), got {cap}")
            orders[key] = orders[key][:cap]  # already in a seeded random order
    whole = datasets.concatenate_datasets([ds for _, ds in parts])
    fps = [ds._fingerprint for _, ds in parts]
    splits = {key: whole.select(order, new_fingerprint=content_hash("mix", fps, key, index_digest(order)))
              for key, order in orders.items()}
    return MixtureDict(splits, parts, orders, specs)


def _is_hh(ds) -> bool:
    """A normalised split whose prompts are HH transcripts (raw text ending in the Assistant marker)."""
    return isinstance(ds[0]["prompt"], str) and is_transcript(ds[0]["prompt"])


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
    ``margin`` and, on explicit rows, the sampled token ids of `SAMPLED_COLUMNS`).

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
    fingerprint = content_hash("normalise", ds._fingerprint, fmt, split)
    out = ds.map(_normalise_pair, with_indices=True, fn_kwargs={"fmt": fmt, "split": split},
                 remove_columns=ds.column_names, new_fingerprint=fingerprint, desc=f"normalise {split} ({fmt})")
    if "margin" in cols:  # a reward dataset's per-pair margin (TRL's RewardTrainer), read by loss_type bradley_terry
        out = out.add_column("margin", ds["margin"], new_fingerprint=content_hash("margin", fingerprint))
    if fmt == "explicit" and cols.issuperset(SAMPLED_COLUMNS):  # pairs an iterative round sampled: their token ids
        for col in SAMPLED_COLUMNS:
            out = out.add_column(col, ds[col], new_fingerprint=content_hash(col, out._fingerprint))
    return out


def index_digest(indices: np.ndarray) -> str:
    """A hash of row indices (which rows a subsample or a split kept)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def content_hash(*parts: Any) -> str:
    """A cache key of `parts` and of this data code (an edit of the code makes new keys)."""
    return hashlib.sha256(json.dumps([_CODE_HASH, *parts], default=str).encode()).hexdigest()[:32]


def is_transcript(prompt: str) -> bool:
    """An Anthropic HH transcript prompt (kept as raw text, never put through a chat template)."""
    return prompt.endswith(HH_ASSISTANT)
