"""Vision-language models train exactly with each pair's image and prompt run once: tiny random models of
each family, LoRA on the language model, against separate unpadded forwards of every sequence.

Every family is built from its own config (text hidden 64, 2 layers, vocab 320; vision tower hidden 32,
2 layers, 32-pixel images in 8-pixel patches, so 4 to 16 image tokens), in float64, with a LoRA adapter on
the language model's linear layers whose B matrices are random (so the adapter changes the outputs). Each
pair's prompt holds its image placeholders expanded as the family's processor expands them; answers have
unequal lengths, one pair's answers share their first tokens, and rows are right-padded. The reference is
each sequence run alone, unpadded, through the model's own forward (full logits, float64 log-softmax):
values and LoRA gradients must agree to 1e-10 relative in both layouts.
"""
from __future__ import annotations

import contextlib
import functools
import os
import types
from typing import Optional

import pytest
import torch

from dpo_accel.model.vision import (freeze_vision_tower, vision_concatenated_logps, vision_layout,
                                    vision_lora_kwargs, vision_projector)

VOCAB = 320
EOS = 2
IMAGE, BOI, EOI, FAKE, GLOBAL, NEWLINE = 300, 301, 302, 303, 304, 10  # placeholder ids inside the vocabulary
RTOL = 1e-10  # float64, relative
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=EOS, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
QWEN_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                   temporal_patch_size=2)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}

# name: (model_type, config fields[, attention implementation, SDPA unless named]). Gemma 3's window (3) is
# shorter than one image's 6 tokens; its text config's soft-cap is one the multimodal forward does not
# apply, PaliGemma 2's one it does (Gemma 2 runs eager attention only).
FAMILIES = {
    "LLaVA": ("llava", dict(text_config=dict(model_type="llama", **TEXT), image_token_index=IMAGE, image_seq_length=16,
                            vision_config=dict(model_type="clip_vision_model", projection_dim=32, **VISION))),
    "Qwen2-VL": ("qwen2_vl", dict(text_config=dict(rope_parameters=MROPE, **TEXT), vision_config=QWEN_VISION,
                                  image_token_id=IMAGE, video_token_id=305, vision_start_token_id=BOI,
                                  vision_end_token_id=EOI)),
    "Qwen2.5-VL": ("qwen2_5_vl", dict(text_config=dict(rope_parameters=MROPE, **TEXT),
                                      vision_config=dict(QWEN_VISION, out_hidden_size=64, intermediate_size=64,
                                                         fullatt_block_indexes=[1], window_size=16),
                                      image_token_id=IMAGE, video_token_id=305, vision_start_token_id=BOI,
                                      vision_end_token_id=EOI)),
    "Idefics3": ("idefics3", dict(text_config=dict(model_type="llama", **TEXT), vision_config=VISION,
                                  image_token_id=IMAGE, scale_factor=2)),
    "SmolVLM": ("smolvlm", dict(text_config=dict(model_type="llama", **TEXT), vision_config=VISION,
                                image_token_id=IMAGE, scale_factor=2)),
    "Gemma 3 (window 3)": ("gemma3", dict(text_config=dict(sliding_window=3, sliding_window_pattern=2,
                                                           final_logit_softcapping=5.0, **TEXT),
                                          vision_config=dict(model_type="siglip_vision_model", **VISION),
                                          mm_tokens_per_image=4, boi_token_index=BOI, eoi_token_index=EOI,
                                          image_token_index=IMAGE)),
    "PaliGemma": ("paligemma", dict(text_config=dict(model_type="gemma", **TEXT), image_token_index=IMAGE,
                                    vision_config=dict(model_type="siglip_vision_model", **VISION),
                                    projection_dim=64, hidden_size=64, vocab_size=VOCAB)),
    "PaliGemma 2 (soft-capping)": ("paligemma", dict(text_config=dict(model_type="gemma2", final_logit_softcapping=5.0,
                                                                      **TEXT),
                                                     vision_config=dict(model_type="siglip_vision_model", **VISION),
                                                     image_token_index=IMAGE, projection_dim=64, hidden_size=64,
                                                     vocab_size=VOCAB), "eager"),
}


