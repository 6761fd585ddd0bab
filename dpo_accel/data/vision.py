"""Preference pairs with images, for vision-language models (VLMs): TRL's vision format loaded and checked,
tokenised with the model's processor (cached by datasets), truncated without cutting image tokens, collated.

Rows (TRL's vision preference format)::

    prompt    messages whose content is a string or a list of {"type": "text", "text": ...} / {"type": "image"}
              parts (a plain-string prompt is one user message)
    chosen    an answer string, or assistant messages (string content or text parts)
    rejected  the same
    images    the pair's images in placeholder order: PIL images (hub / in-memory datasets) or, for local
              JSONL / JSON / Parquet data, paths relative to the data file's folder

A row must hold exactly as many images as ``{"type": "image"}`` parts in its prompt, and answers hold no
image. A dataset is a vision dataset when it has an ``images`` column (`is_vision_dataset`; `is_vision_source`
tells it from the recipe's data keys before anything loads, so a run picks its path first).

Tokenisation (`tokenize_vision_splits`): the prompt goes through the processor's chat template
(add_generation_prompt=True) and then the processor with the pair's images, which expands each image
placeholder into the model's image tokens; each answer is the template of prompt + answer minus the
template of the prompt (a token prefix check, as the text path) and ends with exactly one EOS. The images
are processed once per pair: both rows of a pair share them. The processor's image tensors are not kept: the
cached rows hold the token ids, the prompt's template text, the pair's images as the dataset gave them (paths,
or datasets' Image feature: the encoded file bytes) and the number and shape of its tower inputs; the collator
runs the processor again on each pair's text and images (`pair_image_tensors`, the same call), so a batch's
tensors are the ones tokenisation saw, and the cache holds no pixel tensors.

Text-only data given to a VLM is allowed: rows without an ``images`` column (the text path's normalised
rows: string or message prompts, string or message answers) are tokenised the same way, without images,
through the processor's chat template; their batches carry no image keys. Single-answer (sft) and unpaired
(KTO) rows, and Anthropic HH transcripts (raw text meant for no chat template), are refused.

Truncation (`truncate_vision`) never cuts an image token: when prompt + the longer answer exceed
max_length the answers are cut first (keeping their start); only when the prompt alone leaves no room for
an answer token is the prompt's text outside its image span (the first to the last image token, text
between images included) cut by truncation_mode, down to max_prompt_length tokens (or to the image span
when that is longer) and at most max_length - 1; a pair whose image span does not fit, or whose answers
end empty or identical, is dropped and counted. Statistics have the text path's shape (format_stats).

Batch contract (`VisionPreferenceCollator`, read by the model code)::

    chosen_input_ids, chosen_attention_mask, chosen_labels        LongTensor [B, Tc]  (right padding;
    rejected_input_ids, rejected_attention_mask, rejected_labels  LongTensor [B, Tr]   labels -100 on the
    idx                                                           LongTensor [B]       prompt and padding)
    chosen_token_type_ids, rejected_token_type_ids                LongTensor [B, Tc] / [B, Tr], only where the
                                                                  processor returns token_type_ids (its values
                                                                  on the prompt, 0 on answer and padding)
    pixel_values and the processor's other image outputs under its own names (image_grid_thw,
    pixel_attention_mask, image_sizes, ...), made by the collator's processor from each pair's images:
    each pair's tensors ONCE, concatenated along dim 0 in pair order (trailing dims zero-padded to the
    batch's largest where pairs differ); floats float32, integers int64, masks bool; absent when no pair of
    the batch has an image.

Both rows of a pair show the same images, so a forward of the rows concatenated as [chosen; rejected]
passes each image tensor twice (``torch.cat([v, v])``), and the two sides separately pass it once each.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Optional

import numpy as np
import torch

from dpo_accel.config.schema import DataConfig
from dpo_accel.data.collate import PreferenceCollator
from dpo_accel.data.formats import REPO_ROOT, DataError, content_hash, is_transcript
from dpo_accel.data.tokenize import tokenizer_fingerprint
from dpo_accel.model.logps import IGNORE_INDEX

IMAGES = "images"
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")  # per-token processor outputs kept per side
TEXT_KEYS = ("input_ids", "attention_mask") + TOKEN_KEYS
# Tokens of an image's expansion besides the placeholder itself, by the processor attribute naming them.
IMAGE_TOKEN_ATTRS = ("image_token", "boi_token", "eoi_token", "image_start_token", "image_end_token",
                     "vision_start_token", "vision_end_token", "fake_image_token", "global_image_token")
PROMPT_TEXT = "prompt_text"  # the prompt's chat-template text, which the collator gives the processor again
TOWER_INPUTS, TOWER_SHAPE = "tower_inputs", "tower_input_shape"  # per pair, for inspect (`tower_inputs`)
STATUS_KEPT, STATUS_TRUNCATED, STATUS_DROPPED = 0, 1, 2
HELPERS = ("_status", "_raw_length", "chosen_length", "rejected_length")
DATA_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
WRITER_BATCH = 100  # rows held before each cache write: token ids and the images' encoded bytes (datasets' own
#                    row-group size for image data), not pixel tensors
_CODE_HASH = hashlib.sha256(open(os.path.abspath(__file__), "rb").read()).hexdigest()[:16]


def is_vision_dataset(columns) -> bool:
    """A dataset with an ``images`` column (its column names, or the dataset)."""
    return IMAGES in (getattr(columns, "column_names", None) or columns)


# ------------------------------------------------------------------------------------------ loading

def first_row_columns(path: str) -> list:
    """The columns of a local data file, read off its schema or first row (nothing else is read)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path) as f:
        if ext == ".jsonl":
            line = next((x for x in f if x.strip()), "{}")
            row = json.loads(line)
        else:
            data = json.load(f)
            row = data[0] if isinstance(data, list) and data else data
    return list(row) if isinstance(row, dict) else []


