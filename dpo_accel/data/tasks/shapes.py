"""The shipped image preference task: coloured shapes on a plain background, asked about in short questions whose
answers the picture settles.

Why this task: preference tuning of a vision-language model needs pairs whose right answer is checkable from
the image alone, small enough to ship and to run on a CPU. Each picture is a 32x32 RGB PNG, white, with 1-4
shapes (circle, square, triangle; red, green, blue or yellow), each inside its own quarter of the picture so
none overlap. Pairs always prefer the right answer in one short format over a wrong one or a rambling one.

Questions (chosen answer in the fixed format):
  count   "How many shapes are in the picture?"           -> "3."
  colour  "What colour is the square?" (one square only)  -> "Red."
  shape   "What shape is the blue one?" (one blue only)   -> "Circle."

Row kinds of the rejected answer:
  wrong_concise    the chosen format with a wrong value
  verbose_correct  a rambling answer ending with the right value
  verbose_wrong    a rambling answer ending with a wrong value

Pictures and rows come from `random.Random(seed)` and PIL's ImageDraw (no antialiasing), so
``python scripts/make_shapes_dataset.py`` rewrites byte-identical files. The files are TRL's vision
preference format: a conversational prompt with an ``{"type": "image"}`` part, assistant-message answers and
``images``, paths relative to the JSONL file (dpo_accel/data/vision.py loads them).
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import Optional

from dpo_accel.data.tasks.common import behaviour_rates, pick_kind

SIZE = 32
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
PHRASINGS = {
    "count": ("How many shapes are in the picture?", "How many shapes do you see?",
              "Count the shapes in the image.", "How many shapes are there?"),
    "colour": ("What colour is the {shape}?", "Which colour is the {shape} in the picture?",
               "What is the colour of the {shape}?"),
    "shape": ("What shape is the {colour} one?", "Which shape is {colour}?",
              "What is the {colour} shape in the picture?"),
}
# Rambling answers; each ends with the value as the last word of its kind, so `score_answer` reads it.
VERBOSE = {
    "count": ("Looking at the picture carefully, I can see some shapes on a white background. Counting them one "
              "by one, the total comes to {v}. So the answer is {v}.",
              "Sure! Let me count the shapes in the image. After checking each corner of the picture, I find "
              "that the number of shapes is {v}."),
    "colour": ("Let me look at the picture. The {shape} stands out against the white background, and its "
               "colour appears to be {v}. So the {shape} is {v}.",
               "Great question! Colours can be hard to tell in small images, but looking closely at the {shape}, "
               "I would say it is {v}."),
    "shape": ("Looking at the image, the {colour} shape has a distinctive outline. Judging by its edges, it "
              "looks like a {v}. So the answer is {v}.",
              "Sure! There are a few shapes in the picture. The one drawn in {colour} seems to be a {v}."),
}
KIND_WEIGHTS = (("wrong_concise", 0.4), ("verbose_correct", 0.3), ("verbose_wrong", 0.3))
QUESTION_WEIGHTS = (("count", 0.4), ("colour", 0.3), ("shape", 0.3))


def make_picture(rng: random.Random) -> tuple:
    """1-4 shapes as (quarter, shape, colour, size, dx, dy) tuples, sorted by quarter (0..3)."""
    quarters = sorted(rng.sample(range(4), rng.randint(1, 4)))
    out = []
    for q in quarters:
        size = rng.randint(9, 13)
        out.append((q, rng.choice(SHAPES), rng.choice(sorted(COLOURS)), size,
                    rng.randint(1, 15 - size), rng.randint(1, 15 - size)))
    return tuple(out)


def draw(picture: tuple):
    """The PIL image of a picture: each shape in its quarter, offset (dx, dy) from the quarter's corner."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    half = SIZE // 2
    for q, shape, colour, size, dx, dy in picture:
        x0, y0 = (q % 2) * half + dx, (q // 2) * half + dy
        x1, y1 = x0 + size - 1, y0 + size - 1
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def ask(picture: tuple, rng: random.Random) -> tuple[str, str, dict]:
    """(question kind, question text, template fields) of a question the picture answers unambiguously."""
    shapes = [s for _, s, _, _, _, _ in picture]
    colours = [c for _, _, c, _, _, _ in picture]
    kind = pick_kind(rng, QUESTION_WEIGHTS)
    unique_shapes = sorted(s for s in set(shapes) if shapes.count(s) == 1)
    unique_colours = sorted(c for c in set(colours) if colours.count(c) == 1)
    if kind == "colour" and unique_shapes:
        shape = rng.choice(unique_shapes)
        fields = {"shape": shape, "truth": colours[shapes.index(shape)]}
    elif kind == "shape" and unique_colours:
        colour = rng.choice(unique_colours)
        fields = {"colour": colour, "truth": shapes[colours.index(colour)]}
    else:
        kind, fields = "count", {"truth": str(len(picture))}
    return kind, rng.choice(PHRASINGS[kind]).format(**fields), fields


def concise(value: str) -> str:
    """The one accepted format: ``"3."``, ``"Red."``, ``"Circle."``."""
    return f"{value.capitalize()}."


def wrong_value(kind: str, truth: str, rng: random.Random) -> str:
    pool = [str(n) for n in range(1, 6)] if kind == "count" else sorted(COLOURS) if kind == "colour" else list(SHAPES)
    return rng.choice([v for v in pool if v != truth])


def make_pair(picture: tuple, image_path: str, rng: random.Random) -> dict:
    """One row in TRL's vision format plus its rejected `kind` (kept out of the files)."""
    question, text, fields = ask(picture, rng)
    truth = fields["truth"]
    kind = pick_kind(rng, KIND_WEIGHTS)
    if kind == "wrong_concise":
        rejected = concise(wrong_value(question, truth, rng))
    else:
        value = truth if kind == "verbose_correct" else wrong_value(question, truth, rng)
        rejected = rng.choice(VERBOSE[question]).format(v=value, **{k: v for k, v in fields.items() if k != "truth"})
    return {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": concise(truth)}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            "images": [image_path], "kind": kind}


def make_pairs(n_train: int = 800, n_eval: int = 96, seed: int = 0) -> tuple[list, list, dict]:
    """(train rows, held-out rows, {relative image path: picture}). No picture appears twice, so the held-out
    pictures are unseen in training."""
    rng = random.Random(seed)
    seen, rows, pictures = set(), {"train": [], "test": []}, {}
    for split, n in (("train", n_train), ("test", n_eval)):
        while len(rows[split]) < n:
            picture = make_picture(rng)
            if picture in seen:
                continue
            seen.add(picture)
            path = f"images/{split}_{len(rows[split]):04d}.png"
            pictures[path] = picture
            rows[split].append(make_pair(picture, path, rng))
    return rows["train"], rows["test"], pictures


def write_dataset(out_dir: str, n_train: int = 800, n_eval: int = 96, seed: int = 0) -> dict:
    """Write train.jsonl, test.jsonl and images/*.png under `out_dir` (ASCII, "\\n" line ends, fixed key
    order, stale pictures of an earlier run removed); return each split's count of every rejected kind."""
    train, test, pictures = make_pairs(n_train, n_eval, seed)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    for name in sorted(os.listdir(image_dir)):
        if name.endswith(".png") and f"images/{name}" not in pictures:
            os.remove(os.path.join(image_dir, name))
    for path, picture in pictures.items():
        draw(picture).save(os.path.join(out_dir, path), format="PNG", optimize=True)
    counts: dict = {}
    for split, rows in (("train", train), ("test", test)):
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected", "images")},
                                   ensure_ascii=True) + "\n")
                counts.setdefault(split, {}).setdefault(row["kind"], 0)
                counts[split][row["kind"]] += 1
    return counts


