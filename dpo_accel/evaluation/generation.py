"""Generation by the policy being trained: held-out answers with their behaviour scores, and the online loop's
sampled answers. A policy sharded by FSDP2 or ZeRO-3 is gathered into one plain copy on the main process
first (`gathered_policy`), which generates for every process: a sharded forward needs every process, and
generation runs a different number of forwards per prompt batch. A replica generates as it is. A
vision-language policy answers image prompts through its processor (`vision_generation_report`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import torch

from dpo_accel.model.distributed import gathered_copy, is_sharded, one_process_zero3_off
from dpo_accel.outputs.console import log

__all__ = ["Sampled", "behaviour_scores", "generate_answers", "generate_on_every_process", "generate_vision_answers",
           "generation_report", "vision_generation_report"]


def gathered_policy(accelerator, model):
    """The HF model inside the prepared log-prob module `model`, ready to generate: itself when every process
    holds its whole weights, else (FSDP2, ZeRO-3) a plain copy of the gathered weights on the main process
    and None on the others. Every process must call it (the gather is a collective)."""
    hf_model = accelerator.unwrap_model(model).model
    if not is_sharded(hf_model):
        return hf_model
    state = {k[len("model."):]: v for k, v in (accelerator.get_state_dict(model) or {}).items()
             if k.startswith("model.")}  # a collective; ZeRO-3 returns it on the main process only
    return gathered_copy(hf_model, state).to(accelerator.device) if accelerator.is_main_process else None


def main_process_answers(accelerator, model, generate, what: str = "") -> Optional[tuple]:
    """(answers, seconds) of ``generate(hf_model)`` on the main process, None on the others: the policy is
    gathered where it is sharded, and ZeRO-3's collectives are off while only this process generates. Every
    process must call it."""
    hf_model = gathered_policy(accelerator, model)
    done = None
    if accelerator.is_main_process:
        start = time.perf_counter()
        with one_process_zero3_off():  # only this process generates
            answers = generate(hf_model)
        seconds = time.perf_counter() - start
        log(f"generated {len(answers)} held-out answers{what} in {seconds:.1f} s")
        done = answers, seconds
    accelerator.wait_for_everyone()
    return done


def generation_report(accelerator, model, tokenizer, prompts: list, max_new_tokens: int,
                      behaviour: Optional[str], sampling: Optional[dict] = None, rows: Optional[list] = None,
                      regex: Optional[str] = None) -> dict:
    """Answers (greedy, or sampled per `sampling`: generate_answers' keywords) of the prepared policy to
    held-out `prompts`, their behaviour scores (`rows`: the prompts' held-out rows, for scorers that read
    them, and saved as each sample's chosen answer), on the main process ({} on the others). Every process
    must call it; only the main process generates."""
    if not prompts:
        return {}
    done = main_process_answers(accelerator, model, lambda m: generate_answers(
        m, tokenizer, prompts, max_new_tokens, autocast=accelerator.autocast, **(sampling or {})))
    if done is None:
        return {}
    answers, seconds = done
    k = len(answers) // len(prompts)  # num_return_sequences: each prompt's answers are consecutive
    prompts, rows = [p for p in prompts for _ in range(k)], rows and [r for r in rows for _ in range(k)]
    return {"scores": behaviour_scores(behaviour, prompts, answers, rows, regex), "seconds": seconds,
            "samples": [{"prompt": p, "answer": a, **({"chosen": rows[i]["chosen"]} if rows else {})}
                        for i, (p, a) in enumerate(zip(prompts, answers))]}


def generate_on_every_process(accelerator, model, tokenizer, prompts: list, max_new_tokens: int, seed: int,
                              **sampling) -> list[str]:
    """This process's answers to its own `prompts` (`seed`: its own sampling seed). A replica generates them
    itself; a sharded policy is gathered onto the main process, which generates every process's prompts
    with each one's seed, and each process gets its own answers back: the same answers as a replica."""
    own = accelerator.unwrap_model(model).model
    if not is_sharded(own):
        return generate_answers(own, tokenizer, prompts, max_new_tokens, autocast=accelerator.autocast, seed=seed,
                                **sampling)
    hf_model = gathered_policy(accelerator, model)
    from accelerate.utils import broadcast_object_list, gather_object

    requests = gather_object([(prompts, seed)])  # one (prompts, seed) per process, in rank order
    answers = [None] * len(requests)
    if accelerator.is_main_process:
        with one_process_zero3_off():
            answers = [generate_answers(hf_model, tokenizer, p, max_new_tokens, autocast=accelerator.autocast,
                                        seed=s, **sampling) for p, s in requests]
    broadcast_object_list(answers)
    return answers[accelerator.process_index]


@torch.no_grad()
def generation_context(autocast=None) -> contextlib.ExitStack:
    """The run's autocast, and eager execution: a compiled decoder (train.torch_compile) serves the training
    forward, while generate's one-token steps at ever new lengths would recompile it again and again."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.compiler.set_stance("force_eager"))
    if autocast is not None:
        stack.enter_context(autocast())
    return stack


def generate_answers(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 16,
                     autocast=None, temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1,
                     seed: int = 0, return_tokens: bool = False) -> list:
    """Answers (decoded, special tokens dropped, stripped) for `prompts`, tokenised exactly as in training
    (`data.tokenize.prompt_input_ids`) and left-padded in batches: greedy at temperature 0, else sampled
    (`num_return_sequences` per prompt, consecutive; seeded, the caller's RNG state left as it was).
    With `return_tokens`, each answer is a `Sampled`: its text, and the token ids the model sampled (up to
    and with its first stop token; none appended where it stopped for max_new_tokens)."""
    from dpo_accel.data.tokenize import prompt_input_ids

    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    device = next(model.parameters()).device
    answers = []
    sample = {"do_sample": False}
    if temperature > 0:
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p,
                  "num_return_sequences": num_return_sequences}
    # Sampling draws from its own seeded stream: the run's RNG state (and so its resume) is left as it was.
    stops = stop_tokens(model, tokenizer)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            for start in range(0, len(prompts), batch_size):
                rows = [prompt_input_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
                width = max(len(r) for r in rows)
                ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                with generation_context(autocast):
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                                         **sample)
                texts = [a.strip() for a in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
                if not return_tokens:
                    answers += texts
                    continue
                step = len(rows) and out.shape[0] // len(rows)  # num_return_sequences rows per prompt
                answers += [sampled(text, rows[i // step], out[i, width:].tolist(), stops)
                            for i, text in enumerate(texts)]
        finally:
            model.config.use_cache = use_cache
            model.train(was_training)
    return answers


@dataclass(frozen=True)
class Sampled:
    """One sampled answer as the model produced it: the prompt's ids as generation saw them, the answer's ids
    (with the stop token that ended it, if one did) and its text for scorers."""

    text: str
    prompt_ids: tuple
    answer_ids: tuple
    ended: bool  # a stop token ended it (False: max_new_tokens cut it off)


def sampled(text: str, prompt_ids: list, generated: list, stops: list) -> Sampled:
    """The answer's ids up to and with its first stop token (what follows it is padding)."""
    end = next((j for j, t in enumerate(generated) if t in stops), None)
    ids = generated if end is None else generated[:end + 1]
    return Sampled(text, tuple(prompt_ids), tuple(ids), end is not None)


def stop_tokens(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the model's own (its generation_config may list several, such as
    Llama-3's end of turn beside its end of text) and the tokenizer's EOS, which training appends."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    return sorted(set(own) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def behaviour_scores(name: Optional[str], prompts: list, answers: list[str], rows: Optional[list] = None,
                     regex: Optional[str] = None) -> dict[str, float]:
    """Measures of generated answers by the scorer `eval.behaviour` names (dpo_accel.evaluation.scorers)."""
    from dpo_accel.evaluation.scorers import behaviour_scores as score

    return score(name, prompts, answers, rows, regex)


# ------------------------------------------------------------------------------ vision-language models

def message_text(value, last_only: bool = False) -> str:
    """A prompt or an answer of vision rows as one line of text: a string as it is; messages by their text
    parts, an image part as ``[image]`` (`last_only`: the last message, an answer's)."""
    if isinstance(value, str):
        return value
    messages = value[-1:] if last_only else value
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
            continue
        parts += ["[image]" if p.get("type") == "image" else p.get("text") or "" for p in content or []]
    return " ".join(p.strip() for p in parts if p and p.strip())


def vision_prompt_batch(model, processor, rows: list) -> tuple[dict, int]:
    """(generate's inputs, padded width) for `rows`' prompts: each tokenised as in training
    (`data.vision.encode_vision_prompt`, its images through the processor), left-padded into one batch, the
    image tensors concatenated in row order (floating ones in the vision tower's dtype), on the model's device."""
    from dpo_accel.data.vision import as_tensor, concat_padded, encode_vision_prompt
    from dpo_accel.model.logps import unwrap_decoder

    hf_model = unwrap_decoder(model)
    device = next(model.parameters()).device
    image_dtype = next(hf_model.get_encoder(modality="image").parameters()).dtype
    encoded = [encode_vision_prompt(processor, row, i, "eval")[2:] for i, row in enumerate(rows)]
    width = max(len(ids) for ids, _, _ in encoded)
    pad = processor.tokenizer.pad_token_id

    def left(values: list, value: int) -> list:
        return [value] * (width - len(values)) + list(values)

    inputs = {"input_ids": torch.tensor([left(ids, pad) for ids, _, _ in encoded]),
              "attention_mask": torch.tensor([left([1] * len(ids), 0) for ids, _, _ in encoded])}
    for key in encoded[0][1]:  # per-token processor outputs (token_type_ids, ...), 0 on the padding
        inputs[key] = torch.tensor([left(types[key], 0) for _, types, _ in encoded])
    for key in sorted({k for _, _, images in encoded for k in images}):
        x = concat_padded([as_tensor(images[key]) for _, _, images in encoded if key in images])
        inputs[key] = x.to(image_dtype) if x.is_floating_point() else x
    return {k: v.to(device) for k, v in inputs.items()}, width


@torch.no_grad()
def generate_vision_answers(model, processor, rows: list, max_new_tokens: int, batch_size: int = 16, autocast=None,
                            temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1,
                            seed: int = 0) -> list[str]:
    """A vision-language model's answers (the answer only: decoded after the prompt, special tokens dropped,
    stripped) to the prompts of `rows` (vision rows: prompt messages and their images), greedy at
    temperature 0, else sampled as `generate_answers` samples (seeded, the caller's RNG state kept)."""
    tokenizer = processor.tokenizer
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    device = next(model.parameters()).device
    sample = {"do_sample": False}
    if temperature > 0:
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p,
                  "num_return_sequences": num_return_sequences}
    stops, answers = stop_tokens(model, tokenizer), []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            for start in range(0, len(rows), batch_size):
                inputs, width = vision_prompt_batch(model, processor, rows[start:start + batch_size])
                with generation_context(autocast):
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=stops, **sample)
                answers += [a.strip() for a in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        finally:
            model.config.use_cache = use_cache
            model.train(was_training)
    return answers


def vision_generation_report(accelerator, model, processor, rows: list, max_new_tokens: int,
                             behaviour: Optional[str], sampling: Optional[dict] = None,
                             regex: Optional[str] = None) -> dict:
    """`generation_report` for a vision-language policy: its answers to the image prompts of the held-out
    `rows` and their behaviour scores (the scorer reads the rows), on the main process ({} on the others).
    Every process must call it; only the main process generates."""
    if not rows:
        return {}
    done = main_process_answers(accelerator, model, lambda m: generate_vision_answers(
        m, processor, rows, max_new_tokens, autocast=accelerator.autocast, **(sampling or {})), " to image prompts")
    if done is None:
        return {}
    answers, seconds = done
    k = len(answers) // len(rows)  # num_return_sequences: each prompt's answers are consecutive
    rows = [r for r in rows for _ in range(k)]
    prompts = [message_text(r["prompt"]) for r in rows]
    samples = [{"prompt": p, "answer": a, "chosen": message_text(r["chosen"], last_only=True),
                "images": [v if isinstance(v, str) else "(in the dataset)" for v in r.get("images") or []]}
               for p, r, a in zip(prompts, rows, answers)]
    return {"scores": behaviour_scores(behaviour, prompts, answers, rows, regex), "seconds": seconds,
            "samples": samples}
