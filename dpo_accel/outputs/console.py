"""The one way a run talks to its user: prefixed lines on stdout, from the main process only.

Every process runs the same code, so a message printed by each would appear once per process; `log`
prints on global rank 0 (the launcher's ``RANK``; a plain ``python`` run is rank 0). It needs no
Accelerator, so the start-up checks can speak before one exists.
"""
from __future__ import annotations

import os

LOG_PREFIX = "[dpo_accel]"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str, prefix: bool = True) -> None:
    """Print `message` on the main process; ``prefix=False`` for tables and other multi-line text."""
    if is_main_process():
        print(f"{LOG_PREFIX} {message}" if prefix else message, flush=True)
