"""Atomic writes of files and folders: written under a temporary sibling name, then renamed into place;
and the JSON-lines writer of the shipped tasks' datasets.

A reader (``--resume``, the reference cache, the GGUF cache, a user loading ``model/``) then sees either
the old complete entry or the new complete one, never a half-written one from a run killed mid-save.
The temporary name sits in the same folder, so the rename never crosses filesystems.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator


def temp_path(final: str, unique: bool = False) -> str:
    """The temporary sibling of `final`: ``.tmp-<name>``; `unique` adds the process id, for writers that
    may race (several processes filling the same cache)."""
    head, name = os.path.split(os.path.abspath(final))
    return os.path.join(head, f".tmp-{name}" + (f"-{os.getpid()}" if unique else ""))


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def publish(tmp: str, final: str, replace: bool = True) -> bool:
    """Move the finished `tmp` onto `final`. With ``replace=False`` an existing `final` (another process
    finished first) is kept and `tmp` dropped. Returns whether `tmp` became `final`."""
    if os.path.lexists(final):
        if not replace:
            remove(tmp)
            return False
        if os.path.isdir(final):  # os.replace cannot replace a non-empty folder
            shutil.rmtree(final)
    os.replace(tmp, final)
    return True


@contextlib.contextmanager
def atomic_write(final: str, *, unique: bool = False, replace: bool = True) -> Iterator[str]:
    """``with atomic_write(path) as tmp:`` write a file or a folder at `tmp`; on success it becomes `path`,
    on an exception it is removed and `path` is untouched."""
    tmp = temp_path(final, unique)
    remove(tmp)  # left over by a run killed mid-write
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        yield tmp
        publish(tmp, final, replace)
    finally:
        remove(tmp)  # still there only when the write failed or lost the race


def write_pair_splits(out_dir: str, splits: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Write each split's rows as ``<split>.jsonl`` of {prompt, chosen, rejected} in a fixed key order, ASCII
    and "\\n" line ends, so a seeded task writes byte-identical files on every machine; returns each split's
    count of every rejected ``kind``."""
    os.makedirs(out_dir, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split, rows in splits.items():
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}, ensure_ascii=True) + "\n")
                counts.setdefault(split, {}).setdefault(row["kind"], 0)
                counts[split][row["kind"]] += 1
    return counts
