"""The step engine: the one place where a run counts, takes, skips, logs, evaluates and checkpoints its
optimizer steps, for every way of training (offline DPO and KTO, reward models, online DPO).

A loop kind supplies three things (`LoopKind`): its micro-batches from the engine's data position, its
forward (model, objective, its own per-example metrics) returning the loss to backpropagate, and its
held-out evaluation. Everything else is here, so every ``train.*`` key the engine reads means the same for
every kind: ``logging_steps``, ``eval_steps``, ``save_steps``, ``max_grad_norm``, ``max_nonfinite_steps``,
and ``--resume`` (the step a run starts from is the checkpoint's; the kind's batches follow from it).

One optimizer step, read top-down in `Engine.train`::

    for micro-batch in the accumulation window:        # accelerator.accumulate
        loss = kind.forward(batch)                     # the kind's forward + objective
        accelerator.backward(loss)
    if every loss and the gradient norm are finite:    # one all-reduce: every process agrees
        clip, optimizer.step(), scheduler.step()
    else: skip (weights, optimizer, scheduler unchanged); too many in a row stop the run
    log every logging_steps | evaluate every eval_steps | checkpoint every save_steps
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Protocol

import torch
from tqdm.auto import tqdm

from dpo_accel.config.plan import Plan
from dpo_accel.outputs.checkpoints import NonFiniteError, load_checkpoint, save_checkpoint
from dpo_accel.outputs.console import log
from dpo_accel.outputs.metrics_log import log_metrics, truncate_metrics

__all__ = ["Engine", "LoopKind", "build_accelerator", "build_optimizer", "steps_per_epoch"]


class LoopKind(Protocol):
    """What a way of training supplies to the engine."""

    def batches(self, engine: "Engine") -> Iterator[tuple[int, dict]]:
        """Endless (epoch, micro-batch) pairs from the data position of ``engine.step``."""

    def forward(self, batch: dict) -> torch.Tensor:
        """The loss to backpropagate for one micro-batch; the kind keeps its own per-example metrics."""

    def collect(self, seconds: float) -> dict:
        """The metrics kept since the last call, over every process (a collective), for a log line."""

    def evaluate(self) -> Optional[dict]:
        """Held-out metrics (``eval/...``; a collective), or None where the run has no held-out split."""

    def progress(self, metrics: dict) -> dict:
        """What the progress bar shows of a logged step."""


def has_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def build_accelerator(plan: Plan):
    """The Accelerator for the plan's accumulation and precision, after the launch checks it allows."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from dpo_accel.model.distributed import check_launch

    t = plan.recipe.train
    project = ProjectConfiguration(project_dir=t.output_dir, logging_dir=os.path.join(t.output_dir, "logs"))
    kwargs = dict(gradient_accumulation_steps=plan.geometry.accumulation, log_with=t.report_to or None,
                  project_config=project)
    if t.mixed_precision is not None:
        kwargs["mixed_precision"] = t.mixed_precision
    if not has_accelerator_device():
        # The multi-process launcher does not pass a config's `use_cpu` on; without it two CPU
        # ranks would each run alone instead of forming one gloo group.
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    check_launch(accelerator, plan.geometry.processes)
    return accelerator


def build_optimizer(recipe, model, num_training_steps: int):
    """AdamW or RMSprop over the trainable parameters, and the warmup + decay schedule."""
    from transformers import get_scheduler

    t = recipe.train
    params = parameter_groups(model, t.weight_decay)
    if t.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(params, lr=t.learning_rate)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate)
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * num_training_steps)
    name = {"constant": "constant_with_warmup"}.get(t.lr_scheduler_type, t.lr_scheduler_type)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps)
    return optimizer, scheduler