def build(name: str, lora: bool = True, train_projector: bool = False, exact_norms: bool = True,
          text_fields: Optional[dict] = None, seed: int = 0) -> torch.nn.Module:
    """The family's tiny float64 model (dropout 0, RMSNorms in float64 unless ``exact_norms`` is False; text
    config fields overridden by ``text_fields``) with LoRA on its language model (random B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from dpo_accel.model.loading import disable_dropout

    model_type, fields, *attn = FAMILIES[name]
    fields = dict(fields, text_config={**fields["text_config"], **(text_fields or {})})
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=(attn or ["sdpa"])[0],
                                                    dtype=torch.float64)
    disable_dropout(model)
    with torch.no_grad():  # sharper logits than the 0.02-std init, so a wrong context shows in the log-probs
        model.get_output_embeddings().weight.normal_(0, 0.3)
        projector = vision_projector(model)
        for p in projector.parameters():  # image features large enough to matter
            p.normal_(0, 0.3)
    if exact_norms:
        float64_norms(model)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 **vision_lora_kwargs(model, train_projector=train_projector)))
    return model


def _rms_norm_float64(self, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
    offset = 1.0 if "Gemma" in type(self).__name__ else 0.0  # Gemma's scale is 1 + weight
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + self.weight)


def float64_norms(model: torch.nn.Module) -> None:
    """Give every RMSNorm its own formula in the input's dtype. transformers' RMSNorms compute in float32 even
    in a float64 model, which rounds each gradient passing through them to float32: the shared layout sums a
    shared token's gradient from its two rows in another order than stacked rows do, and those 1e-16
    differences would show as 1e-8 after the rounding. With the norms in float64 the comparison sees the
    layouts alone (`test_float32_norms_round_gradients_only` keeps the originals). Bound to each module, so
    peft's copy of a trained projector gets its own."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            forward = types.MethodType(_rms_norm_float64, module)
            probe = torch.randn(3, module.weight.shape[0], dtype=module.weight.dtype)
            torch.testing.assert_close(forward(probe), module(probe), rtol=1e-5, atol=1e-6)  # the same formula
            module.forward = forward


