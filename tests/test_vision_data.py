"""dpo_accel.data.vision, the shapes task and the tiny offline VLM (dpo_accel/model/tiny_vlm.py).

Proves: TRL's vision format loads with PIL images and with paths relative to the JSONL file; tokenisation
expands each image placeholder into the model's 16 image tokens, puts labels on the answers only and caches
each pair's images (not pixel tensors: the shapes task's cache stays small) with its tower inputs; truncation
cuts answers first, then prompt text outside the image span, never an image token, and drops and counts pairs
that cannot fit; the collator's shapes (token type ids, image tensors padded and concatenated in pair order)
and its image tensors, bit for bit the processor's own for those pairs' images (the tiny LLaVA, and Idefics3
whose tile counts differ between pairs); each bad input stops with one line; text pairs train on a VLM;
the shipped shapes data regenerates byte-identically and its chosen answers score right, its rejected ones not;
the tiny VLM loads with the auto classes, holds SmolLM2's weights and gives a finite loss on a collated batch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import DataConfig
from dpo_accel.data.formats import DataError
from dpo_accel.data.tasks import shapes
from dpo_accel.data.tokenize import format_stats
from dpo_accel.data.vision import (VisionPreferenceCollator, concat_padded, encode_vision_pair, is_vision_dataset,
                                   load_vision_split, load_vision_splits, normalise_vision_split, open_image,
                                   tokenize_vision_splits, truncate_vision)
from dpo_accel.evaluation.scorers import behaviour_scores

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "shapes_prefs"
IMAGE_TOKENS = 16
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def vlm_dir(smol_dir) -> str:
    from dpo_accel.model.loading import resolve_model_path
    from dpo_accel.model.tiny_vlm import TINY_VLM_ALIAS

    return resolve_model_path(TINY_VLM_ALIAS)


@pytest.fixture(scope="module")
def processor(vlm_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vlm_dir)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"max_length": 128, "max_prompt_length": 64, **kw})


def user(*parts) -> list:
    return [{"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                         for p in parts]}]


def picture(colour: str) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


def write_rows(folder: Path, rows: list, name: str = "train.jsonl") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / name)


def pil_split(rows: list):
    """An in-memory vision split: images as datasets' Image feature (PIL images), as a hub dataset has them."""
    return normalise_vision_split(datasets.Dataset.from_list(rows), "train")


@pytest.fixture(scope="module")
def shipped_rows(tmp_path_factory):
    """The first rows of the shipped shapes train split, loaded as a recipe loads them (paths resolved)."""
    folder = tmp_path_factory.mktemp("shapes")
    with open(SHIPPED / "train.jsonl") as f:
        (folder / "train.jsonl").write_text("".join(next(f) for _ in range(8)))
    os.symlink(SHIPPED / "images", folder / "images")
    return load_vision_split(str(folder), "train", cache_dir=str(folder / "cache"))


def shipped(n: int, rows, processor, **kw):
    return tokenize_vision_splits({"train": rows.select(range(n))}, processor, cfg(**kw))


# ------------------------------------------------------------------------------------------ loading

def test_paths_resolve_against_the_jsonl_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "pics").mkdir(parents=True)
    picture("red").save(folder / "pics" / "a.png")
    path = write_rows(folder, [{"prompt": user(None, "Colour?"), "chosen": "Red.", "rejected": "Blue.",
                                "images": ["pics/a.png"]}])
    ds = load_vision_split(path, cache_dir=str(tmp_path / "cache"))
    assert is_vision_dataset(ds)
    row = ds[0]
    assert row["images"] == [str(folder / "pics" / "a.png")]
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": "Colour?"}]}]
    assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    # the folder form with a held-out split, as a recipe names it
    write_rows(folder, [{"prompt": user(None, "Colour?"), "chosen": "Red.", "rejected": "Green.",
                         "images": ["pics/a.png"]}], "test.jsonl")
    both = load_vision_splits(DataConfig(dataset_name=str(folder), eval_split="test"), seed=0,
                              cache_dir=str(tmp_path / "cache"))
    assert sorted(both) == ["eval", "train"] and both["eval"][0]["chosen"][0]["content"][0]["text"] == "Red."