def is_vision_source(cfg: DataConfig, hub: bool = True) -> bool:
    """Whether the recipe's dataset is in the vision format (an ``images`` column), decided before anything is
    loaded or tokenised, so the run can pick its path (and refuse a text-only model) first: a local file's
    schema or first row, a hub dataset's declared features (with `hub`; a text model's run does not ask the
    hub). A mixture, a saved DatasetDict or a source that cannot be read here counts as text (the text path
    then says what is wrong with it)."""
    name = cfg.dataset_name
    if cfg.dataset_mixture is not None:
        return False
    local = next((p for p in (name, os.path.expanduser(name), os.path.join(REPO_ROOT, name)) if os.path.exists(p)),
                 None)
    if local is not None:
        found = _data_file(local, cfg.train_split)
        if found is None or os.path.splitext(found)[1].lower() not in DATA_FILES:
            return False
        try:
            return is_vision_dataset(first_row_columns(found))
        except (OSError, ValueError):  # unreadable or not JSON: the loader names the problem
            return False
    if not hub:
        return False
    try:
        import datasets

        features = datasets.load_dataset_builder(name, cfg.dataset_config).info.features
    except Exception:  # offline or unknown: the text loader's error says so
        return False
    return features is not None and is_vision_dataset(list(features))


def _bad(i: int, split: str, what: str) -> DataError:
    return DataError(f"row {i} of split '{split}': {what}; fix or remove that row")


