"""Typed recipe schema: YAML in, dotted overrides, strict validation, resolved YAML out.

The dataclasses below are the documentation of every option: each field's comment says what it does.
A recipe file groups keys by section (``model``, ``lora``, ``reference``, ``data``, ``loss``,
``train``, ``eval``); key names follow TRL / alignment-handbook where such a name exists.

Overrides on the command line: ``--set train.learning_rate=5e-6 --set lora.lora_r=8``; values are
parsed as YAML (``true``, ``1e-5``, ``[q_proj, v_proj]``, ``null``). Unknown or mistyped keys stop
the run at start-up with one line naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from dpo_accel.config.errors import RecipeError


@dataclass
class ModelConfig:
    model_name_or_path: str = "smollm2-135m-instruct"  # HF dir, hub id, .gguf file, or the alias of the offline SmolLM2
    gguf_file: Optional[str] = None  # GGUF file name inside model_name_or_path (de-quantised, cached as safetensors)
    tokenizer_name_or_path: Optional[str] = None  # defaults to the model's own tokenizer
    # auto | float32 | bfloat16 | float16: dtype the policy weights are loaded in. auto: bfloat16 for the frozen base
    # under LoRA where the device has bf16 matrix units (CUDA Ampere+, CPUs with AMX-BF16 / AVX512-BF16), float32
    # elsewhere and for full fine-tuning; the LoRA adapter and optimizer state stay float32
    dtype: str = "auto"
    attn_implementation: Optional[str] = "sdpa"  # sdpa | eager | flash_attention_2 | null (library default)
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless you trust it
    allow_pickle_weights: bool = False  # also load .bin/.pt weights (pickle can run code); default: safetensors only
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing (less memory, ~30% slower)
    load_in_4bit: bool = False  # QLoRA: frozen base in 4-bit NF4 via bitsandbytes (CUDA only; needs lora.use_peft)


@dataclass
class LoraConfig:
    use_peft: bool = False  # wrap the policy with a LoRA adapter (peft)
    lora_r: int = 16  # adapter rank
    lora_alpha: int = 32  # scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the adapter's input during training
    lora_target_modules: Union[str, list] = "all-linear"  # "all-linear" or a list of module names
    lora_modules_to_save: Optional[list] = None  # modules trained in full beside the adapter (e.g. [lm_head])
    # Vision-language models: also train the projector (it maps vision features into the language model) in full beside the
    # adapter (float32), or with full fine-tuning; LoRA covers the language model only, the vision tower stays frozen
    train_projector: bool = False
    # A peft LoRA adapter dir (e.g. an SFT run's <output_dir>/adapter) merged into the base weights at load, so the
    # policy AND every reference (adapter_off, copy, precomputed) start from base + that adapter; with use_peft a
    # fresh adapter trains on top. The exported adapter/ is then relative to the merged weights: deploy model/.
    init_adapter: Optional[str] = None


@dataclass
class ReferenceConfig:
    mode: str = "auto"  # auto | copy | adapter_off | precomputed | none (auto: adapter_off with LoRA, copy without, none for reference-free losses)
    ref_model_name_or_path: Optional[str] = None  # reference weights if not the policy's starting point
    dtype: Optional[str] = None  # dtype of a copied reference (defaults to model.dtype)
    cache_dir: Optional[str] = None  # where precomputed reference log-probs are cached (default: <output_dir>/../.ref_cache)


@dataclass
class DataConfig:
    dataset_name: str = "data/arith_prefs"  # local dir / json / jsonl / parquet file, or a hub id
    dataset_config: Optional[str] = None  # hub dataset configuration name
    train_split: str = "train"  # split trained on (hub datasets: e.g. train_prefs for UltraFeedback)
    eval_split: Optional[str] = "eval"  # split used for held-out evaluation; null to carve one from train
    eval_fraction: float = 0.0  # when eval_split is missing: fraction of train held out (seeded)
    format: str = "auto"  # auto | explicit | conversational | implicit | hh | sft | unpaired (prompt, completion, label)
    max_length: int = 512  # prompt + answer tokens per sequence
    max_prompt_length: int = 256  # prompt tokens kept before the answer
    truncation_mode: str = "keep_end"  # keep_end | keep_start: which part of an over-long prompt is kept
    max_train_samples: Optional[int] = None  # cap on training pairs (after shuffling with the seed)
    max_eval_samples: Optional[int] = None  # cap on held-out pairs (the first ones, after the seeded shuffle)
    num_proc: Optional[int] = None  # datasets.map workers for tokenisation
    dataloader_num_workers: int = 0  # processes that collate batches while the model trains (0: in the training process)
    group_by_length: bool = True  # length-grouped batches (shuffled mega-batches sorted by length)
    # Several sources instead of dataset_name, the alignment-handbook's block: {datasets: [{id, config, split,
    # columns, weight | rows, format, eval_split}], seed, test_split_size}; see dpo_accel/config/mixture.py
    dataset_mixture: Optional[dict] = None


@dataclass
class LossConfig:
    loss_type: Union[str, list] = "sigmoid"  # one objective name, or a list combined with loss_weights
    loss_weights: Optional[list] = None  # weights of a loss_type list (default: all 1.0)
    beta: float = 0.1  # temperature of the implicit reward (DPO's beta)
    label_smoothing: float = 0.0  # conservative DPO / robust DPO label-noise rate
    reference_free: bool = False  # DPO against a uniform reference (no reference model is loaded)
    ipo_token_average: bool = True  # IPO on per-token-averaged log-ratios (False: the original repo's summed form)
    rpo_alpha: Optional[float] = None  # weight of an NLL term on chosen answers added to any objective (RPO)
    simpo_gamma: float = 0.5  # SimPO target reward margin
    orpo_lambda: float = 0.1  # weight of ORPO's odds-ratio term
    f_divergence_type: str = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 1.0  # alpha of alpha_divergence
    use_weighting: bool = False  # WPO per-pair weights
    discopop_tau: float = 0.05  # DiscoPOP mixing temperature
    desirable_weight: float = 1.0  # KTO: weight of the desirable (label true) examples' loss
    undesirable_weight: float = 1.0  # KTO: weight of the undesirable (label false) examples' loss
    center_rewards_coefficient: Optional[float] = None  # bradley_terry: weight of (r_w + r_l)^2 (TRL's name)
    # Weight of the router load-balancing loss added for mixture-of-experts policies (Mixtral, Qwen-MoE, OLMoE, ...),
    # as TRL does; null: the model config's router_aux_loss_coef; 0 turns it off. Dense models ignore it.
    router_aux_loss_coef: Optional[float] = None


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"  # the run folder: metrics, logs, checkpoints, model/ and adapter/
    seed: int = 42  # seeds the weights of new layers, the data order, dropout and sampling
    optimizer: str = "adamw"  # adamw | rmsprop (the original DPO work's choice)
    learning_rate: float = 5e-6  # peak learning rate, reached after the warmup
    weight_decay: float = 0.0  # decoupled weight decay of the weight matrices (biases and norm weights: none)
    max_grad_norm: float = 1.0  # 0 disables clipping
    per_device_train_batch_size: int = 4  # pairs per process per micro-batch
    per_device_eval_batch_size: int = 8  # held-out pairs per process per forward
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    num_train_epochs: float = 1.0  # passes over the training split (fractions allowed) when max_steps is not set
    max_steps: int = -1  # optimizer steps; overrides num_train_epochs when > 0
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to learning_rate
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    lr_scheduler_type: str = "linear"  # linear | cosine | constant (all after warmup)
    mixed_precision: Optional[str] = None  # no | bf16 | fp16; null: the launch config's choice
    logging_steps: int = 1  # log the metrics every N optimizer steps (and at the last)
    eval_steps: int = 0  # evaluate every N optimizer steps (0: only at the end)
    save_steps: int = 0  # checkpoint every N optimizer steps (0: none)
    save_total_limit: int = 2  # checkpoints kept
    # optimizer steps in a row whose loss or gradient norm is not finite (each skipped: weights, optimizer and
    # scheduler untouched) before the run stops with an error
    max_nonfinite_steps: int = 3
    report_to: list = field(default_factory=lambda: ["tensorboard"])  # trackers through Accelerate
    export_merged: bool = True  # with LoRA: also save the merged full model at the end
    logps_chunk_size: int = 256  # label positions per LM-head chunk at most (the [2B, T, V] logits never exist)
    # MiB one LM-head chunk may hold at its peak (about two float32 [chunk, V] buffers): fewer positions per chunk
    # for a larger vocabulary, so the transient does not grow with V (49k: 170 positions; 131k: 64); null: the
    # chunk is logps_chunk_size positions whatever V
    logps_chunk_mb: Optional[float] = 64.0
    padding_free: bool = False  # pack the concatenated batch into one row with position_ids (no padding)
    # Run each pair's common prefix (the prompt) once, exactly: one row per pair with a custom 4D mask (per-layer
    # sliding windows kept); null (auto): on where sdpa/eager attention takes the mask and the start-up self-check
    # finds it equal to stacked rows; true: required (one-line error if not).
    prefix_sharing: Optional[bool] = None
    # With prefix sharing, the pairs packed into ONE row with no padding and no [rows, 1, T, T] mask, attention run
    # per pair (SDPA per pair on CPU, a FlexAttention block mask on CUDA; SDPA models); null (auto): where both are
    # exact, each batch in the cheaper of the two by a cost timed at start-up (kept in layout_cost.json for a
    # resume), else whichever is exact; true: always packed; false: always padded rows (bit-identical reruns).
    pack_pairs: Optional[bool] = None
    # auto: memory-lean log-probs (decoder body -> chunked LM head) where the start-up self-check finds them equal to
    # the model's own logits (1e-4 relative), else the full [rows, T, V] logits; lean: required (one-line error if
    # the check fails); full: always the model's own forward (more memory)
    logps_path: str = "auto"
    torch_compile: bool = False  # torch.compile the decoder body (first steps include compile time; CPU needs g++/clang++)
    torch_compile_backend: Optional[str] = None  # torch.compile backend (null: inductor; aot_eager/eager to debug)
    auto_find_batch_size: bool = False  # find the largest micro-batch that fits at start-up; accumulation keeps batch x accum
    push_to_hub: bool = False  # after the local export, upload model/ (else adapter/) to hub_model_id (needs a network)
    hub_model_id: Optional[str] = None  # "user/name" repository for push_to_hub
    # Online DPO (dpo_accel/loops/online.py): k > 1 sampled answers per training prompt each step, scored, best vs worst
    # as the step's pairs; 0: the dataset's fixed pairs
    online_generations: int = 0
    online_verifier: Optional[str] = None  # arith, or module:function returning one number per answer
    online_reward_model: Optional[str] = None  # or a one-label sequence classifier scoring the answers
    online_temperature: float = 1.0  # sampling temperature of the online answers
    online_max_new_tokens: int = 32  # the longest online or iterative answer, in tokens
    # An online or iterative answer that online_max_new_tokens cut off before a stop token: null: left out of its
    # prompt's best-vs-worst pick; a number: kept, that number taken off its score (TRL's missing_eos_penalty)
    online_missing_eos_penalty: Optional[float] = None
    # Iterative DPO (dpo_accel/loops/iterative.py): R rounds, each sampling train.online_generations (k) answers per training
    # prompt with the current policy (online_temperature, online_max_new_tokens), scoring them (online_verifier or
    # online_reward_model), writing best vs worst as <output_dir>/round_<r>/data and training an offline run on it
    # (train.max_steps / num_train_epochs count per round) whose merged export is the next round's policy; 0: off
    iterative_rounds: int = 0
    iterative_prompts: int = 0  # training prompts per round (a seeded order, a new pass after each); 0: all, every round
    iterative_reference: str = "previous"  # previous: each round's starting policy | initial: the first model


@dataclass
class EvalConfig:
    do_eval: bool = True  # held-out preference metrics (eval/*)
    generation_prompts: int = 0  # held-out prompts generated by policy before and after training (0: none)
    max_new_tokens: int = 48  # the longest held-out answer, in tokens
    # Scorer of the generated answers (dpo_accel/evaluation/scorers.py): arith | geo | exact_match | regex | length, or
    # module:function (a module or a .py path; func(prompts, answers[, rows]) -> {name: number}); null: answer length
    behaviour: Optional[str] = None
    behaviour_regex: Optional[str] = None  # the pattern every answer must match in full, for behaviour: regex
    temperature: float = 0.0  # sampling temperature of the held-out generations; 0: greedy
    top_p: float = 1.0  # nucleus sampling of the held-out generations (with temperature > 0)
    num_return_sequences: int = 1  # answers per held-out prompt (more than 1 needs temperature > 0)
    generation_seed: Optional[int] = None  # seed of the sampled generations (null: train.seed); before and after share it
    # Local dir or hub id of an AutoModelForSequenceClassification reward model (one label) judging the held-out
    # answers after vs before training and vs the chosen answers (dpo_accel/evaluation/judge.py); null: no judging
    reward_model: Optional[str] = None
    reward_batch_size: int = 16  # (prompt, answer) rows per reward-model forward


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "reference.mode": ("auto", "copy", "adapter_off", "precomputed", "none"),
    "data.format": ("auto", "explicit", "conversational", "implicit", "hh", "sft", "unpaired"),
    "data.truncation_mode": ("keep_end", "keep_start"),
    "loss.f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
    "train.optimizer": ("adamw", "rmsprop"),
    "train.logps_path": ("auto", "lean", "full"),
    "train.lr_scheduler_type": ("linear", "cosine", "constant"),
    "train.mixed_precision": (None, "no", "bf16", "fp16"),
    "train.iterative_reference": ("previous", "initial"),
}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'train.learning_rate'."""
    keys = []
    for section, cls in typing.get_type_hints(Recipe).items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def validate(recipe: Recipe) -> Recipe:
    """Cross-field checks, each failing with one line that says what to change."""
    for key, allowed in CHOICES.items():
        section, leaf = key.split(".")
        value = getattr(getattr(recipe, section), leaf)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise RecipeError(f"recipe key '{key}' is {value!r}; choose one of: {shown}")
    d, t, l = recipe.data, recipe.train, recipe.loss
    check_numbers(recipe)
    if d.max_prompt_length >= d.max_length:
        raise RecipeError(
            f"data.max_prompt_length ({d.max_prompt_length}) must be smaller than data.max_length ({d.max_length})")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            raise RecipeError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise RecipeError("set train.max_steps > 0 or train.num_train_epochs > 0")
    if t.logps_chunk_size < 1 or (t.logps_chunk_mb is not None and t.logps_chunk_mb <= 0):
        raise RecipeError(f"train.logps_chunk_size must be >= 1 and train.logps_chunk_mb > 0 (or null); got "
                          f"{t.logps_chunk_size} and {t.logps_chunk_mb}")
    if t.pack_pairs and t.prefix_sharing is False:
        raise RecipeError("train.pack_pairs packs prefix-shared pairs; set train.prefix_sharing: null or true, "
                          "or train.pack_pairs: null")
    if t.padding_free and t.prefix_sharing is True:
        raise RecipeError("train.padding_free and train.prefix_sharing are exclusive; set one of them to false")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise RecipeError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.learning_rate <= 0:
        raise RecipeError(f"train.learning_rate must be positive, got {t.learning_rate}")
    if not 0.0 <= l.label_smoothing < 0.5:
        raise RecipeError(f"loss.label_smoothing must be in [0, 0.5), got {l.label_smoothing}")
    if l.beta <= 0:
        raise RecipeError(f"loss.beta must be positive, got {l.beta}")
    if isinstance(l.loss_type, list) and l.loss_weights is not None and len(l.loss_weights) != len(l.loss_type):
        raise RecipeError(
            f"loss.loss_weights has {len(l.loss_weights)} entries for {len(l.loss_type)} loss types; give one weight per type")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise RecipeError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if d.dataset_mixture is not None:
        from dpo_accel.config.mixture import parse_mixture

        parse_mixture(d.dataset_mixture)
        if d.eval_fraction > 0:
            raise RecipeError("data.eval_fraction does not apply to a mixture; set data.dataset_mixture.test_split_size")
    e = recipe.eval
    if e.temperature < 0 or not 0.0 < e.top_p <= 1.0:
        raise RecipeError(f"eval.temperature must be >= 0 and eval.top_p in (0, 1], got {e.temperature} and {e.top_p}")
    if e.num_return_sequences < 1 or (e.num_return_sequences > 1 and e.temperature == 0):
        raise RecipeError(f"eval.num_return_sequences is {e.num_return_sequences}; use 1, or more with "
                          "eval.temperature > 0 (greedy answers would all be the same)")
    from dpo_accel.evaluation.scorers import resolve_scorer

    resolve_scorer(e.behaviour, e.behaviour_regex)  # a wrong scorer name, module or pattern stops here
    if t.push_to_hub and not t.hub_model_id:
        raise RecipeError("train.push_to_hub needs train.hub_model_id, e.g. 'your-name/smollm2-arith-dpo'")
    if recipe.reference.mode == "adapter_off" and not recipe.lora.use_peft:
        raise RecipeError("reference.mode 'adapter_off' needs lora.use_peft: true (or use reference.mode: copy)")
    if recipe.lora.use_peft and recipe.lora.lora_r < 1:
        raise RecipeError(f"lora.lora_r must be at least 1, got {recipe.lora.lora_r}")
    from dpo_accel.config.loop_checks import check_iterative, check_loop_kind, check_online

    # rounds reuse the online_* keys
    problem = (check_iterative(recipe) if t.iterative_rounds else check_online(recipe)) or check_loop_kind(recipe)
    if problem:
        raise RecipeError(problem)
    init = recipe.lora.init_adapter
    if init is not None and not os.path.isfile(os.path.join(init, "adapter_config.json")):
        raise RecipeError(f"lora.init_adapter '{init}' is not a peft adapter folder (no adapter_config.json); "
                          "point it at a LoRA run's <output_dir>/adapter")
    if init is not None and recipe.lora.use_peft and not t.export_merged:
        raise RecipeError("lora.init_adapter with lora.use_peft needs train.export_merged: true (the new adapter is "
                          "relative to base + init_adapter, so only the merged model/ is usable on its own)")
    return recipe