def test_pil_images_load_and_tokenise(processor):
    ds = pil_split([{"prompt": user(None, "What colour?"), "chosen": "Red.", "rejected": "Blue.",
                     "images": [picture("red")]}])
    assert isinstance(ds[0]["images"][0], Image.Image)
    tokenized, stats = tokenize_vision_splits({"train": ds}, processor, cfg())
    row = tokenized["train"][0]
    assert stats["train"]["kept"] == 1 and row["chosen_input_ids"].count(processor.image_token_id) == IMAGE_TOKENS
    assert isinstance(row["images"][0], Image.Image) and "pixel_values" not in row  # the image, not its tensors
    assert (row["tower_inputs"], row["tower_input_shape"]) == (1, [3, 32, 32])


# ---------------------------------------------------------------------------------------- tokenising

def test_placeholders_expand_labels_on_answers_images_once(processor, shipped_rows):
    tokenized, stats = shipped(6, shipped_rows, processor)
    assert stats["train"] == {**stats["train"], "pairs": 6, "kept": 6, "truncated": 0, "dropped": 0}
    tok = processor.tokenizer
    for row in tokenized["train"]:
        n = row["prompt_length"]
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            assert ids[:n] == row["chosen_input_ids"][:n]  # one prompt for both sides
            assert ids.count(processor.image_token_id) == IMAGE_TOKENS
            assert labels[:n] == [-100] * n and labels[n:] == ids[n:] and ids[-1] == tok.eos_token_id
            assert processor.image_token_id not in ids[n:]
        assert row["tower_inputs"] == 1 and len(row["images"]) == 1  # once per pair, not per side
    assert not any("pixel" in c for c in tokenized["train"].column_names)
    answer = tok.decode(tokenized["train"][0]["chosen_input_ids"][tokenized["train"][0]["prompt_length"]:])
    assert answer == shapes.answer_text(shipped_rows[0]["chosen"]) + tok.eos_token


def test_two_images_in_one_prompt(processor):
    row = {"prompt": user(None, "and", None, "Same colour?"), "chosen": "No.", "rejected": "Yes.",
           "images": [picture("red"), picture("blue")]}
    prompt_ids, token_values, answers, images, _ = encode_vision_pair(processor, pil_split([row])[0])
    assert prompt_ids.count(processor.image_token_id) == 2 * IMAGE_TOKENS and token_values == {}
    assert images["pixel_values"].shape == (2, 3, 32, 32)
    assert images["pixel_values"][0, 0, 0, 0] > 0.5 and images["pixel_values"][1, 0, 0, 0] < 0  # red, then blue


def test_truncation_never_cuts_image_tokens():
    img, text = 9, 1
    prompt = [text] * 5 + [img] * 4 + [text] * 5  # 14 tokens, the image span at 5..8
    answers = [[3] * 6, [4] * 3]
    assert truncate_vision(prompt, answers, 20, 8, "keep_end", {img}) == (list(range(14)), answers, False)
    # answers first: the prompt leaves room, so only they are cut (keeping their start)
    assert truncate_vision(prompt, answers, 16, 8, "keep_end", {img}) == (list(range(14)), [[3, 3], [4, 4]], True)
    # the prompt alone fills max_length: its text outside the image span is cut to max_prompt_length
    keep, cut, truncated = truncate_vision(prompt, answers, 14, 8, "keep_end", {img})
    assert keep == [5, 6, 7, 8, 10, 11, 12, 13] and cut == answers and truncated
    keep, _, _ = truncate_vision(prompt, answers, 14, 8, "keep_start", {img})
    assert keep == [0, 1, 2, 3, 5, 6, 7, 8]
    # the image span is longer than max_prompt_length: the text goes, the images stay
    keep, cut, _ = truncate_vision(prompt, answers, 12, 2, "keep_end", {img})
    assert [prompt[j] for j in keep] == [img] * 4 and cut == [[3] * 6, [4] * 3]
    # the image span cannot fit at all: the pair is dropped (None)
    assert truncate_vision(prompt, answers, 4, 2, "keep_end", {img})[0] is None