# ------------------------------------------------------------------------------------------- scoring

def answer_text(value) -> str:
    """An answer as text: a string, or the last message of a conversation (string content or text parts)."""
    if isinstance(value, list):
        content = value[-1]["content"] if value else ""
        if isinstance(content, list):
            return "".join(p.get("text") or "" for p in content if p.get("type") == "text")
        return str(content)
    return str(value)


def _vocabulary(truth: str) -> tuple[str, dict]:
    """(question kind, {word: value}) of a right answer's kind, read off the answer itself."""
    value = truth.strip().rstrip(".").lower()
    if value.isdigit():
        return "count", {**{str(n): str(n) for n in range(0, 10)}, **{w: str(n) for w, n in NUMBER_WORDS.items()}}
    if value in COLOURS:
        return "colour", {c: c for c in COLOURS}
    if value in SHAPES:
        return "shape", {s: s for s in SHAPES}
    raise ValueError(f"{truth!r} is not a shapes answer (a count, a colour or a shape)")


def score_answer(truth: str, answer: str) -> dict:
    """Score one answer against the right one (the row's chosen answer, e.g. "3." or "Red.").

    format:  the answer is exactly the value in the fixed format ("3.", "Red.", "Circle."; the period and
             surrounding whitespace optional)
    correct: the value read equals the right one; outside the format, the last word of the question's
             kind in the answer (a digit or number word, a colour, a shape) is read
    value:   the value read (None when there is none)
    """
    kind, words = _vocabulary(truth)
    right = truth.strip().rstrip(".").lower()
    m = re.fullmatch(r"\s*(\d|[A-Z][a-z]+)\.?\s*", answer)
    in_format = m is not None and m.group(1).lower() in words and (kind == "count") == m.group(1).isdigit()
    value: Optional[str] = None
    if in_format:
        value = words[m.group(1).lower()]
    else:
        found = [w for w in re.findall(r"[a-z]+|\d+", answer.lower()) if w in words]
        value = words[found[-1]] if found else None
    return {"format": in_format, "correct": value == right, "value": value}


def behaviour_summary(answers: list[str], rows: list) -> dict:
    """Rates over generations to held-out rows (one row per answer; its chosen answer is the right one):
    format_rate, correct_rate (0..1), mean_answer_words, n."""
    return behaviour_rates([answer_text(r["chosen"]) for r in rows], answers, score_answer)