@contextlib.contextmanager
def float64_softmax():
    """Eager attention's softmax in the scores' own dtype. transformers' eager attention takes the softmax
    in float32 even in a float64 model (values then agree to 1e-9, gradients to 1e-7, for the reason
    `float64_norms` gives); in float64 the comparison sees the layouts alone."""
    plain = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return plain(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = plain


def image_of(model_type: str, g: torch.Generator, pair: int) -> tuple[list[int], list[int], dict]:
    """One pair's image: its placeholder tokens as the processor expands them, their token types, and the
    pair's image tensors (the processor's names and shapes)."""
    def pixels(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if model_type == "llava":  # CLIP: 16 patches, the class token dropped
        return [IMAGE] * 16, [0] * 16, {"pixel_values": pixels(1, 3, 32, 32)}
    if model_type in ("qwen2_vl", "qwen2_5_vl"):  # grid (1, h, w) of 4-pixel patches, merged 2 x 2
        h, w = ((4, 4), (4, 6), (6, 4))[pair % 3]
        tokens = [BOI] + [IMAGE] * (h * w // 4) + [EOI]
        return tokens, [0] * len(tokens), {"pixel_values": pixels(h * w, 3 * 2 * 4 * 4),
                                           "image_grid_thw": torch.tensor([[1, h, w]])}
    if model_type in ("idefics3", "smolvlm"):  # 16 patches shuffled 2 x 2 into 4 tokens
        tokens = [FAKE, GLOBAL] + [IMAGE] * 4 + [FAKE]
        return tokens, [0] * len(tokens), {"pixel_values": pixels(1, 1, 3, 32, 32),
                                           "pixel_attention_mask": torch.ones(1, 1, 32, 32, dtype=torch.long)}
    if model_type == "gemma3":  # 16 patches pooled into 4 tokens; the first pair has two images
        n = 2 if pair == 0 else 1
        tokens = ([BOI] + [IMAGE] * 4 + [EOI]) * n
        return tokens, [int(t == IMAGE) for t in tokens], {"pixel_values": pixels(n, 3, 32, 32)}
    if model_type == "paligemma":  # 16 image tokens, then BOS and the prompt
        return [IMAGE] * 16 + [1], [0] * 17, {"pixel_values": pixels(1, 3, 32, 32)}
    raise KeyError(model_type)


def family_pairs(model_type: str, seed: int = 7) -> list[dict]:
    """Three pairs: a prompt with the pair's image inside, answers of unequal lengths (the second pair's share
    their first two tokens); each row with its token types (PaliGemma: 0 on the prompt, 1 on the answer)."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(3, 290, (n,), generator=g).tolist()

    pairs = []
    for pair, (before, after, c_len, r_len, common) in enumerate(((3, 4, 5, 3, 0), (2, 5, 4, 7, 2), (4, 2, 6, 6, 0))):
        image, image_types, tensors = image_of(model_type, g, pair)
        if model_type == "paligemma":
            prompt, prompt_types = image + toks(before + after) + [NEWLINE], [0] * (len(image) + before + after + 1)
        else:
            prompt, prompt_types = toks(before) + image + toks(after), [0] * before + image_types + [0] * after
        start = toks(common)
        answer_type = int(model_type == "paligemma")
        row = {}
        for side, n in (("chosen", c_len), ("rejected", r_len)):
            answer = start + toks(n - common) + [EOS]
            row[side] = (prompt + answer, prompt_types + [answer_type] * len(answer), len(prompt))
        pairs.append({"rows": row, "images": tensors})
    return pairs


def collate(pairs: list[dict], model_type: str, extra: int = 2) -> dict:
    """The batch contract: right-padded rows (chosen pad 0, rejected pad 5), labels on the answers, each
    pair's image tensors once, concatenated in pair order; token types where the processor gives them."""
    batch = {}
    for side, pad in (("chosen", 0), ("rejected", 5)):
        width = max(len(p["rows"][side][0]) for p in pairs) + extra
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, p in enumerate(pairs):
            row, row_types, prompt_len = p["rows"][side]
            ids[i, :len(row)], types[i, :len(row)] = torch.tensor(row), torch.tensor(row_types)
            mask[i, :len(row)] = 1
            labels[i, prompt_len:len(row)] = torch.tensor(row[prompt_len:])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
        if model_type in ("gemma3", "paligemma"):
            batch[f"{side}_token_type_ids"] = types
    for key in pairs[0]["images"]:
        batch[key] = torch.cat([p["images"][key] for p in pairs])
    return batch


def separate_forwards(model, pairs: list[dict], model_type: str) -> dict:
    """Each sequence alone, unpadded, through the model's own forward with its pair's image -> float64
    log-softmax -> the summed log-probs of its answer tokens: the independent reference."""
    out = {}
    for side in ("chosen", "rejected"):
        sums = []
        for p in pairs:
            row, row_types, prompt_len = p["rows"][side]
            ids, types = torch.tensor([row]), torch.tensor([row_types])
            kwargs = dict(p["images"])
            if model_type in ("gemma3", "paligemma"):
                kwargs["token_type_ids"] = types
            if model_type in ("qwen2_vl", "qwen2_5_vl"):
                kwargs["mm_token_type_ids"] = (ids == IMAGE).long()
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits
            logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
            target = ids[0, prompt_len:]
            sums.append(logp[prompt_len - 1:].gather(-1, target.unsqueeze(-1)).sum())
        out[f"{side}_logps"] = torch.stack(sums)
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def _loss(out: dict) -> torch.Tensor:
    """A weighted sum, so chosen and rejected gradients both count and cannot cancel."""
    w = torch.tensor([1.0, -0.7, 0.4], dtype=torch.float64)
    return (w * out["chosen_logps"]).sum() + (0.3 - w * out["rejected_logps"]).sum()


class _RowCounter:
    """Rows the vision tower and the language model saw in the last forward (forward pre-hooks)."""

    def __init__(self, model):
        from dpo_accel.model.logps import unwrap_decoder

        hf = unwrap_decoder(model)
        self.seen = {}
        hf.get_encoder(modality="image").register_forward_pre_hook(self.hook("vision"), with_kwargs=True)
        hf.get_decoder().register_forward_pre_hook(self.hook("language"), with_kwargs=True)

    def hook(self, name):
        def record(module, args, kwargs):
            x = args[0] if args else kwargs.get("pixel_values", kwargs.get("inputs_embeds"))
            self.seen[name] = tuple(x.shape)
        return record


def compare_layouts(model, pairs: list[dict], model_type: str, layouts=("shared", "stacked")) -> dict:
    """Each layout of `vision_concatenated_logps` (chunked head, 5 positions a chunk) against the separate
    forwards: the largest relative difference of the values and of the LoRA gradients, and the rows the
    vision tower and the language model saw."""
    batch = collate(pairs, model_type)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    reference = separate_forwards(model, pairs, model_type)
    ref_grads = torch.autograd.grad(_loss(reference), lora)
    counter = _RowCounter(model)
    row = {}
    for layout in layouts:
        out = vision_concatenated_logps(model, batch, layout=layout, chunk_size=5)
        grads = torch.autograd.grad(_loss(out), lora)
        assert out["chosen_tokens"].tolist() == batch["chosen_labels"][:, 1:].ne(-100).sum(-1).tolist()
        row[f"{layout}_rows"] = dict(counter.seen)
        row[f"{layout}_value_diff"] = max(_relative(out[f"{s}_logps"].detach(), reference[f"{s}_logps"].detach())
                                          for s in ("chosen", "rejected"))
        row[f"{layout}_grad_diff"] = max(_relative(g, r) for g, r in zip(grads, ref_grads))
    return row


@functools.lru_cache(maxsize=None)
def check_vision_family(name: str) -> dict:
    """Both layouts against the separate forwards for the family's tiny LoRA model (eager attention with its
    softmax in float64). Returns the table row's facts."""
    model_type = FAMILIES[name][0]
    eager = FAMILIES[name][2:] == ("eager",)
    with float64_softmax() if eager else contextlib.nullcontext():
        model = build(name).train()
        row = {"family": name, "model_type": model_type, **compare_layouts(model, family_pairs(model_type), model_type)}
    row["layout"], row["reason"] = vision_layout(model.config)
    row["max_rel_diff"] = max(row[k] for k in row if k.endswith("_diff"))
    return row


def vision_families_table(results: list[dict]) -> str:
    """Markdown: family (``model_type``), layout, why where stacked, largest relative difference (values and
    LoRA gradients, both layouts) against separate forwards."""
    lines = ["| family (`model_type`) | layout | why stacked | max relative difference vs separate forwards |",
             "| --- | --- | --- | ---: |"]
    for r in results:
        why = r["reason"] if r["layout"] != "shared" else ""
        lines.append(f"| {r['family']} (`{r['model_type']}`) | {r['layout']} | {why} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


# Images the vision tower sees for the three pairs run once (Qwen2-VL: patches; Gemma 3: pair 0 has two).
IMAGES_ONCE = {"llava": 3, "qwen2_vl": 64, "qwen2_5_vl": 64, "idefics3": 3, "smolvlm": 3, "gemma3": 4, "paligemma": 3}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_shares_image_and_prompt_exactly(name):
    """Shared: the vision tower saw each pair's images once and the language model one row per pair; both
    layouts equal the separate forwards, values and LoRA gradients."""
    row = check_vision_family(name)
    assert row["layout"] == "shared", row["reason"]
    assert row["shared_rows"]["vision"][0] == IMAGES_ONCE[row["model_type"]]
    assert row["stacked_rows"]["vision"][0] == 2 * IMAGES_ONCE[row["model_type"]]
    assert (row["shared_rows"]["language"][0], row["stacked_rows"]["language"][0]) == (3, 6)
    for key in ("shared_value_diff", "shared_grad_diff", "stacked_value_diff", "stacked_grad_diff"):
        assert row[key] <= RTOL, f"{name}: {key} {row[key]:.2e}"


def table_cells(text: str) -> list[list[str]]:
    """The vision families table's rows in `text`, as lists of cells (header and rule left out)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and "`)" in line and "vs separate forwards" not in line]


def test_table_lists_every_family_as_exact_and_the_docs_show_it():
    """Every family shares exactly; docs/methods/vision.md shows this table (measured differences may move
    with the CPU's kernels but stay under the tolerance): python scripts/families_table.py --vision."""
    rows = table_cells(vision_families_table([check_vision_family(name) for name in FAMILIES]))
    assert len(rows) == len(FAMILIES)
    for cells in rows:
        assert cells[1] == "shared" and float(cells[-1]) <= RTOL, cells
    page = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "methods", "vision.md")
    with open(page, encoding="utf-8") as f:
        shown = table_cells(f.read())
    hint = "docs/methods/vision.md's families table is stale; paste: python scripts/families_table.py --vision"
    assert [r[:-1] for r in shown] == [r[:-1] for r in rows], hint
    assert all(float(r[-1]) <= RTOL for r in shown), hint


def test_float32_norms_round_gradients_only():
    """With transformers' own RMSNorms (float32 inside): values still exact, gradients to float32 rounding."""
    row = compare_layouts(build("Qwen2-VL", exact_norms=False).train(), family_pairs("qwen2_vl"), "qwen2_vl",
                          layouts=("shared",))
    assert row["shared_value_diff"] <= RTOL and row["shared_grad_diff"] <= 1e-5


def test_vision_tower_gets_no_gradient_lora_and_projector_do():
    """LoRA sits on the language model only; the vision tower never gets a gradient; ``train_projector``
    trains a full copy of the projector (peft modules_to_save)."""
    model = build("Gemma 3 (window 3)", train_projector=True).train()
    batch = collate(family_pairs("gemma3"), "gemma3")
    _loss(vision_concatenated_logps(model, batch)).backward()
    named = dict(model.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    assert lora and all(".language_model." in n for n in lora)
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in lora.values())
    tower = [p for n, p in named.items() if ".vision_tower." in n]
    assert tower and all(not p.requires_grad and p.grad is None for p in tower)
    trained_projector = [p for n, p in named.items() if "multi_modal_projector" in n and p.requires_grad]
    assert trained_projector and all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in trained_projector)


def test_full_fine_tune_freezes_the_tower():
    model = build("LLaVA", lora=False)
    freeze_vision_tower(model, train_projector=True)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    qwen = build("Qwen2-VL", lora=False)
    freeze_vision_tower(qwen)
    assert not any(p.requires_grad for p in qwen.model.visual.parameters())


def _differ_before_image(pairs: list[dict], pair: int) -> list[dict]:
    ids, types, prompt_len = pairs[pair]["rows"]["rejected"]
    pairs[pair]["rows"]["rejected"] = ([ids[0] + 1] + ids[1:], types, prompt_len)
    return pairs


@pytest.mark.parametrize("name, text_fields, edit", [
    ("LLaVA", None, lambda pairs: _differ_before_image(pairs, 1)),  # an image outside the shared prefix
    ("PaliGemma 2 (soft-capping)", {"sliding_window": 8}, None),  # rows outrun the one mask's window
])
def test_a_batch_that_cannot_share_runs_stacked_exactly(name, text_fields, edit):
    """Where a batch cannot share (`sharing_problem`), the shared layout runs stacked rows and stays exact."""
    model_type = FAMILIES[name][0]
    with float64_softmax():
        model = build(name, text_fields=text_fields).train()
        pairs = family_pairs(model_type)
        row = compare_layouts(model, edit(pairs) if edit else pairs, model_type, layouts=("shared",))
    assert row["shared_rows"]["language"][0] == 6
    assert row["shared_value_diff"] <= RTOL and row["shared_grad_diff"] <= RTOL


def test_wpo_terms_agree_between_layouts():
    model = build("Qwen2-VL").eval()
    batch = collate(family_pairs("qwen2_vl"), "qwen2_vl")
    with torch.no_grad():
        shared, stacked = (vision_concatenated_logps(model, batch, layout=layout, wpo=True)
                           for layout in ("shared", "stacked"))
    for key in ("chosen_wpo_logps", "rejected_wpo_logps"):
        assert _relative(shared[key], stacked[key]) <= RTOL


def test_layout_of_families_without_rules_and_missing_token_types():
    layout, reason = vision_layout(types.SimpleNamespace(model_type="llava_next"))
    assert layout == "stacked" and "llava_next" in reason
    model = build("PaliGemma", lora=False)
    batch = collate(family_pairs("paligemma"), "paligemma")
    del batch["chosen_token_type_ids"], batch["rejected_token_type_ids"]
    with pytest.raises(KeyError, match="token_type_ids"):
        vision_concatenated_logps(model, batch)