def test_tight_lengths_keep_images_and_drop_what_cannot_fit(processor, shipped_rows):
    tokenized, stats = shipped(4, shipped_rows, processor, max_length=30, max_prompt_length=20)
    assert stats["train"]["truncated"] == 4 and stats["train"]["dropped"] == 0
    for row in tokenized["train"]:
        assert row["prompt_length"] == 20 and row["chosen_input_ids"].count(processor.image_token_id) == IMAGE_TOKENS
        assert len(row["chosen_input_ids"]) <= 30 and len(row["rejected_input_ids"]) <= 30
    one = {"prompt": user(None, "Colour?"), "chosen": "Red.", "rejected": "Blue.", "images": [picture("red")]}
    two = {"prompt": user(None, None, "Same?"), "chosen": "No.", "rejected": "Yes.",
           "images": [picture("red"), picture("blue")]}
    tokenized, stats = tokenize_vision_splits({"train": pil_split([one, two, one])}, processor,
                                              cfg(max_length=24, max_prompt_length=8))
    assert (stats["train"]["pairs"], stats["train"]["kept"], stats["train"]["dropped"]) == (3, 2, 1)
    assert tokenized["train"]["source_idx"] == [0, 2] and tokenized["train"]["idx"] == [0, 1]
    assert "dropped" in format_stats(stats)
    with pytest.raises(DataError, match="every pair of split 'train' was dropped"):
        tokenize_vision_splits({"train": pil_split([two])}, processor, cfg(max_length=24, max_prompt_length=8))


# ----------------------------------------------------------------------------------------- batching

class TokenTypeProcessor:
    """The tiny VLM's processor that also returns token_type_ids (1 on image tokens), as Gemma 3's does."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **kw):
        out = self.inner(**kw)
        out["token_type_ids"] = (out["input_ids"] == self.inner.image_token_id).astype(np.int64)
        return out


def test_collator_pads_text_and_concatenates_images(processor):
    rows = [{"prompt": user(None, "Colour?"), "chosen": "Red.", "rejected": "It is a shade of blue, I think.",
             "images": [picture("red")]},
            {"prompt": user(None, None, "Same colour?"), "chosen": "No, they differ.", "rejected": "Yes.",
             "images": [picture("red"), picture("blue")]}]
    tokenized, _ = tokenize_vision_splits({"train": pil_split(rows)}, TokenTypeProcessor(processor), cfg())
    ds = tokenized["train"]
    batch = VisionPreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)([ds[0], ds[1]])
    tc, tr = (max(len(r[f"{s}_input_ids"]) for r in ds) for s in ("chosen", "rejected"))
    assert set(batch) == {"chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                          "rejected_attention_mask", "rejected_labels", "idx", "pixel_values",
                          "chosen_token_type_ids", "rejected_token_type_ids"}
    assert batch["chosen_input_ids"].shape == batch["chosen_token_type_ids"].shape == (2, tc)
    assert batch["rejected_labels"].shape == batch["rejected_token_type_ids"].shape == (2, tr)
    for side in ("chosen", "rejected"):
        assert torch.equal(batch[f"{side}_token_type_ids"].bool(),
                           batch[f"{side}_input_ids"] == processor.image_token_id)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"][0, 0, 0, 0] > 0.5 and batch["pixel_values"][2, 0, 0, 0] < 0  # pair order kept


def test_image_tensors_pad_trailing_dims_and_skip_pairs_without_images(processor):
    a, b = torch.ones(1, 2, 3), torch.full((2, 4, 3), 2.0)
    joined = concat_padded([a, b])
    assert joined.shape == (3, 4, 3) and joined[0, 2:].abs().sum() == 0 and joined[1:].eq(2).all()
    rows = [{"prompt": user("Name a colour."), "chosen": "Red.", "rejected": "Seven.", "images": []},
            {"prompt": user(None, "Colour?"), "chosen": "Blue.", "rejected": "Red.", "images": [picture("blue")]}]
    ds = tokenize_vision_splits({"train": pil_split(rows)}, processor, cfg())[0]["train"]
    assert ds["tower_inputs"] == [0, 1] and ds["tower_input_shape"] == [[], [3, 32, 32]]
    batch = VisionPreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)(list(ds))
    assert batch["pixel_values"].shape == (1, 3, 32, 32)  # the pair without an image adds nothing
    assert "pixel_values" not in VisionPreferenceCollator(0)([ds[0]])  # no images: no processor needed
    with pytest.raises(DataError, match="given no processor"):
        VisionPreferenceCollator(0)([ds[1]])


def processor_batch(processor, rows: list) -> dict:
    """The processor's own output for `rows` (tokenised pairs) in one call: their prompts' text, their images."""
    images = [[open_image(v, "test") for v in r["images"]] for r in rows]
    return processor(text=[r["prompt_text"] for r in rows], images=images, return_tensors="pt",
                     add_special_tokens=False, padding=True)


def test_collated_images_are_the_processors_own_tiny_llava(processor, shipped_rows):
    """The collator's pixel_values for shipped pairs (paths) and in-memory pairs (encoded images) equal what the
    processor makes of those pairs' images, bit for bit, in pair order."""
    collate = VisionPreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)
    on_disk = list(shipped(8, shipped_rows, processor)[0]["train"])
    rows = [{"prompt": user(None, "Colour?"), "chosen": "Red.", "rejected": "Blue.", "images": [picture("red")]},
            {"prompt": user(None, None, "Same?"), "chosen": "No.", "rejected": "Yes.",
             "images": [picture("green"), picture("blue")]}]
    in_memory = list(tokenize_vision_splits({"train": pil_split(rows)}, processor, cfg())[0]["train"])
    for batch_rows in (on_disk, in_memory):
        batch, own = collate(batch_rows), processor_batch(processor, batch_rows)
        assert batch["pixel_values"].dtype == own["pixel_values"].dtype == torch.float32
        assert torch.equal(batch["pixel_values"], own["pixel_values"])
        for b, r in enumerate(batch_rows):  # the token ids were expanded for these very images
            n = r["prompt_length"]
            assert r["chosen_input_ids"][:n] == own["input_ids"][b][own["attention_mask"][b].bool()].tolist()


