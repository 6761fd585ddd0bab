"""Shared fixtures: the real SmolLM2 tokenizer (offline GGUF), a tiny random Llama built from a
config, a tiny random LLaVA and shapes pairs for it, recipes pointed at them, and a clean Accelerate state
for every in-process run.

Also the one home of the helpers several test modules use (end of file): a test module imports them with
``from conftest import ...`` and never imports from another test module."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
        "model.dtype": "float32",  # exactness checks compare float32 runs, whatever the CPU's bf16 units
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


# ------------------------------------------------------------ helpers shared by several test modules
# Test modules import these from here (`from conftest import ...`), never from one another.

# Small-vocabulary model (tests/test_objectives_e2e.py and the runs that reuse its tiny model).

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_small_vocab_model(path: str, hidden_size: int = 32, intermediate_size: int = 64, layers: int = 2) -> str:
    """A random tiny Llama plus a byte-level BPE tokenizer trained on data/arith_prefs (eos <|im_end|>,
    pad = eos, ChatML template, like SmolLM2's), saved to ``path`` for ``model.model_name_or_path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = ["user", "assistant", "system"]
    for name in sorted(glob.glob(os.path.join(REPO, "data", "arith_prefs", "*.jsonl"))):
        with open(name) as f:
            for line in f:
                row = json.loads(line)
                texts += [row["prompt"], row["chosen"], row["rejected"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Multi-process launches (tests/test_distributed.py, tests/test_kto.py).

CONFIGS = os.path.join(REPO, "accelerate_configs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Vision-language models (tests/test_vision_train.py, tests/test_vision_distributed.py).

SHAPES = os.path.join(REPO, "data", "shapes_prefs")
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=8)


@pytest.fixture(scope="session")
def llava_dir(smol_dir, tmp_path_factory) -> str:
    """A random tiny LLaVA saved with the tiny VLM's processor (SmolLM2 tokenizer + ``<image>``)."""
    from transformers import LlavaForConditionalGeneration

    from dpo_accel.model.tiny_vlm import build_processor, llava_config, set_generation_tokens

    processor = build_processor(smol_dir)
    tok = processor.tokenizer
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(text, processor, TINY_VISION))
    set_generation_tokens(model, tok)
    path = str(tmp_path_factory.mktemp("tiny_llava"))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_shapes(folder, train_rows: int = 8, test_rows: int = 4, edit=None) -> str:
    """The first shipped shapes pairs in `folder` (images linked); `edit(rows)` changes the train rows."""
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", train_rows), ("test", test_rows)):
        with open(os.path.join(SHAPES, f"{split}.jsonl")) as f:
            rows = [json.loads(next(f)) for _ in range(n)]
        if edit is not None and split == "train":
            edit(rows)
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    os.symlink(os.path.join(SHAPES, "images"), os.path.join(folder, "images"))
    return str(folder)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data")


def vision_overrides(model_dir: str, data_dir: str, out: str, **extra) -> list:
    """`tiny_overrides` for the tiny LLaVA on shapes pairs: all of `data_dir`, LoRA r 4, 2 steps."""
    return tiny_overrides(model_dir, out, **{
        "data.dataset_name": data_dir, "data.eval_split": "test", "data.max_train_samples": None,
        "data.max_eval_samples": None, "data.max_length": 96, "data.max_prompt_length": 80,
        "train.max_steps": 2, "train.report_to": [], "lora.use_peft": True, "lora.lora_r": 4, "lora.lora_alpha": 8,
        "lora.lora_dropout": 0.0, **extra})


# Resume (tests/test_resume.py, tests/test_online.py, tests/test_reward_model.py).

def stop_after(out: str, step: int) -> None:
    """As if killed after the checkpoint of `step`: later checkpoints and the finished outputs gone."""
    root = os.path.join(out, "checkpoints")
    for name in os.listdir(root):
        if int(name.split("-")[1]) > step:
            shutil.rmtree(os.path.join(root, name))
    for name in ("model", "adapter", "summary.json"):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# Log-probs against naive references (tests/test_logps.py, tests/test_packed_sharing.py).

VOCAB = 320
EOS = 2
ATOL = 1e-5


def tiny_llama(attn="sdpa", tied=False, seed=0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         tie_word_embeddings=tied, attention_dropout=0.0, pad_token_id=0, eos_token_id=EOS)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the 0.02-std init, so mistakes show in the log-probs
        model.lm_head.weight.normal_(0, 0.3)
    return model.train()


def weighted_loss(out):
    """A scalar that weighs every sequence differently, so a log-prob scattered to the wrong row shows."""
    wc = torch.linspace(0.5, 1.5, out["chosen_logps"].numel())
    wr = torch.linspace(-1.3, 0.7, out["rejected_logps"].numel())
    return (wc * out["chosen_logps"]).sum() + (wr * out["rejected_logps"]).sum()


def grads_of(model, out):
    model.zero_grad(set_to_none=True)
    weighted_loss(out).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_within(grads, reference, rtol):
    """Each gradient within `rtol` of its reference tensor's largest entry (an absolute bound per tensor)."""
    for name in reference:
        scale = float(reference[name].abs().max())
        torch.testing.assert_close(grads[name], reference[name], atol=rtol * scale, rtol=0,
                                   msg=lambda m: f"{grads[name].dtype} {name}: {m}")


def lora_model(tied=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                     init_lora_weights=False, task_type="CAUSAL_LM")  # random B: the adapters change the output
    return get_peft_model(tiny_llama(tied=tied), cfg)


def shared_prompt_batch(pad_c=0, pad_r=5) -> dict:
    """Pairs whose rows share a prompt, as real preference data does, plus the corner cases: answers that
    start with the same tokens (the common prefix reaches into the labels), a chosen row that is a prefix
    of its rejected row, a pair with nothing in common, and rows of different padded widths."""
    from benchmarks.pair_batches import shared_prompt_batch as batch

    return batch(VOCAB, pad_c=pad_c, pad_r=pad_r)


def separate_reference(model, batch):
    """Each side through the model on its own (full logits, the model's dtype kept: float64 models give an
    exact reference): the independent reference."""
    out = {}
    for s in ("chosen", "rejected"):
        ids, mask, labels = (batch[f"{s}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out[f"{s}_logps"] = (tok * (target != -100)).sum(-1)
    return out


# Run outputs (tests/test_judge.py, tests/test_plots.py, tests/test_run_outputs.py).

def make_reward_model(tokenizer_dir: str, path: str) -> str:
    """A tiny LlamaForSequenceClassification (one label, random weights) with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def curves_of(png: str) -> list[str]:
    from PIL import Image

    with Image.open(png) as image:
        image.verify()  # raises on a truncated or corrupt PNG
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        return image.text["Curves"].split("; ")


def paired_steps(a: list, b: list) -> list:
    """The logged rows of two runs side by side, once both are shown to have logged the same steps in the same
    order (a plain zip of unequal lists would silently compare fewer rows)."""
    steps_a, steps_b = [r["step"] for r in a], [r["step"] for r in b]
    assert steps_a == steps_b, f"the two runs logged different steps: {steps_a} vs {steps_b}"
    return list(zip(a, b))


def drop_chat_template(model_dir: str) -> None:
    """Make the tokenizer saved in `model_dir` a raw-text one (no chat template), as the Pythia HH recipe's."""
    from transformers import AutoTokenizer

    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(model_dir, name)):
            os.remove(os.path.join(model_dir, name))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(model_dir)
    assert not getattr(AutoTokenizer.from_pretrained(model_dir), "chat_template", None), "a chat template is left"
