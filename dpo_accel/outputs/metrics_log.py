"""The run's metrics log (``metrics.jsonl`` beside the trackers) and strict JSON files.

Every line is strict JSON (a non-finite value becomes null and is named under ``nonfinite``), so any
parser reads the log of a run that met a NaN; a resume cuts the log back to its checkpoint's step.
"""
from __future__ import annotations

import json
import math
import os

from dpo_accel.outputs.files import atomic_write

__all__ = ["log_metrics", "read_json", "strict_json", "truncate_metrics", "write_json"]


def log_metrics(accelerator, output_dir: str, metrics: dict, step: int) -> None:
    """One step's metrics to the trackers and, on the main process, a line of ``metrics.jsonl``."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
            f.write(strict_json({"step": step, **metrics}) + "\n")


def strict_json(value, indent=None) -> str:
    """JSON any parser reads: a non-finite number becomes null and its key is listed under "nonfinite"
    (json.dumps would write the bare NaN / Infinity tokens that strict JSON has no room for)."""
    def clean(v):
        if isinstance(v, dict):
            bad = [k for k, x in v.items() if isinstance(x, float) and not math.isfinite(x)]
            out = {k: clean(x) for k, x in v.items()}
            if bad:
                out["nonfinite"] = sorted(set(out.get("nonfinite", [])) | set(bad))
            return out
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return json.dumps(clean(value), indent=indent, allow_nan=False)


def truncate_metrics(output_dir: str, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they are about to be redone) and a line torn
    by a kill; the kept lines are written to a new file renamed over the old, so a kill here loses nothing."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # the half-written last line of a killed run
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.writelines(kept)


def write_json(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(strict_json(value, indent=1))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