@pytest.fixture(scope="module")
def idefics3_processor(smol_dir, tmp_path_factory):
    """SmolVLM's Idefics3 processor built offline from the shipped config folder (as inspect builds it), its
    tiles shrunk to 64 pixels (4 image tokens each) so that a picture is a few small tiles."""
    import shutil

    from transformers import AutoProcessor

    from dpo_accel.config.schema import ModelConfig
    from dpo_accel.inspect_vision import stand_in_processor

    path = tmp_path_factory.mktemp("idefics3")
    shutil.copytree(stand_in_processor(str(REPO / "model_configs" / "smolvlm-256m-instruct"),
                                       ModelConfig(tokenizer_name_or_path=smol_dir)), path, dirs_exist_ok=True)
    for name, changes in (("preprocessor_config.json", {"size": {"longest_edge": 256},
                                                         "max_image_size": {"longest_edge": 64}}),
                          ("processor_config.json", {"image_seq_len": 4})):
        values = {**json.loads((path / name).read_text()), **changes}
        (path / name).write_text(json.dumps(values))
    return AutoProcessor.from_pretrained(str(path))


def test_collated_images_are_the_processors_own_idefics3(idefics3_processor):
    """Idefics3 splits pictures into tiles, as many as their size asks (17 for a square, 9 for a wide one here):
    the collator's pixel_values and pixel_attention_mask, padded to the batch's most tiles, equal the
    processor's own batch of those pairs' images; tokenisation's tower inputs count the tiles."""
    p = idefics3_processor
    rows = [{"prompt": user(None, "Colour?"), "chosen": "Red.", "rejected": "Blue.", "images": [picture("red")]},
            {"prompt": user(None, "Colour?"), "chosen": "Blue.", "rejected": "Red.",
             "images": [Image.new("RGB", (200, 90), "blue")]}]
    ds = tokenize_vision_splits({"train": pil_split(rows)}, p, cfg(max_length=512, max_prompt_length=256))[0]
    train = list(ds["train"])
    assert [r["tower_inputs"] for r in train] == [17, 9] and train[0]["tower_input_shape"] == [3, 64, 64]
    batch = VisionPreferenceCollator(p.tokenizer.pad_token_id, processor=p)(train)
    own = processor_batch(p, train)
    assert sorted(k for k in batch if "pixel" in k) == ["pixel_attention_mask", "pixel_values"]
    assert batch["pixel_values"].shape == (2, 17, 3, 64, 64)
    for key in ("pixel_values", "pixel_attention_mask"):
        assert batch[key].dtype == own[key].dtype and torch.equal(batch[key], own[key]), key