def _parts(content, i: int, split: str, col: str) -> list:
    """A message content as a checked list of {"type", "text"} parts (text None on image parts)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(i, split, f"column '{col}' has a message whose content is neither a string nor a list of parts")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            out.append({"type": "image", "text": None})
        elif kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        else:
            raise _bad(i, split, f"column '{col}' has a content part that is not {{'type': 'text', 'text': str}} "
                                 f"or {{'type': 'image'}} ({part!r:.60})")
    return out


def as_part_messages(value, i: int, split: str, col: str) -> list:
    """A prompt or an answer as messages of parts: a string is one user (prompt) or assistant (answer) message."""
    if isinstance(value, str):
        if col == "prompt" and is_transcript(value):
            raise _bad(i, split, "the prompt is an HH transcript (raw text, no chat template), which a VLM's "
                                 "processor cannot take; train it with a text model")
        if not value.strip():
            raise _bad(i, split, f"column '{col}' is empty")
        return [{"role": "user" if col == "prompt" else "assistant", "content": _parts(value, i, split, col)}]
    if not isinstance(value, list) or not value:
        raise _bad(i, split, f"column '{col}' must be a string or a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(i, split, f"column '{col}' has a message without a string 'role'")
        out.append({"role": m["role"], "content": _parts(m.get("content"), i, split, col)})
    if col != "prompt" and (out[-1]["role"] != "assistant" or any(
            p["type"] == "image" for m in out for p in m["content"])):
        raise _bad(i, split, f"column '{col}' must be assistant messages without images (images go in the prompt)")
    return out


def count_placeholders(messages: list) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def checked_image_path(value: str, i: int, split: str, base_dir: Optional[str]) -> str:
    """An image path resolved against `base_dir` (the data file's folder), shown to exist and to be an image."""
    from PIL import Image

    path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
    if not os.path.isfile(path):
        raise _bad(i, split, f"image file '{path}' does not exist (images entry {value!r})")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # PIL raises many types for a file that is not a whole image
        raise _bad(i, split, f"image file '{path}' cannot be read as an image ({type(e).__name__}: {e})") from None
    return os.path.abspath(path)


def normalise_vision_row(row: dict, i: int, split: str, base_dir: Optional[str], paths: bool) -> dict:
    """One stored row -> {prompt, chosen, rejected} as messages of parts (+ images, resolved, when paths).
    Picklable for datasets.map."""
    out = {col: as_part_messages(row[col], i, split, col) for col in ("prompt", "chosen", "rejected")}
    if out["chosen"] == out["rejected"]:
        raise _bad(i, split, "column 'rejected' is the same as 'chosen' (a pair must differ)")
    images = row[IMAGES]
    images = [] if images is None else images if isinstance(images, list) else [images]
    wanted = count_placeholders(out["prompt"])
    if wanted != len(images):
        raise _bad(i, split, f"the prompt has {wanted} image placeholder(s) ({{'type': 'image'}} parts) but "
                             f"'images' holds {len(images)} image(s); make them match")
    if paths:
        if not all(isinstance(v, str) for v in images):
            raise _bad(i, split, "'images' must hold image paths (strings)")
        out[IMAGES] = [checked_image_path(v, i, split, base_dir) for v in images]
    return out


def _holds_paths(feature) -> bool:
    """True when an images column stores strings (paths), False for datasets' Image feature (PIL images)."""
    inner = getattr(feature, "feature", feature)
    return getattr(inner, "dtype", None) in ("string", "large_string")


def normalise_vision_split(ds, split: str = "train", base_dir: Optional[str] = None):
    """Rows of TRL's vision format -> prompt / chosen / rejected (messages of parts) + images, every row checked
    (one DataError line naming the row). String images are paths, resolved against `base_dir`."""
    if len(ds) == 0:
        raise DataError(f"split '{split}' of the dataset is empty; check data.dataset_name / data.{split}_split")
    for col in ("prompt", "chosen", "rejected", IMAGES):
        if col not in ds.column_names:
            raise DataError(f"split '{split}' has no column '{col}' (columns: {sorted(ds.column_names)}), which a "
                            f"vision preference dataset needs (TRL's format: prompt, chosen, rejected, images)")
    paths = _holds_paths(ds.features[IMAGES])
    drop = [c for c in ds.column_names if c != IMAGES or paths]
    fingerprint = content_hash("vision-normalise", _CODE_HASH, ds._fingerprint, split,
                               os.path.abspath(base_dir) if base_dir else None)
    return ds.map(normalise_vision_row, with_indices=True, remove_columns=drop, new_fingerprint=fingerprint,
                  fn_kwargs={"split": split, "base_dir": base_dir, "paths": paths}, desc=f"normalise {split} (vision)")


def _data_file(path: str, split: str) -> Optional[str]:
    if os.path.isfile(path):
        return path
    return next((os.path.join(path, split + ext) for ext in DATA_FILES
                 if os.path.isfile(os.path.join(path, split + ext))), None)


def load_vision_split(path: str, split: str = "train", cache_dir: Optional[str] = None):
    """A local vision split: the file `path`, or `path`/<split>.jsonl|.json|.parquet; images relative to it."""
    import datasets

    found = _data_file(path, split)
    if found is None:
        raise DataError(f"'{path}' has no {split}.jsonl/.json/.parquet; add it or fix data.dataset_name / the split")
    builder = DATA_FILES.get(os.path.splitext(found)[1].lower())
    if builder is None:
        raise DataError(f"dataset file '{found}' is not .jsonl, .json or .parquet; convert it or fix data.dataset_name")
    try:
        ds = datasets.load_dataset(builder, data_files={"train": [found]}, split="train", cache_dir=cache_dir)
    except Exception as e:  # a bad file ends the run with its name
        raise DataError(f"data file '{found}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    return normalise_vision_split(ds, split, os.path.dirname(os.path.abspath(found)))


def load_vision_splits(cfg: DataConfig, seed: int, cache_dir: Optional[str] = None):
    """The recipe's vision dataset: DatasetDict "train" (+ "eval": cfg.eval_split where the source has it,
    else a seeded cfg.eval_fraction of train), capped by max_train/eval_samples as the text path does.
    ``dataset_name``: a local folder or file (images relative to it), or a hub id (images as PIL)."""
    import datasets

    name = cfg.dataset_name
    local = next((p for p in (name, os.path.expanduser(name), os.path.join(REPO_ROOT, name)) if os.path.exists(p)),
                 None)
    splits = {}
    if local is not None:
        splits["train"] = load_vision_split(local, cfg.train_split, cache_dir)
        if cfg.eval_split and os.path.isdir(local) and _data_file(local, cfg.eval_split):
            splits["eval"] = load_vision_split(local, cfg.eval_split, cache_dir)
    else:
        try:
            loaded = datasets.load_dataset(name, cfg.dataset_config, cache_dir=cache_dir)
        except Exception as e:  # offline, unknown id: the run ends here
            raise DataError(f"dataset '{name}' is not a local path and loading it from the hub failed "
                            f"({type(e).__name__}); fix data.dataset_name") from None
        if cfg.train_split not in loaded:
            raise DataError(f"dataset '{name}' has splits {sorted(loaded)}, not '{cfg.train_split}'; "
                            "set data.train_split")
        for key, split in (("train", cfg.train_split), ("eval", cfg.eval_split)):
            if split and split in loaded:
                splits[key] = normalise_vision_split(loaded[split], split)
    if "eval" not in splits and cfg.eval_fraction > 0:
        carved = splits["train"].train_test_split(test_size=cfg.eval_fraction, seed=seed)
        splits["train"], splits["eval"] = carved["train"], carved["test"]
    for key, cap in (("train", cfg.max_train_samples), ("eval", cfg.max_eval_samples)):
        if cap is not None and key in splits and cap < len(splits[key]):
            if cap < 1:
                raise DataError(f"data.max_{key}_samples must be at least 1 (or null for all rows), got {cap}")
            splits[key] = splits[key].shuffle(seed=seed).select(range(cap))
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------- tokenising

def check_image_processor(processor, where: str) -> None:
    """Images need a processor with an image processor; a text model's tokenizer has none."""
    if getattr(processor, "image_processor", None) is None:
        raise DataError(f"{where} has images but the model's processor ({type(processor).__name__}) has no image "
                        f"processor: the model is text-only; use a vision-language model or data without images")


def image_token_ids(processor) -> set:
    """Ids of the tokens an image expands into that mark its span (the placeholder, begin / end markers)."""
    tok = processor.tokenizer
    ids = {getattr(processor, "image_token_id", None)}
    for attr in IMAGE_TOKEN_ATTRS:
        token = getattr(processor, attr, None) or getattr(tok, attr, None)
        if isinstance(token, str):
            found = tok.convert_tokens_to_ids(token)
            if isinstance(found, int) and found != tok.unk_token_id:
                ids.add(found)
    return {i for i in ids if isinstance(i, int)}


def open_image(value, where: str):
    """A PIL image of an images entry: a PIL image, a path, or datasets' undecoded {"bytes", "path"}."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    source = value.get("bytes") or value.get("path") if isinstance(value, dict) else value
    name = value.get("path") if isinstance(value, dict) else value
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except Exception as e:  # missing, truncated, not an image: name the file and the row
        raise DataError(f"{where}: image file '{name}' cannot be read ({type(e).__name__}: {e}); "
                        f"fix or remove that row") from None
    return image


def _encode(tok, text: str) -> list:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def process_prompt(processor, text: str, images: list) -> tuple:
    """(the processor's output, {image key: array}) of a prompt's template text and its images: the one call
    tokenisation, the collator and generation share, so that all three make the same image tensors."""
    enc = processor(text=[text], images=images or None, return_tensors="np", add_special_tokens=False)
    return enc, ({k: np.asarray(v) for k, v in enc.items() if k not in TEXT_KEYS} if images else {})


def encode_vision_prompt(processor, row: dict, i: int = 0, split: str = "train") -> tuple:
    """(prompt messages, chat-template text, prompt ids with image tokens, {token key: prompt values},
    {image key: array}) of row `i`: the prompt as training and generation both see it."""
    prompt = as_part_messages(row["prompt"], i, split, "prompt")
    text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    images = [open_image(v, f"row {i} of split '{split}'") for v in (row.get(IMAGES) or [])]
    enc, image_values = process_prompt(processor, text, images)
    prompt_ids = [int(t) for t in enc["input_ids"][0]]
    token_values = {k: [int(t) for t in enc[k][0]] for k in TOKEN_KEYS if k in enc}
    return prompt, text, prompt_ids, token_values, image_values


def tower_inputs(image_values: dict) -> tuple:
    """(tower inputs, one input's shape) of a pair's pixel array: the images or tiles the vision tower runs are
    every dim but the last three (channels x height x width), or the rows of a 2-dim array (patch rows)."""
    pixels = image_values.get("pixel_values")
    if pixels is None:
        return 0, np.zeros(0, dtype=np.int64)
    inner = 3 if pixels.ndim >= 4 else 1
    return int(np.prod(pixels.shape[:-inner])), np.asarray(pixels.shape[-inner:], dtype=np.int64)


def encode_vision_pair(processor, row: dict, i: int = 0, split: str = "train") -> tuple:
    """(prompt ids with image tokens, {token key: prompt values}, [chosen ids, rejected ids], {image key: array},
    the prompt's template text) of row `i` before truncation; each answer ends with exactly one EOS."""
    tok, where = processor.tokenizer, f"row {i} of split '{split}'"
    prompt, text, prompt_ids, token_values, image_values = encode_vision_prompt(processor, row, i, split)
    base = _encode(tok, text)
    answers = []
    for col in ("chosen", "rejected"):
        full = _encode(tok, processor.apply_chat_template(prompt + as_part_messages(row[col], i, split, col),
                                                          tokenize=False))
        if full[:len(base)] != base:
            raise DataError(f"{where}: the chat template of prompt+answer does not start with the tokens of the "
                            f"prompt with add_generation_prompt=True; this processor's template cannot be split "
                            f"into prompt and answer tokens")
        ids = full[len(base):]
        ends = [j for j, t in enumerate(ids) if t == tok.eos_token_id]
        answers.append(ids[:ends[-1] + 1] if ends else ids + [tok.eos_token_id])
    return prompt_ids, token_values, answers, image_values, text


def truncate_vision(prompt_ids: list, answers: list, max_length: int, max_prompt_length: int,
                    truncation_mode: str, image_ids: set) -> tuple:
    """(kept prompt positions or None when the image span cannot fit, answers, truncated?): the rule of the
    module docstring. Positions, not ids, so per-token processor outputs are cut alike."""
    keep = list(range(len(prompt_ids)))
    longest = max(len(a) for a in answers)
    if len(prompt_ids) + longest <= max_length:
        return keep, answers, False
    if len(prompt_ids) < max_length:
        return keep, [a[:max_length - len(prompt_ids)] for a in answers], True
    marked = [j for j, t in enumerate(prompt_ids) if t in image_ids]
    span = (marked[0], marked[-1] + 1) if marked else (0, 0)
    target = min(max(max_prompt_length, span[1] - span[0]), max_length - 1)
    cuttable = [j for j in keep if not span[0] <= j < span[1]]
    excess = len(prompt_ids) - target
    if excess > len(cuttable):
        return None, answers, True
    cut = set(cuttable[:excess] if truncation_mode == "keep_end" else cuttable[len(cuttable) - excess:])
    keep = [j for j in keep if j not in cut]
    return keep, [a[:max_length - len(keep)] for a in answers], True


def tokenize_vision_row(row: dict, i: int, processor, max_length: int, max_prompt_length: int,
                        truncation_mode: str, image_ids: list, split: str) -> dict:
    """One normalised row -> token columns, the prompt's template text, its tower inputs (count and shape; the
    image arrays themselves are dropped), helper columns for the statistics. Dropped (as the text path): the
    image span does not fit, an answer is left empty, or the answers are identical after truncation.
    Picklable for datasets.map."""
    prompt_ids, token_values, answers, image_values, text = encode_vision_pair(processor, row, i, split)
    raw_length = len(prompt_ids) + max(len(a) for a in answers)
    keep, answers, truncated = truncate_vision(prompt_ids, answers, max_length, max_prompt_length,
                                               truncation_mode, set(image_ids))
    dropped = keep is None or any(len(a) == 0 for a in answers) or answers[0] == answers[1]
    keep = keep or []
    prompt = [prompt_ids[j] for j in keep]
    out = {"prompt_length": len(prompt), "source_idx": i, "_raw_length": raw_length,
           "_status": STATUS_DROPPED if dropped else STATUS_TRUNCATED if truncated else STATUS_KEPT}
    for side, ids in zip(("chosen", "rejected"), answers):
        out[f"{side}_input_ids"] = prompt + ids
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + ids
        out[f"{side}_length"] = len(prompt) + len(ids)
        for key, values in token_values.items():
            out[f"{side}_{key}"] = [values[j] for j in keep] + [0] * len(ids)
    out[TOWER_INPUTS], out[TOWER_SHAPE] = tower_inputs(image_values)  # an int64 array even when empty
    out[PROMPT_TEXT] = text
    return out


def processor_fingerprint(processor) -> str:
    """A hash of what decides a processor's output: its tokenizer, image processor settings, chat template."""
    image_processor = getattr(processor, "image_processor", None)
    return content_hash(type(processor).__name__, tokenizer_fingerprint(processor.tokenizer),
                        image_processor.to_json_string() if image_processor is not None else None,
                        getattr(processor, "chat_template", None))


def _percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    q = np.percentile(values, [50, 90, 99], method="higher")
    return {"p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(values.max())}


def split_stats(helpers: dict) -> dict:
    """The text path's statistics: pairs, kept, truncated, dropped, length percentiles, raw_max."""
    status = helpers["_status"]
    kept = status != STATUS_DROPPED
    return {"pairs": int(status.size), "kept": int(kept.sum()), "truncated": int((status == STATUS_TRUNCATED).sum()),
            "dropped": int((~kept).sum()), "chosen_len": _percentiles(helpers["chosen_length"][kept]),
            "rejected_len": _percentiles(helpers["rejected_length"][kept]),
            "raw_max": int(helpers["_raw_length"].max()) if status.size else 0}


def keep_row(status: int) -> bool:
    return status != STATUS_DROPPED


def tokenize_vision_splits(splits, processor, cfg: DataConfig) -> tuple:
    """Tokenise normalised splits (vision rows, or text pairs) with a processor: (DatasetDict, {split: stats}).

    Row columns: chosen/rejected _input_ids and _labels, prompt_length, source_idx, idx (as the text path),
    chosen/rejected _token_type_ids where the processor gives them, prompt_text, tower_inputs and
    tower_input_shape, and the split's own images column where it has one (paths or encoded images, as
    stored; no pixel arrays: `VisionPreferenceCollator` makes them). Cached like the text path: the
    fingerprint covers the split, the processor (`processor_fingerprint`), the truncation settings and this
    module's source.
    """
    import datasets

    for key, ds in splits.items():
        if is_vision_dataset(ds):
            check_image_processor(processor, f"split '{key}'")
        if "rejected" not in ds.column_names or "label" in ds.column_names:
            raise DataError(f"split '{key}' is not preference pairs (prompt, chosen, rejected); the vision path "
                            f"trains pairs only")
    if getattr(processor, "tokenizer", None) is None or processor.tokenizer.eos_token_id is None:
        raise DataError("the model's processor has no tokenizer with an EOS token; load it with AutoProcessor")
    image_ids = sorted(image_token_ids(processor)) if getattr(processor, "image_processor", None) else []
    settings = (cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode)
    out, stats = {}, {}
    for key, ds in splits.items():
        fn_kwargs = dict(processor=processor, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         truncation_mode=cfg.truncation_mode, image_ids=image_ids, split=key)
        drop = [c for c in ds.column_names if c != IMAGES]  # the images stay as stored, for the collator
        mapped = ds.map(tokenize_vision_row, with_indices=True, remove_columns=drop, num_proc=cfg.num_proc,
                        fn_kwargs=fn_kwargs, writer_batch_size=WRITER_BATCH,
                        new_fingerprint=content_hash("vision-tokenize", _CODE_HASH, ds._fingerprint,
                                                     processor_fingerprint(processor), settings),
                        desc=f"tokenize {key} (vision)")
        helpers = mapped.select_columns(list(HELPERS)).with_format("numpy")[:]
        stats[key] = split_stats(helpers)
        if stats[key]["kept"] == 0:
            raise DataError(f"every pair of split '{key}' was dropped by truncation; raise data.max_length "
                            f"(now {cfg.max_length}) or data.max_prompt_length (now {cfg.max_prompt_length})")
        if stats[key]["dropped"]:
            mapped = mapped.filter(keep_row, input_columns="_status",
                                   new_fingerprint=content_hash("vision-drop", mapped._fingerprint))
        mapped = mapped.remove_columns(list(HELPERS))
        out[key] = mapped.add_column("idx", np.arange(len(mapped), dtype=np.int64),
                                     new_fingerprint=content_hash("vision-idx", mapped._fingerprint))
    return datasets.DatasetDict(out), stats


# ----------------------------------------------------------------------------------------- batching

def as_tensor(value) -> torch.Tensor:
    """An image array as a tensor: floats float32, integers int64, masks bool."""
    array = np.asarray(value)
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(array.astype(np.int64))


def concat_padded(tensors: list) -> torch.Tensor:
    """Tensors joined along dim 0; trailing dims zero-padded to the largest (as a processor pads a batch)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            grown = torch.zeros((t.shape[0], *shape), dtype=t.dtype)
            grown[tuple(slice(0, n) for n in t.shape)] = t
            t = grown
        padded.append(t)
    return torch.cat(padded, dim=0)


def pair_image_tensors(processor, row: dict) -> dict:
    """{image key: tensor} of one tokenised pair: its images through `process_prompt` with its prompt text, the
    call tokenisation made, so the tensors are the ones its token ids were expanded for."""
    where = f"pair {row.get('idx')} of a batch"
    images = [open_image(v, where) for v in row[IMAGES]]
    return {key: as_tensor(value) for key, value in process_prompt(processor, row[PROMPT_TEXT], images)[1].items()}


class VisionPreferenceCollator:
    """Rows of `tokenize_vision_splits` -> one batch, the module docstring's contract: text keys right-padded
    by the text path's `PreferenceCollator`, token type ids padded with 0 to the same widths, image tensors
    made by `processor` from each pair's images (`pair_image_tensors`) and concatenated in pair order. Rows
    without images need no processor."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None, processor=None):
        self.text = PreferenceCollator(pad_token_id, pad_to_multiple_of)
        self.processor = processor

    def __call__(self, rows: list) -> dict:
        batch = self.text(rows)
        for side in ("chosen", "rejected"):
            width = batch[f"{side}_input_ids"].shape[1]
            for key in TOKEN_KEYS:
                name = f"{side}_{key}"
                if name in rows[0]:
                    values = torch.zeros((len(rows), width), dtype=torch.long)
                    for b, r in enumerate(rows):
                        values[b, :len(r[name])] = torch.as_tensor(r[name], dtype=torch.long)
                    batch[name] = values
        batch.update(self.image_tensors(rows))
        return batch

    def image_tensors(self, rows: list) -> dict:
        """Each pair's image tensors once, joined per key in pair order ({} when no pair has an image)."""
        with_images = [r for r in rows if r.get(IMAGES)]
        if with_images and self.processor is None:
            raise DataError("these rows have images but VisionPreferenceCollator was given no processor; pass "
                            "processor= (the model's processor, which makes the image tensors)")
        pairs = [pair_image_tensors(self.processor, r) for r in with_images]
        return {key: concat_padded([p[key] for p in pairs if key in p])
                for key in sorted({k for p in pairs for k in p})}