def check_numbers(recipe: Recipe) -> None:
    """Values that can only train NaN or never act: a non-finite number anywhere, an interval of 0 that
    would divide, a probability out of range, a negative seed, no tokenisation workers (one line each)."""
    import math

    for section, values in recipe_to_dict(recipe).items():
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{section}.{key} is {value}; only a finite number can train (a non-finite one "
                                  "makes every loss NaN)")
    t, lora = recipe.train, recipe.lora
    if t.logging_steps < 1:
        raise RecipeError(f"train.logging_steps must be at least 1 (log every N steps), got {t.logging_steps}")
    for key in ("eval_steps", "save_steps"):
        if getattr(t, key) < 0:
            raise RecipeError(f"train.{key} must be >= 0 (0: never), got {getattr(t, key)}")
    if t.max_nonfinite_steps < 1:
        raise RecipeError(f"train.max_nonfinite_steps must be at least 1, got {t.max_nonfinite_steps}")
    if not 0.0 <= lora.lora_dropout < 1.0:
        raise RecipeError(f"lora.lora_dropout must be in [0, 1), got {lora.lora_dropout}")
    if t.seed < 0:
        raise RecipeError(f"train.seed must be >= 0, got {t.seed}")
    if t.max_grad_norm < 0:
        raise RecipeError(f"train.max_grad_norm must be >= 0 (0: no clipping), got {t.max_grad_norm}")
    if recipe.data.dataloader_num_workers < 0:
        raise RecipeError(f"data.dataloader_num_workers must be 0 (collate in the training process) or more, "
                          f"got {recipe.data.dataloader_num_workers}")
    if recipe.data.num_proc is not None and recipe.data.num_proc < 1:
        raise RecipeError(f"data.num_proc must be null or at least 1 (tokenisation workers for datasets.map), "
                          f"got {recipe.data.num_proc}")


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: str) -> None:
    """Write the fully resolved recipe (every default spelled out) so a run can be repeated exactly."""
    with open(path, "w") as f:
        yaml.safe_dump(recipe_to_dict(recipe), f, sort_keys=False)