def test_the_shapes_cache_holds_images_not_pixels(processor, tmp_path):
    """The shapes task's 800 train pairs tokenise into a cache of token ids, prompt text and image paths: about
    2 MB on disk (its pixel tensors made it 12 MB; a SmolVLM pair's reach 50 MB)."""
    raw = load_vision_split(str(SHIPPED), "train", cache_dir=str(tmp_path / "cache"))
    source = {f["filename"] for f in raw.cache_files}
    train = tokenize_vision_splits({"train": raw}, processor, DataConfig(max_length=128, max_prompt_length=96))[0][
        "train"]
    assert len(train) == 800 and not any("pixel" in c or "image_" in c for c in train.column_names)
    assert {"images", "prompt_text", "tower_inputs", "tower_input_shape"} <= set(train.column_names)
    written = {str(f) for f in (tmp_path / "cache").rglob("*.arrow")} - source
    assert written and sum(os.path.getsize(f) for f in written) < 4e6


# --------------------------------------------------------------------------------------- bad inputs

def test_missing_and_unreadable_image_files(tmp_path):
    picture("red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = {"prompt": user(None, "Colour?"), "chosen": "Red.", "rejected": "Blue.", "images": ["../ok.png"]}
    path = write_rows(tmp_path / "a", [good, {**good, "images": ["../nowhere.png"]}])
    with pytest.raises(DataError, match=r"row 1 of split 'train': image file '.*nowhere\.png' does not exist"):
        load_vision_split(path, cache_dir=str(tmp_path / "cache"))
    path = write_rows(tmp_path / "b", [{**good, "images": ["../broken.png"]}])
    with pytest.raises(DataError, match=r"row 0 of split 'train': image file '.*broken\.png' cannot be read"):
        load_vision_split(path, cache_dir=str(tmp_path / "cache"))


def test_placeholder_and_image_counts_must_match():
    row = {"prompt": user(None, None, "Same?"), "chosen": "No.", "rejected": "Yes.", "images": [picture("red")]}
    with pytest.raises(DataError, match=r"row 0 of split 'train': the prompt has 2 image placeholder\(s\).*"
                                        r"'images' holds 1 image\(s\)"):
        pil_split([row])
    with pytest.raises(DataError, match="row 0 of split 'train': column 'chosen' must be assistant messages "
                                        "without images"):
        pil_split([{**row, "prompt": user(None, "x"), "chosen": user(None)}])


def test_images_for_a_text_only_model_are_refused(processor, smol_dir):
    from transformers import AutoTokenizer

    ds = pil_split([{"prompt": user(None, "Colour?"), "chosen": "Red.", "rejected": "Blue.",
                     "images": [picture("red")]}])
    with pytest.raises(DataError, match="split 'train' has images but the model's processor .* has no image "
                                        "processor: the model is text-only"):
        tokenize_vision_splits({"train": ds}, AutoTokenizer.from_pretrained(smol_dir), cfg())


def test_text_pairs_train_on_a_vlm_without_image_keys(processor):
    text = datasets.Dataset.from_list([{"prompt": "What colour is grass?", "chosen": "Green.", "rejected": "Purple."},
                                       {"prompt": "Name a shape.", "chosen": "Circle.", "rejected": "Blue."}])
    messages = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "Name a shape."}],
                                            "chosen": [{"role": "assistant", "content": "Circle."}],
                                            "rejected": [{"role": "assistant", "content": "Blue."}]}])
    tokenized, stats = tokenize_vision_splits({"train": text, "eval": messages}, processor, cfg())
    assert stats["train"]["kept"] == 2 and "pixel_values" not in tokenized["train"].column_names
    assert tokenized["eval"][0]["chosen_input_ids"] == tokenized["train"][1]["chosen_input_ids"]  # same template
    batch = VisionPreferenceCollator(processor.tokenizer.pad_token_id)(list(tokenized["train"]))
    assert "pixel_values" not in batch and processor.image_token_id not in batch["chosen_input_ids"]
    sft = datasets.Dataset.from_list([{"prompt": "Hi?", "chosen": "Hello."}])
    with pytest.raises(DataError, match="split 'train' is not preference pairs"):
        tokenize_vision_splits({"train": sft}, processor, cfg())


