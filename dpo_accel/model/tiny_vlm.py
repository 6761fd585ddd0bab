"""A tiny vision-language model that runs offline, for tests and the shapes task: a LLaVA whose language model
is the offline SmolLM2-135M-Instruct (its real weights) and whose vision tower (a 2-layer SigLIP, hidden 64,
patch 8 on 32x32 images: 16 image tokens) and projector are random and seeded.

Built once into a cached Hugging Face folder (`tiny_vlm_path`) that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load like any hub checkpoint; recipes name it by its alias ``tiny-vlm-smollm2``, which
`model.loading.resolve_model_path` resolves (this module sits below loading: it is handed SmolLM2's folder). The processor is a ``LlavaProcessor``: a SigLIP image
processor (32x32, mean/std 0.5) and the SmolLM2 tokenizer with an ``<image>`` token added; its chat template
is SmolLM2's, reading message contents that are strings or lists of ``{"type": "text" | "image"}`` parts, and
writes ``<image>`` where an image part is (the processor expands it to 16 tokens).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from dpo_accel.outputs.files import atomic_write

TINY_VLM_ALIAS = "tiny-vlm-smollm2"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
SEED = 0
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_processor(smol_dir: str):
    """The LlavaProcessor: SigLIP image processing at 32x32 and the SmolLM2 tokenizer plus ``<image>``."""
    from transformers import AutoTokenizer, LlavaProcessor, SiglipImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE  # the text path (tokenize.py) reads the tokenizer's own template
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=0)


def llava_config(text_config, processor, vision: dict = VISION):
    """The LlavaConfig of a language model's config and the small SigLIP tower (`vision`), placeholders from
    `processor` (`build_processor`): tests build smaller random VLMs of the same shape with it."""
    from transformers import LlavaConfig, SiglipVisionConfig

    return LlavaConfig(vision_config=SiglipVisionConfig(**vision), text_config=text_config,
                       image_token_index=processor.image_token_id, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                       vision_feature_select_strategy="full", vision_feature_layer=-1,
                       tie_word_embeddings=text_config.tie_word_embeddings)


def set_generation_tokens(model, tokenizer) -> None:
    """Pad, EOS and BOS of the model's config and generation config from the processor's tokenizer."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, \
        tokenizer.bos_token_id


def build_tiny_vlm(smol_dir: str, seed: int = SEED):
    """(LlavaForConditionalGeneration, LlavaProcessor): SmolLM2's weights in the language model, the vision
    tower and projector drawn from `seed`, the embeddings grown by one row for ``<image>``."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    processor = build_processor(smol_dir)
    text = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    config = llava_config(text.config, processor)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.model.language_model.load_state_dict(text.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit the LLaVA language model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict(text.lm_head.state_dict())
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    set_generation_tokens(model, processor.tokenizer)
    return model.eval(), processor


def tiny_vlm_path(smol_dir: str, cache_root: str) -> str:
    """The cached folder of the tiny VLM under `cache_root`, built from the SmolLM2 folder `smol_dir` on first
    use; it appears atomically (a concurrent builder's finished folder wins), keyed by the builder's settings
    and the SmolLM2 folder. Recipes reach it through the alias (``resolve_model_path(TINY_VLM_ALIAS)``)."""
    key = hashlib.sha256(json.dumps([VISION, SEED, CHAT_TEMPLATE, os.path.abspath(smol_dir)]).encode()).hexdigest()[:16]
    target = os.path.join(cache_root, "tiny_vlm", f"{TINY_VLM_ALIAS}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    with atomic_write(target, unique=True, replace=False) as tmp:
        model, processor = build_tiny_vlm(smol_dir)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return target
