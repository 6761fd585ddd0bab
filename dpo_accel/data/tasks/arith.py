"""The shipped preference task: two-digit addition answered concisely and correctly.

Why this task: SmolLM2-135M-Instruct answers "What is 17 + 25?" with "17 + 25 = 32." (the carry is
dropped) or with a rambling paragraph. Preference pairs that always prefer the exact answer
"17 + 25 = 42." over a wrong result or a verbose answer give DPO a signal that is measurable in a
few minutes: the rate of answers in the concise format and the rate of correct sums
(`behaviour_summary`).

Everything here is pure Python and seeded (`random.Random(seed)`), so `make_pairs` gives the same
rows on every machine and Python version (3.2+ `random` is stable for a given seed), and the files
written by ``python scripts/make_arith_dataset.py --out data/arith_prefs`` are byte-identical.

Row kinds of the rejected answer (chosen is always ``"{a} + {b} = {a+b}."``):
  wrong_concise   the chosen format with a wrong result (carry dropped, off by 1/2/10, digits swapped)
  verbose_correct a correct but rambling answer
  verbose_wrong   a rambling answer with a wrong result
"""
from __future__ import annotations

import random
import re
from typing import Optional

from dpo_accel.data.tasks.common import behaviour_rates, pick_kind

PHRASINGS = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Calculate {a} + {b}.",
    "What do you get if you add {a} and {b}?",
    "Find the sum of {a} and {b}.",
    "{a} + {b} = ?",
)

# Rambling answers; each ends with the result as its last number, so `score_answer` reads it.
VERBOSE_TEMPLATES = (
    "Sure! To add {a} and {b}, we combine the two numbers. Adding them together carefully, "
    "we get {s}. So the answer is {s}.",
    "Great question! Let's work it out step by step. First we take {a}, and then we add {b} to it. "
    "After adding, the total comes to {s}. Therefore, the answer is {s}.",
    "Of course! Adding numbers is a basic arithmetic operation. When you add {a} and {b}, "
    "you get a total of {s}. I hope this helps! The final answer is {s}.",
    "Let me help you with that. The sum of {a} and {b} can be found by adding the tens and the "
    "ones separately and then combining them. Doing this, we find that the sum is {s}.",
)
# Spells out the column addition, so it is only used with the correct result.
STEPWISE_TEMPLATE = (
    "Sure! To add {a} and {b}, start with the ones: {a1} + {b1} = {ones}. {carry_text}"
    "Then add the tens: {tens_text}. Putting it together, the answer is {s}."
)

KIND_WEIGHTS = (("wrong_concise", 0.4), ("verbose_correct", 0.3), ("verbose_wrong", 0.3))
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def concise_answer(a: int, b: int, result: Optional[int] = None) -> str:
    """The one accepted format: ``"17 + 25 = 42."``."""
    return f"{a} + {b} = {a + b if result is None else result}."


def wrong_result(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong sum: the carry dropped (the base model's own mistake), off by 1, 2 or 10,
    or the last two digits swapped. Never equal to a + b, never negative."""
    s = a + b
    candidates = []
    no_carry = (a % 10 + b % 10) % 10 + 10 * (a // 10 + b // 10)
    if no_carry != s:
        candidates.append(no_carry)
    candidates += [s + d for d in (-10, -2, -1, 1, 2, 10) if s + d > 0]
    digits = str(s)
    swapped = int(digits[:-2] + digits[-1] + digits[-2])
    if swapped != s:
        candidates.append(swapped)
    return rng.choice(candidates)


def verbose_answer(a: int, b: int, result: int, rng: random.Random) -> str:
    """A rambling answer ending with `result`; the step-by-step form only when `result` is right."""
    if result == a + b and rng.random() < 0.25:
        ones = a % 10 + b % 10
        carry = ones // 10
        carry_text = f"Write {ones % 10} and carry the 1. " if carry else ""
        tens_text = f"{a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {a // 10 + b // 10 + carry}"
        return STEPWISE_TEMPLATE.format(a=a, b=b, a1=a % 10, b1=b % 10, ones=ones, carry_text=carry_text,
                                        tens_text=tens_text, s=result)
    return rng.choice(VERBOSE_TEMPLATES).format(a=a, b=b, s=result)


def make_pair(a: int, b: int, rng: random.Random) -> dict:
    """One preference row {prompt, chosen, rejected} plus its `kind` (kept out of the files)."""
    prompt = rng.choice(PHRASINGS).format(a=a, b=b)
    kind = pick_kind(rng, KIND_WEIGHTS)
    if kind == "wrong_concise":
        rejected = concise_answer(a, b, wrong_result(a, b, rng))
    elif kind == "verbose_correct":
        rejected = verbose_answer(a, b, a + b, rng)
    else:
        rejected = verbose_answer(a, b, wrong_result(a, b, rng), rng)
    return {"prompt": prompt, "chosen": concise_answer(a, b), "rejected": rejected, "kind": kind}


def make_pairs(n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows). Operands are 10..99; no unordered operand pair {a, b} appears in
    both splits (nor twice in one), so eval questions are unseen in any phrasing or order."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    chosen_pairs, seen = [], set()
    for a, b in pairs:
        key = (min(a, b), max(a, b))
        if key in seen:
            continue
        seen.add(key)
        chosen_pairs.append((a, b))
        if len(chosen_pairs) == n_train + n_eval:
            break
    if len(chosen_pairs) < n_train + n_eval:
        raise ValueError(f"only {len(chosen_pairs)} distinct operand pairs exist; ask for fewer rows")
    rows = [make_pair(a, b, rng) for a, b in chosen_pairs]
    return rows[:n_train], rows[n_train:]


def write_dataset(out_dir: str, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> dict:
    """Write train.jsonl and eval.jsonl under `out_dir`; return the counts of each rejected kind."""
    from dpo_accel.outputs.files import write_pair_splits

    train, eval_ = make_pairs(n_train, n_eval, seed)
    return write_pair_splits(out_dir, {"train": train, "eval": eval_})


def operands(prompt: str) -> tuple[int, int]:
    """The two operands of a question: its first two integers ("Add 17 and 25." -> (17, 25))."""
    nums = re.findall(r"\d+", prompt)
    if len(nums) < 2:
        raise ValueError(f"prompt {prompt!r} does not contain two operands")
    return int(nums[0]), int(nums[1])


def score_answer(prompt: str, answer: str) -> dict:
    """Score one generated answer to an addition prompt.

    format:  the answer is exactly "a + b = N." (operands in the prompt's order; the final period
             and surrounding whitespace optional, N any integer)
    correct: N == a + b when the format matches; otherwise the last number in the answer == a + b
    value:   the number read (None when the answer has no number)
    """
    a, b = operands(prompt)
    m = re.fullmatch(rf"\s*{a} \+ {b} = (-?\d+)\.?\s*", answer)
    if m:
        value: Optional[float] = int(m.group(1))
    else:
        nums = _NUMBER.findall(answer)
        value = float(nums[-1]) if nums else None
        if value is not None and value.is_integer():
            value = int(value)
    return {"format": m is not None, "correct": value is not None and value == a + b, "value": value}


def behaviour_summary(prompts: list[str], answers: list[str]) -> dict:
    """Rates over a set of generations: format_rate, correct_rate (0..1), mean_answer_words, n."""
    return behaviour_rates(prompts, answers, score_answer)