# -------------------------------------------------------------------------------------- shapes task

def test_shapes_dataset_regenerates_byte_identically(tmp_path):
    shapes.write_dataset(str(tmp_path / "regen"))
    files = sorted(p.relative_to(SHIPPED) for p in SHIPPED.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "regen") for p in (tmp_path / "regen").rglob("*") if p.is_file())
    assert len(files) == 800 + 96 + 2
    for name in files:
        assert (tmp_path / "regen" / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_shapes_chosen_scores_right_and_rejected_wrong():
    train, test, pictures = shapes.make_pairs()
    assert not set(map(repr, (pictures[r["images"][0]] for r in train))) & set(
        map(repr, (pictures[r["images"][0]] for r in test)))  # held-out pictures unseen in training
    for row in train + test:
        truth = shapes.answer_text(row["chosen"])
        assert shapes.score_answer(truth, truth) == {**shapes.score_answer(truth, truth), "format": True,
                                                     "correct": True}
        rejected = shapes.score_answer(truth, shapes.answer_text(row["rejected"]))
        assert not (rejected["format"] and rejected["correct"])
        assert rejected["correct"] == (row["kind"] == "verbose_correct")
        assert rejected["format"] == (row["kind"] == "wrong_concise")
    # the registered scorer, as the held-out evaluation calls it: the rows tell it the right answers
    prompts = [r["prompt"] for r in test]
    scores = behaviour_scores("shapes", prompts, [shapes.answer_text(r["chosen"]) for r in test], test)
    assert (scores["format_rate"], scores["correct_rate"], scores["n"]) == (1.0, 1.0, 96.0)
    scores = behaviour_scores("shapes", prompts, [shapes.answer_text(r["rejected"]) for r in test], test)
    kinds = [r["kind"] for r in test]
    assert scores["format_rate"] == kinds.count("wrong_concise") / 96
    assert scores["correct_rate"] == kinds.count("verbose_correct") / 96
    with pytest.raises(RecipeError, match="behaviour scorer 'shapes' needs the held-out rows"):
        behaviour_scores("shapes", prompts, ["3."] * 96)
    assert shapes.score_answer("3.", "There are three shapes.")["correct"]
    assert shapes.score_answer("Red.", "red")["format"] is False  # the format is capitalised


# ---------------------------------------------------------------------------------------- tiny VLM

def test_tiny_vlm_loads_and_gives_a_finite_loss(vlm_dir, smol_dir, processor, shipped_rows):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    assert isinstance(model, LlavaForConditionalGeneration) and type(processor).__name__ == "LlavaProcessor"
    with safe_open(os.path.join(smol_dir, "model.safetensors"), "pt") as f:  # SmolLM2's real weights inside
        smol_q = f.get_tensor("model.layers.3.self_attn.q_proj.weight")
    assert torch.equal(model.model.language_model.layers[3].self_attn.q_proj.weight, smol_q)
    assert model.config.image_token_index == processor.image_token_id == len(processor.tokenizer) - 1
    tokenized, _ = shipped(2, shipped_rows, processor)
    batch = VisionPreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)(list(tokenized["train"]))
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            out = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"],
                        labels=batch[f"{side}_labels"], pixel_values=batch["pixel_values"])
            assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch[f"{side}_input_ids"].shape