# Parameters never decayed, as the HF Trainer has it: biases and normalisation weights (a decayed norm scale or
# bias pulls the layer towards zero output instead of regularising it).
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: decayed by `weight_decay`, and biases and norm weights (never)."""
    from transformers.trainer_pt_utils import get_parameter_names

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not weight_decay:  # one group, as a checkpoint written without decay holds
        return [{"params": [p for _, p in named], "weight_decay": 0.0}]
    decayed = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
    groups = [{"params": [p for n, p in named if n in decayed], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def steps_per_epoch(plan: Plan, loader_batches: int) -> int:
    """Optimizer steps in one pass over a (not yet prepared) loader of `loader_batches` micro-batches."""
    g = plan.geometry
    return math.ceil(math.ceil(loader_batches / g.processes) / g.accumulation)


@dataclass
class Engine:
    """A run's optimizer, schedule and position; `train` takes the steps from ``step`` to ``max_steps``."""

    plan: Plan
    accelerator: Any
    model: Any  # prepared
    optimizer: Any  # prepared
    scheduler: Any  # stepped here, once per optimizer step
    steps_per_epoch: int
    max_steps: int
    train_fingerprint: str  # of the tokenised training data, checked on --resume
    base: Optional[str] = None  # fingerprint of the frozen base when checkpoints hold the trainable weights only
    step: int = 0  # optimizer steps taken
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0
    last_log: float = 0.0  # when the last line was logged: the rates of the next line count from it

    @classmethod
    def prepare(cls, plan: Plan, accelerator, model, train_loader, epoch_steps: int, fingerprint: str,
                base: Optional[str] = None):
        """Optimizer and schedule sized from the plan, model / optimizer / loader prepared; returns the engine
        and the prepared loader. The resume comes later (`resume`), once every model to restore is prepared."""
        t = plan.recipe.train
        max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * epoch_steps)
        optimizer, scheduler = build_optimizer(plan.recipe, model, max_steps)
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        accelerator.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step
        engine = cls(plan, accelerator, model, optimizer, scheduler, epoch_steps, max_steps, fingerprint, base)
        return engine, train_loader

    def resume(self) -> int:
        """The step the run starts from: the --resume checkpoint's (its state loaded into the prepared
        objects), else 0; the metrics log is cut back to it (a run killed before its first checkpoint restarts
        at 0)."""
        if self.plan.resume_from is not None:
            self.step = int(load_checkpoint(self.accelerator, self.plan.resume_from, self.base)["global_step"])
            log(f"resumed at step {self.step}")
        if self.accelerator.is_main_process:
            truncate_metrics(self.plan.recipe.train.output_dir, self.step)
        return self.step

    def fixed_batches(self, loader, sampler) -> Iterator[tuple[int, dict]]:
        """(epoch, micro-batch) of a fixed dataset from the data position of ``self.step``, epoch after epoch.

        The prepared loader sets its sampler's epoch from its own iteration counter when it starts (a fresh
        process counts from 0, a skip_first_batches copy keeps the count it was made with): both are set to
        the epoch of the step, and a resumed run skips the micro-batches its steps already took."""
        while True:
            epoch = self.step // self.steps_per_epoch
            sampler.set_epoch(epoch)
            skip = (self.step % self.steps_per_epoch) * self.plan.geometry.accumulation
            epoch_loader = self.accelerator.skip_first_batches(loader, skip) if skip else loader
            epoch_loader.set_epoch(epoch)
            for batch in epoch_loader:
                yield epoch, batch

    def train(self, kind: LoopKind) -> None:
        """Optimizer steps from ``self.step`` to ``self.max_steps``."""
        accelerator, bad = self.accelerator, None
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not accelerator.is_main_process, desc="train")
        self.last_log, grad_norm = time.perf_counter(), torch.tensor(0.0)
        self.model.train()
        batches = kind.batches(self)
        try:
            while self.step < self.max_steps:
                epoch, batch = next(batches)
                if bad is None:  # a new accumulation window: its count of non-finite losses (no sync per micro-step)
                    bad = torch.zeros((), device=accelerator.device)
                with accelerator.accumulate(self.model):
                    loss = kind.forward(batch)
                    bad = bad + (~torch.isfinite(loss.detach())).float()
                    accelerator.backward(loss)
                    grad_norm, skipped = self.step_if_finite(bad, grad_norm)
                if accelerator.sync_gradients:
                    bad = None
                    self.finish_step(kind, skipped, grad_norm, epoch, bar)
        finally:
            batches.close()
            bar.close()

    def step_if_finite(self, window_bad, grad_norm) -> tuple:
        """Inside `accelerator.accumulate`, after the backward: at the end of an accumulation window clip and
        take the optimizer step unless a loss of the window (`window_bad` counts them) or the gradient norm was
        not finite (then only the gradients are dropped). Inside the window Accelerate's step is a no-op.
        Returns (the latest gradient norm, whether the step was skipped)."""
        skipped = False
        if self.accelerator.sync_gradients:
            max_norm = self.plan.recipe.train.max_grad_norm or float("inf")
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
            skipped = not all_finite(self.accelerator, window_bad, grad_norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad()
        return grad_norm, skipped

    def finish_step(self, kind: LoopKind, skipped: bool, grad_norm, epoch: int, bar) -> None:
        """After an optimizer step (taken or skipped): the schedule, then log, evaluate and checkpoint on
        their intervals."""
        t = self.plan.recipe.train
        lr = self.scheduler.get_last_lr()[0]
        self.step += 1
        bar.update(1)
        if skipped:
            self.skip_step(kind, grad_norm, lr, epoch, bar)
        else:
            self.scheduler.step()
            self.nonfinite_in_a_row = 0
            if self.step % t.logging_steps == 0 or self.step == self.max_steps:
                metrics = {**kind.collect(time.perf_counter() - self.last_log), "grad_norm": float(grad_norm),
                           "learning_rate": lr, "epoch": epoch}
                self.log(metrics)
                bar.set_postfix(kind.progress(metrics))
        if t.eval_steps and self.step % t.eval_steps == 0 and self.step < self.max_steps:
            metrics = kind.evaluate()
            if metrics is not None:
                self.log(metrics)
        if t.save_steps and self.step % t.save_steps == 0:
            self.checkpoint(epoch)

    def skip_step(self, kind: LoopKind, grad_norm, lr: float, epoch: int, bar) -> None:
        """A step whose loss or gradient norm was not finite: nothing changed (weights, optimizer, scheduler),
        the data position moved on. Logged on its own line; too many in a row stop the run."""
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        metrics = kind.collect(time.perf_counter() - self.last_log)  # every process skipped: a collective is safe
        self.log({**metrics, "grad_norm": float(grad_norm), "learning_rate": lr, "epoch": epoch, "skipped": True,
                  "nonfinite_steps": self.nonfinite_steps})
        t = self.plan.recipe.train
        limit = t.max_nonfinite_steps
        log(f"step {self.step}: loss or gradient norm not finite (grad norm {float(grad_norm)}); step skipped, "
            f"weights, optimizer and scheduler unchanged ({self.nonfinite_in_a_row} in a row, "
            f"train.max_nonfinite_steps {limit})")
        if self.nonfinite_in_a_row >= limit:
            bar.close()  # the error line below it, not inside it
            raise NonFiniteError(
                f"{limit} optimizer steps in a row (to step {self.step}) had a non-finite loss or gradient norm; "
                f"the run stopped with its weights from before them (last checkpoint in {t.output_dir}/checkpoints)"
                "; lower train.learning_rate or loss.beta, or raise train.max_nonfinite_steps")

    def log(self, metrics: dict) -> None:
        """One line of metrics at the current step (trackers and metrics.jsonl); restarts the rate clock."""
        log_metrics(self.accelerator, self.plan.recipe.train.output_dir, metrics, self.step)
        self.last_log = time.perf_counter()

    def checkpoint(self, epoch: int) -> None:
        """Checkpoint after optimizer step ``self.step`` (every process calls it: saving is collective)."""
        t = self.plan.recipe.train
        state = {"global_step": self.step, "epoch": epoch, "steps_per_epoch": self.steps_per_epoch,
                 "num_processes": self.plan.geometry.processes, "train_fingerprint": self.train_fingerprint,
                 "weights": "full" if self.base is None else "trainable", "base_fingerprint": self.base}
        save_checkpoint(self.accelerator, t.output_dir, state, self.plan.recipe, t.save_total_limit, self.model)
        self.last_log = time.perf_counter()


def all_finite(accelerator, window_bad, grad_norm) -> bool:
    """Whether every process's losses in this accumulation window and the gradient norm are finite: one
    all-reduce, so every process skips the same steps. (Under DeepSpeed the engine steps inside backward:
    a non-finite step is counted and stops the run after train.max_nonfinite_steps, but is not undone.)"""
    # DeepSpeed may not report a norm (None): then the losses decide. FSDP2 returns a DTensor, which a plain
    # all-reduce refuses: take its full (replicated) value first.
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    norm = torch.tensor(0.0 if grad_norm is None else float(grad_norm), device=window_bad.device)
    bad = window_bad + (~torch.isfinite(norm)).float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return float(bad) == 0
