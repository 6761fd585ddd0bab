"""Dataset mixtures (data.dataset_mixture, the alignment-handbook's block) on the real SmolLM2 tokenizer.

Proves: two sources in different formats mixed 0.75/0.25 give training rows in those proportions
(counted), the same rows for a seed and others for another seed, and a held-out carve of
test_split_size from the mixture; the train and held-out rows are row for row those of datasets' own
calls as the handbook makes them (shuffle + select per source, concatenate + shuffle, train_test_split;
the older dataset_mixer form: each source's first rows, test splits shuffled); text and message sources meet in one column type (single-turn
conversations as strings with the same tokens, otherwise text lifted to messages, HH parsed into
turns); `rows` repeats a source; column mappings; per-source stats and shares in the start-up
table; each source's tokenisation is cached apart; a bad row names its file, row and column; the
recipe rejects a mistyped mixture key with a did-you-mean; the shipped chat dataset regenerates
byte-identically and the shipped mixture recipe trains end to end on a tiny model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest

from conftest import REPO, tiny_overrides
from dpo_accel.data import tokenize as data_tokenize
from dpo_accel.data.formats import DataError, load_preference_splits
from dpo_accel.data.tokenize import format_stats, tokenize_splits
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe
from dpo_accel.config.schema import DataConfig

datasets.disable_progress_bars()
HH = "\n\nHuman: {q}\n\nAssistant:"


@pytest.fixture(scope="module")
def tok(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def hh_rows(n: int) -> list:
    return [{"chosen": HH.format(q=f"hh {i}?") + f" yes {i}", "rejected": HH.format(q=f"hh {i}?") + " no"}
            for i in range(n)]


def chat_rows(n: int, system: bool = False) -> list:
    head = [{"role": "system", "content": "Be brief."}] if system else []
    return [{"prompt": head + [{"role": "user", "content": f"chat {i}?"}],
             "chosen": [{"role": "assistant", "content": f"fine {i}"}],
             "rejected": [{"role": "assistant", "content": "meh"}]} for i in range(n)]


def explicit_rows(n: int) -> list:
    return [{"prompt": f"chat {i}?", "chosen": f"fine {i}", "rejected": "meh"} for i in range(n)]


def mixture(tmp_path, sources: list, **extra) -> DataConfig:
    return DataConfig(dataset_mixture={"datasets": sources, **extra}, max_length=64, max_prompt_length=48)


def load(tmp_path, cfg, seed=0):
    return load_preference_splits(cfg, seed, cache_dir=str(tmp_path / "cache"))


def origin(row) -> str:
    """Which source a normalised row came from (the prompts say it)."""
    text = row["prompt"] if isinstance(row["prompt"], str) else " ".join(m["content"] for m in row["prompt"])
    return "hh" if "hh " in text else "chat"


def test_weights_are_counted_seeded_and_eval_is_carved(tmp_path):
    hh = write_jsonl(tmp_path / "hh" / "train.jsonl", hh_rows(200))
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(200, system=True))  # multi-message prompt: no lowering
    cfg = mixture(tmp_path, [{"id": hh, "weight": 0.75}, {"id": chat, "weight": 0.25, "format": "conversational"}],
                  seed=3, test_split_size=0.1)
    a, b = load(tmp_path, cfg), load(tmp_path, cfg)
    n_train, n_eval = len(a["train"]), len(a["eval"])
    assert (n_train, n_eval) == (180, 20)  # 150 + 50 mixed, ceil(0.1 x 200) held out
    counted = [origin(r) for split in ("train", "eval") for r in a[split]]
    assert (counted.count("hh"), counted.count("chat")) == (150, 50)  # the weights, counted over the mixture
    train_share = [origin(r) for r in a["train"]].count("hh") / n_train
    assert abs(train_share - 0.75) < 0.05
    assert a["train"][:] == b["train"][:] and a["eval"][:] == b["eval"][:]  # deterministic for the seed
    prompts = lambda split: [json.dumps(p) for p in split["prompt"]]  # noqa: E731
    assert not set(prompts(a["train"])) & set(prompts(a["eval"]))
    other = load(tmp_path, mixture(tmp_path, [{"id": hh, "weight": 0.75},
                                              {"id": chat, "weight": 0.25, "format": "conversational"}],
                                   seed=4, test_split_size=0.1))
    assert prompts(other["train"]) != prompts(a["train"])  # the mixture's seed reaches sampling and order
    # HH text met conversational messages: the transcripts were parsed into user/assistant turns.
    hh_row = next(r for r in a["train"] if origin(r) == "hh")
    i = hh_row["prompt"][0]["content"].split()[1].rstrip("?")
    assert hh_row["prompt"] == [{"role": "user", "content": f"hh {i}?"}]
    assert hh_row["chosen"] == [{"role": "assistant", "content": f"yes {i}"}]
    # Held out as a number of rows, and a recipe's train.seed used when the mixture has none.
    rows = load(tmp_path, mixture(tmp_path, [{"id": hh, "weight": 0.75}, {"id": chat, "weight": 0.25}],
                                  test_split_size=30))
    assert (len(rows["train"]), len(rows["eval"])) == (170, 30)


def tagged_rows(tag: str, n: int) -> list:
    return [{"prompt": f"{tag} {i}?", "chosen": f"{tag} yes {i}", "rejected": f"{tag} no {i}"} for i in range(n)]


def read_rows(tmp_path, path: str):
    return datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "expected"))


@pytest.mark.parametrize("weights, test_size, sizes", [((0.6, None), 0.25, (30, 17)), ((None, None), 0.28, (10, 15)),
                                                       ((0.5, 0.9), 7, (20, 11))])
def test_the_carve_is_datasets_train_test_split_of_the_handbooks_mixture(tmp_path, weights, test_size, sizes):
    files = [write_jsonl(tmp_path / f"{tag}.jsonl", tagged_rows(tag, n)) for tag, n in zip("ab", sizes)]
    sources = [{"id": f, **({"weight": w} if w is not None else {})} for f, w in zip(files, weights)]
    ours = load(tmp_path, mixture(tmp_path, sources, seed=5, test_split_size=test_size))
    # The handbook's get_dataset, with datasets' own calls on the same sources:
    parts = [read_rows(tmp_path, f) for f in files]
    parts = [ds if w is None else ds.shuffle(seed=5).select(range(int(len(ds) * w))) for ds, w in zip(parts, weights)]
    expected = datasets.concatenate_datasets(parts).shuffle(seed=5).train_test_split(test_size=test_size, seed=5)
    assert ours["train"][:] == expected["train"][:]  # row for row, in the same order
    assert ours["eval"][:] == expected["test"][:]
    if test_size == 0.28:  # 0.28 * 25 is 7.000000000000001 in floating point: datasets holds out 8
        assert len(ours["eval"]) == 8


def test_the_older_dataset_mixer_form_keeps_each_sources_first_rows(tmp_path):
    for tag, n, m in (("a", 20, 5), ("b", 10, 4)):
        write_jsonl(tmp_path / tag / "train.jsonl", tagged_rows(tag, n))
        write_jsonl(tmp_path / tag / "test.jsonl", tagged_rows(tag + "-test", m))
    sources = [{"id": str(tmp_path / "a"), "weight": 0.55, "eval_split": "test"},
               {"id": str(tmp_path / "b"), "eval_split": "test"}]
    ours = load(tmp_path, mixture(tmp_path, sources, seed=42, form="dataset_mixer"))
    # The older handbook's mix_datasets: select(range(int(frac * len))), concatenate, shuffle(seed=42);
    # the test splits whole, concatenated and shuffled(seed=42).
    train = [read_rows(tmp_path, str(tmp_path / tag / "train.jsonl")) for tag in "ab"]
    test = [read_rows(tmp_path, str(tmp_path / tag / "test.jsonl")) for tag in "ab"]
    train[0] = train[0].select(range(int(0.55 * len(train[0]))))
    assert ours["train"][:] == datasets.concatenate_datasets(train).shuffle(seed=42)[:]
    assert ours["eval"][:] == datasets.concatenate_datasets(test).shuffle(seed=42)[:]
    assert sorted(ours["train"]["prompt"])[:11] == sorted(f"a {i}?" for i in range(11))  # a's first 11 rows
    with pytest.raises(RecipeError, match="form is 'mixer'; choose one of: dataset_mixture, dataset_mixer"):
        load_recipe(None, ['data.dataset_mixture={"datasets": ["a"], "form": "mixer"}'])


def test_single_turn_chat_meets_text_as_text_with_the_same_tokens(tmp_path, tok):
    chat = write_jsonl(tmp_path / "c.jsonl", chat_rows(6))
    plain = write_jsonl(tmp_path / "e.jsonl", explicit_rows(6))
    cfg = mixture(tmp_path, [{"id": plain, "rows": 9}, {"id": chat}])
    splits = load(tmp_path, cfg)
    assert all(isinstance(p, str) for p in splits["train"]["prompt"])
    assert len(splits["train"]) == 15 and splits.specs == ["rows 9", "all rows"]
    mixed, stats = tokenize_splits(splits, tok, cfg)
    alone, _ = tokenize_splits(load_preference_splits(DataConfig(dataset_name=chat), 0, str(tmp_path / "c2")), tok,
                               cfg)
    by_prompt = {}
    for row in mixed["train"]:
        by_prompt.setdefault(tuple(row["chosen_input_ids"]), 0)
        by_prompt[tuple(row["chosen_input_ids"])] += 1
    for row in alone["train"]:  # a conversation lowered to strings tokenises exactly as the conversation
        assert by_prompt[tuple(row["chosen_input_ids"])] >= 2  # once from each source (9 rows: 6 + 3 repeated)
    src = stats["train"]["sources"]
    assert [s["kept"] for s in src.values()] == [9, 6] and abs(sum(s["share"] for s in src.values()) - 1) < 1e-9
    table = format_stats(stats)
    assert "60.0% of train" in table and "40.0% of train" in table and "(rows 9)" in table
    assert mixed["train"]["idx"] == list(range(15)) and mixed["train"]["source_idx"] == list(range(15))
    # source_idx points at the same row of the normalised mixture that load_preference_splits returned
    row = mixed["train"][4]
    assert tok.decode(row["chosen_input_ids"][row["prompt_length"]:]) == \
        splits["train"][row["source_idx"]]["chosen"] + "<|im_end|>"


def test_each_source_is_tokenised_and_cached_apart(tmp_path, tok, monkeypatch):
    hh = write_jsonl(tmp_path / "hh.jsonl", hh_rows(20))
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20, system=True))
    first = mixture(tmp_path, [{"id": hh, "weight": 0.5}, {"id": chat, "weight": 0.5}], seed=1)
    tokenize_splits(load(tmp_path, first), tok, first)
    seen = []
    real = data_tokenize.tokenize_row

    def counting(row, i, **kwargs):
        seen.append(kwargs["split"])
        return real(row, i, **kwargs)

    monkeypatch.setattr(data_tokenize, "tokenize_row", counting)
    second = mixture(tmp_path, [{"id": hh, "weight": 0.5}, {"id": chat, "weight": 1.0}], seed=1)
    tokenized, stats = tokenize_splits(load(tmp_path, second), tok, second)
    assert set(seen) == {chat} and len(seen) == 20  # only the source whose weight changed was tokenised
    assert len(tokenized["train"]) == 30 and stats["train"]["sources"][hh]["kept"] == 10


def test_columns_errors_and_recipe_checks(tmp_path):
    renamed = write_jsonl(tmp_path / "q.jsonl", [{"question": f"q{i}", "good": f"g{i}", "bad": "b", "x": 1}
                                                 for i in range(4)])
    cfg = mixture(tmp_path, [{"id": renamed, "columns": {"question": "prompt", "good": "chosen", "bad": "rejected"}}])
    assert load(tmp_path, cfg)["train"][0].keys() == {"prompt", "chosen", "rejected"}
    with pytest.raises(DataError, match=r"'.*q.jsonl' has no column 'answer'.*datasets\[0\].columns"):
        load(tmp_path, mixture(tmp_path, [{"id": renamed, "columns": {"answer": "prompt"}}]))
    bad = write_jsonl(tmp_path / "bad.jsonl", explicit_rows(3) + [{"prompt": "p", "chosen": " ", "rejected": "r"}])
    with pytest.raises(DataError) as e:
        load(tmp_path, mixture(tmp_path, [{"id": renamed, "columns": {"question": "prompt", "good": "chosen",
                                                                       "bad": "rejected"}}, {"id": bad}]))
    assert str(e.value).startswith(f"row 3 of split '{bad}': column 'chosen' is empty")  # file, row, column
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="mixes single-answer"):
        load(tmp_path, mixture(tmp_path, [{"id": write_jsonl(tmp_path / "ok.jsonl", explicit_rows(2))}, {"id": sft}]))
    with pytest.raises(DataError, match=r"datasets\[0\].id"):
        load(tmp_path, mixture(tmp_path, [{"id": "./missing.jsonl"}]))

    def recipe_error(mix) -> str:
        with pytest.raises(RecipeError) as e:
            load_recipe(None, [f"data.dataset_mixture={json.dumps(mix)}"])
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "did you mean 'weight'" in recipe_error({"datasets": [{"id": "a", "wieght": 0.5}]})
    assert "did you mean 'test_split_size'" in recipe_error({"datasets": ["a"], "test_split": 0.1})
    assert "(0, 1]" in recipe_error({"datasets": [{"id": "a", "weight": 1.5}]})
    assert "both 'weight' and 'rows'" in recipe_error({"datasets": [{"id": "a", "weight": 0.5, "rows": 3}]})
    assert "test_split_size" in recipe_error({"datasets": ["a"], "test_split_size": -1})
    with pytest.raises(RecipeError, match="test_split_size"):
        load_recipe(None, ['data.dataset_mixture={"datasets": ["a"]}', "data.eval_fraction=0.1"])


def test_shipped_chat_dataset_regenerates_byte_identically(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_arith_chat_dataset.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    shipped = Path(REPO, "data", "arith_chat", "train.jsonl").read_bytes()
    assert (tmp_path / "train.jsonl").read_bytes() == shipped
    from dpo_accel.data.tasks.arith import operands

    evals = {tuple(sorted(operands(json.loads(line)["prompt"])))
             for line in Path(REPO, "data", "arith_prefs", "eval.jsonl").read_text().splitlines()}
    rows = [json.loads(line) for line in shipped.decode().splitlines()]
    assert len(rows) == 2000 and not {tuple(sorted(operands(r["chosen"][0]["content"]))) for r in rows} & evals


def test_shipped_mixture_recipe_trains_on_a_tiny_model(tiny_model_dir, tmp_path):
    from dpo_accel import train

    recipe_path = os.path.join(REPO, "recipes", "smollm2_arith_mixture.yaml")
    overrides = [o for o in tiny_overrides(tiny_model_dir, str(tmp_path / "run"))
                 if not o.startswith(("data.dataset_name", "data.max_train_samples"))]
    recipe = load_recipe(recipe_path, overrides)
    mix = recipe.data.dataset_mixture["datasets"]
    assert [(s["id"], s["weight"]) for s in mix] == [("data/arith_prefs", 0.75), ("data/arith_chat", 0.25)]
    summary = train.run(recipe)
    sources = summary["data"]["train"]["sources"]
    assert [round(s["share"], 3) for s in sources.values()] == [0.75, 0.25]
    assert summary["data"]["eval"]["kept"] == 8 and summary["global_step"] == 4
    assert np.isfinite(summary["eval"]["eval/loss"])
