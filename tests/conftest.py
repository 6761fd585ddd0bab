"""Shared fixtures: the real SmolLM2 tokenizer (offline GGUF), a tiny random Llama built from a
config, recipes pointed at them, and a clean Accelerate state for every in-process run."""
from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GGUF conversions are cached inside the checkout (ignored by git), fresh on every CI clone.
os.environ.setdefault("DPO_ACCEL_CACHE", os.path.join(REPO, ".cache", "dpo_accel"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The offline SmolLM2-135M-Instruct, converted once from its GGUF to a safetensors folder."""
    from dpo_accel.model.loading import SMOLLM2_ALIAS, resolve_model_path

    return resolve_model_path(SMOLLM2_ALIAS)


@pytest.fixture(scope="session")
def tiny_model_dir(smol_dir, tmp_path_factory) -> str:
    """A 2-layer Llama with random weights and the real SmolLM2 tokenizer (vocab 49152)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_overrides(model_dir: str, output_dir: str, **extra) -> list[str]:
    """Overrides for a fast run of the tiny model on 24 pairs of the shipped dataset."""
    values = {
        "model.model_name_or_path": model_dir,
        "data.dataset_name": os.path.join(REPO, "data", "arith_prefs"),
        "data.max_train_samples": 24, "data.max_eval_samples": 8,
        "data.max_length": 96, "data.max_prompt_length": 64,
        "train.output_dir": output_dir, "train.per_device_train_batch_size": 4,
        "train.per_device_eval_batch_size": 4, "train.learning_rate": 1e-3, "train.max_steps": 4,
        "train.report_to": ["tensorboard"], "train.logps_chunk_size": 64,
        "eval.generation_prompts": 0,
    }
    values.update(extra)
    out = []
    for key, value in values.items():
        if isinstance(value, list):
            value = "[" + ", ".join(map(str, value)) + "]"
        elif value is None:
            value = "null"
        out.append(f"{key}={value}")
    return out


def poison_objective(monkeypatch, module, steps: set) -> None:
    """Make `module.compute_objective` return a NaN loss on the given calls (1-based: one per micro-batch, so
    the optimizer steps when there is no accumulation)."""
    real, calls = module.compute_objective, []

    def objective(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) in steps:
            out.loss, out.losses = out.loss * float("nan"), out.losses * float("nan")
        return out

    monkeypatch.setattr(module, "compute_objective", objective)
