"""Tokenisation of normalised preference rows, cached by `datasets`: chat template, BOS / EOS, truncation,
the kept / truncated / dropped counts per split (and per source of a mixture).

Tokenisation rule (documented behaviour): a message prompt goes through the tokenizer's chat
template (add_generation_prompt=True); a plain-string prompt is wrapped as one user message and its
answer as the assistant message whenever the tokenizer has a chat template, so an instruct model
sees its own template; HH transcripts and tokenizers without a chat template use raw text: prompt
tokens (+ the tokenizer's BOS if it adds one) + answer tokens + EOS. Every answer ends with exactly
one ``tokenizer.eos_token``; what a template appends after it (SmolLM2: "\\n") is cut.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np

from dpo_accel.config.schema import DataConfig
from dpo_accel.data.formats import DataError, MixtureDict, content_hash, index_digest, is_transcript
from dpo_accel.model.logps import IGNORE_INDEX

STATUS_KEPT, STATUS_TRUNCATED, STATUS_DROPPED = 0, 1, 2
_HELPER_COLUMNS = ("_status", "_raw_length", "chosen_length", "rejected_length")



# ---------------------------------------------------------------------------------- tokenising

def prepended_bos(tokenizer) -> Optional[int]:
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
    return content_hash(type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
                 hashlib.sha256(body.encode()).hexdigest(), getattr(tokenizer, "chat_template", None),
                 tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, prepended_bos(tokenizer))


def _as_messages(prompt, tokenizer) -> Optional[list]:
    """The prompt as chat messages when it goes through the chat template, else None (raw text)."""
    if isinstance(prompt, list):
        return prompt
    if getattr(tokenizer, "chat_template", None) and not is_transcript(prompt):
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
    bos = prepended_bos(tokenizer)
    ids = _encode_text(tokenizer, prompt)
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def encode_example(tokenizer, prompt, answers: list, where: str = "a row", auto_bos: Optional[int] = -1) -> tuple:
    """(prompt ids, [answer ids, ...]) of one row, before truncation; each answer ends with one EOS.

    Chat template: the answer is the template of prompt+answer minus the template of the prompt with
    add_generation_prompt=True; the prompt's ids must be a prefix of the full ids (DataError
    otherwise), and whatever follows the answer's last EOS is cut. Raw text: prompt ids (+ BOS) and
    answer ids + EOS. `where` names the row in errors; `auto_bos`: precomputed `prepended_bos(tokenizer)`
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
    bos = prepended_bos(tokenizer) if auto_bos == -1 else auto_bos
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


def truncate_unpaired(prompt_ids: list, completion: list, kl_completion: list, max_length: int,
                      max_prompt_length: int, truncation_mode: str) -> tuple:
    """(prompt ids, completion, KL completion, truncated?) of a KTO row, the row cut by its own length alone.

    The row (prompt + its completion) is cut by `truncate`'s rule as if it had no partner, so what it
    trains on never depends on its random KL partner. The KL sequence keeps that same prompt (so both
    sides share it: `prompt_length` holds for both and prefix sharing runs it once) and its completion is
    cut to the room left after it (keeping its start). `truncated` says whether the row's own sequence
    was cut; cutting the KL completion is part of the rule, not a loss of training data. The KL
    completion keeps at least one token whenever the row's completion does.
    """
    prompt_ids, (completion,), truncated = truncate(prompt_ids, [completion], max_length, max_prompt_length,
                                                    truncation_mode)
    return prompt_ids, completion, kl_completion[:max(max_length - len(prompt_ids), 0)], truncated


def tokenize_row(row: dict, i: int, tokenizer, max_length: int, max_prompt_length: int, truncation_mode: str,
                  paired: bool, auto_bos: Optional[int], split: str) -> dict:
    """One normalised row -> token columns + helper columns for the statistics. Picklable for datasets.map.

    Drop rule: a pair is dropped when after truncation an answer has no token left, or (paired) the
    chosen and rejected answer tokens are identical (their difference was cut off, or the data has the
    same answer twice): such a pair carries no preference signal. A KTO row (it has a ``label``; its
    rejected side is its KL completion) is truncated by `truncate_unpaired` and dropped only when its
    completion has no token left: neither its cut nor its fate depends on its partner; its statistics
    (truncated, raw length) are those of its own prompt + completion.
    """
    unpaired = paired and "label" in row
    answers = [row["chosen"], row["rejected"]] if paired else [row["chosen"]]
    if paired and row.get("prompt_ids") is not None:  # sampled ids (an iterative round's pairs): taken as they are
        prompt_ids, answer_ids = list(row["prompt_ids"]), [list(row["chosen_ids"]), list(row["rejected_ids"])]
    else:
        prompt_ids, answer_ids = encode_example(tokenizer, row["prompt"], answers, f"row {i} of split '{split}'",
                                                auto_bos)
    if unpaired:
        raw_length = len(prompt_ids) + len(answer_ids[0])
        prompt_ids, completion, kl, truncated = truncate_unpaired(prompt_ids, *answer_ids, max_length,
                                                                  max_prompt_length, truncation_mode)
        answer_ids = [completion, kl]
        dropped = any(len(a) == 0 for a in answer_ids)
    else:
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
    if unpaired:  # chosen is the completion, rejected its mismatched KL completion
        out["label"] = bool(row["label"])
    return out


def keep_row(status: int) -> bool:
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
    dropped pairs are removed). Truncation and the drop rule: `truncate` and `tokenize_row`.

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
    tok = (tokenizer, tokenizer_fingerprint(tokenizer), prepended_bos(tokenizer))
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
    """datasets.map of `tokenize_row` over one split, fingerprinted by its inputs (so cached)."""
    tokenizer, tok_hash, auto_bos = tok
    settings = (cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode)
    return ds.map(
        tokenize_row, with_indices=True, remove_columns=ds.column_names, num_proc=cfg.num_proc,
        fn_kwargs=dict(tokenizer=tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                       truncation_mode=cfg.truncation_mode, paired="rejected" in ds.column_names,
                       auto_bos=auto_bos, split=key),
        new_fingerprint=content_hash("tokenize", ds._fingerprint, tok_hash, settings), desc=f"tokenize {key}")


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
        mapped = mapped.filter(keep_row, input_columns="_status", new_fingerprint=content_hash("drop", mapped._fingerprint))
    mapped = mapped.remove_columns(list(_HELPER_COLUMNS))
    return mapped.add_column("idx", np.arange(len(mapped), dtype=np.int64),
                             new_fingerprint=content_hash("idx", mapped._fingerprint))


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
        mapped = whole.select(order, new_fingerprint=content_hash("mix-tokenized", fps, key, index_digest(order)))
        mapped = mapped.remove_columns(["source_idx"])  # the row in this split (as load_preference_splits gave it)
        mapped = mapped.add_column("source_idx", np.arange(len(order), dtype=np.int64),
                                   new_fingerprint=content_hash("mix-source-idx", mapped._fingerprint))
        out[key] = _finish_split(mapped, h["_status"], key, cfg, stats[key]["kept"])
    return datasets.DatasetDict(out), stats


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
