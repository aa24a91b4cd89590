"""The one training loop. A task (DreamBooth, the text classifier) supplies the loss of a batch, an optional
evaluation and its outputs; the entry point builds the models, the optimizer and the data (a `Plan`). The loop
owns everything else, in the order it happens each step: accumulation, precision and backward, clipping, the
optimizer and scheduler step, the core's per-step hooks, the weights' EMA (`--use_ema`), the NaN stop, progress
and tracker logs, the evaluation cadence, the Stop signal, checkpoints, and the final outputs call. It never asks
which method or which task it trains."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

import dreamlora
from pipelines.trainer.checkpoints import register_adapter_hooks, restore_train_state, save_checkpoint
from pipelines.trainer.ema import AdapterEMA
from pipelines.trainer.launch import TrainingDiverged, check_distributed, stop_everywhere
from pipelines.trainer.optimizers import step_size_logs
from pipelines.trainer.progress import ProgressLog, run_environment
from pipelines.trainer.state import resumable_batches


@dataclass
class Plan:
    """What the entry point built for the loop to train (not yet through `accelerator.prepare`)."""

    models: dict[str, torch.nn.Module]
    """The components whose adapters train, by the name their checkpoint files carry (`unet`, `model`)."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loader: torch.utils.data.DataLoader
    select_epoch: Callable[[int], None]
    """Sets every seeded order and augmentation to epoch N (see `resumable_batches`)."""
    batches_per_epoch: int
    max_steps: int
    ema: AdapterEMA | None = None
    """The EMA of the trained weights (`pipelines.trainer.ema`), updated after each real optimizer step and kept
    in every checkpoint; None without --use_ema."""
    step_hooks: list[StepHook] = field(default_factory=list)
    """Weights with a step rule of their own (pivotal tuning's token rows: `pipelines.diffusion.pivotal`)."""


class StepHook(Protocol):
    """Called around each real optimizer step with its number (1-based, as `global_step` after it)."""

    def before_step(self, step: int) -> None:
        """After backward and the gradients' all-reduce, before clipping: a hook may drop gradients."""

    def after_step(self, step: int) -> None:
        """After an update that happened (not a skipped fp16 step), after the core's hooks, before the EMA."""


@dataclass
class RunResult:
    """How the run went, handed to the task's outputs (main process only)."""

    steps: int
    finished: bool
    wall_time_s: float
    train_time_s: float  # optimizer steps only: evaluation and checkpoints are not training time
    final_loss: float
    environment: dict  # `run_environment`: device, precision, world size, peak memory, resume point, versions


class Task(Protocol):
    """What a task supplies. `models` below are the prepared ones (what forward runs through)."""

    tracker_project: str
    evaluates: bool  # evaluate at the last step and every `eval_every` steps (None: at the last step only)
    eval_every: int | None
    checkpoint_at_end: bool  # also checkpoint the last step, whatever --checkpointing_steps says

    def start(self, models: dict[str, torch.nn.Module]) -> None:
        """Once, after the models are prepared and a resumed checkpoint is loaded (caches that need them)."""

    def loss(self, models: dict, batch, epoch: int, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task's loss of one micro-batch, and named parts to log as `train/<name>`."""

    def evaluate(self, models: dict, step: int, train_time_s: float) -> None:
        """Evaluate at optimizer step `step`; called on every process."""

    def write_outputs(self, result: RunResult) -> None:
        """Write the trained files and run.json (main process only)."""


def every(step: int, n: int | None) -> bool:
    return bool(n) and step % n == 0


def optimizer_step(accelerator, optimizer, lr_scheduler, params, max_grad_norm: float, models: Iterable,
                   total_steps: int | None = None, hooks: Iterable = (), step: int = 0) -> None:
    """Clip, step, schedule, then the core's per-step hook (SingLoRA's ramp; it gets the optimizer and the
    scheduler), then `hooks` (`StepHook`: pivotal tuning's rows, the EMA last, so it averages the weights the next
    step starts from), only on real updates: not during gradient accumulation, and not when the fp16 GradScaler
    skipped the step (inf/NaN gradients), which advances neither the ramp, the hooks' updates nor the LR schedule.
    The loop's `global_step` still counts such a step. `step`: the number of the step being taken."""
    if accelerator.sync_gradients:
        for hook in hooks:
            hook.before_step(step)
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    skipped = accelerator.sync_gradients and accelerator.optimizer_step_was_skipped
    if not skipped:
        lr_scheduler.step()  # accelerate's wrapper also holds still on a skipped step; this says so here
        if accelerator.sync_gradients:
            for model in models:
                dreamlora.on_optimizer_step(model, optimizer, lr_scheduler, total_steps)
            for hook in hooks:
                hook.after_step(step)
    optimizer.zero_grad(set_to_none=True)


def train(task: Task, plan: Plan, args, accelerator, stop_requested, resume_from: Path | None) -> int:
    """Train `plan` for `task` until `plan.max_steps` or a Stop, then write the task's outputs. `args` gives the
    loop's own flags: output_dir, progress_file, max_grad_norm, checkpointing_steps, checkpoints_total_limit."""
    output_dir, max_steps = Path(args.output_dir), plan.max_steps
    check_distributed(str(accelerator.distributed_type.value), list(plan.models))
    prepared = accelerator.prepare(*plan.models.values(), plan.optimizer, plan.loader, plan.lr_scheduler)
    models = dict(zip(plan.models, prepared[: len(plan.models)], strict=True))
    optimizer, loader, lr_scheduler = prepared[len(plan.models):]
    register_adapter_hooks(accelerator, plan.models)
    hooks = list(plan.step_hooks)
    if plan.ema is not None:
        plan.ema.register_checkpoint_hooks(accelerator)
        hooks.append(plan.ema)  # last: it averages what every other rule left
    state = restore_train_state(accelerator, resume_from)
    task.start(models)

    report = StepReport(args, accelerator, task.tracker_project, max_steps, state.global_step, resume_from)
    params = [p for g in plan.optimizer.param_groups for p in g["params"]]
    batches = resumable_batches(accelerator, loader, state, plan.batches_per_epoch, plan.select_epoch)
    last_checkpoint, started, train_seconds, last_loss = resume_from, time.time(), 0.0, float("nan")
    for model in models.values():
        model.train()
    step_started = time.time()
    while state.global_step < max_steps:
        epoch, index, batch = next(batches)
        with accelerator.accumulate(*models.values()):
            loss, parts = task.loss(models, batch, epoch, index)
            loss = loss + sum(dreamlora.regularization_loss(m) for m in plan.models.values())
            accelerator.backward(loss)
            optimizer_step(accelerator, optimizer, lr_scheduler, params, args.max_grad_norm, plan.models.values(),
                           max_steps, hooks, state.global_step + 1)
        if not accelerator.sync_gradients:
            continue  # a micro-batch of gradient accumulation: no optimizer step yet
        state.global_step += 1
        step = state.global_step
        last_loss = accelerator.gather(loss.detach()[None]).mean().item()
        if not math.isfinite(last_loss):
            report.close()  # so the error is the last line the user sees
            raise TrainingDiverged(f"loss became {last_loss} at step {step}; stopped without saving. "
                                   f"Last good checkpoint: {last_checkpoint or 'none'}")
        # the lr the next step uses, as the method's hook left it (ReLoRA's jagged schedule rewrites it)
        report.step(step, last_loss, optimizer.param_groups[0]["lr"], {**parts, **step_size_logs(optimizer)})
        train_seconds += time.time() - step_started
        # evaluation before the checkpoint: whatever it draws from the RNG is in the checkpoint's RNG state
        if task.evaluates and (step == max_steps or every(step, task.eval_every)):
            task.evaluate(models, step, train_seconds)
        stop = stop_everywhere(accelerator, stop_requested)  # read once per step, on all processes
        if every(step, args.checkpointing_steps) or (task.checkpoint_at_end and step == max_steps) or stop:
            last_checkpoint = save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit, state)
            report.log.write(event="checkpoint", step=step, path=str(last_checkpoint))
        if stop:  # checked after a full optimizer step, which has just been checkpointed
            break
        step_started = time.time()
    report.close()
    return finish(task, accelerator, report, RunResult(
        steps=state.global_step, finished=state.global_step >= max_steps, wall_time_s=round(time.time() - started, 2),
        train_time_s=round(train_seconds, 2), final_loss=last_loss, environment={}))


def finish(task: Task, accelerator, report: StepReport, result: RunResult) -> int:
    """Every process waits for the last step; the main process writes the task's outputs, then the final event."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result.environment = run_environment(accelerator, report.resume_from)
        task.write_outputs(result)
        report.log.write(event="done" if result.finished else "stopped", step=result.steps)
    accelerator.end_training()
    return 0


class StepReport:
    """Where each optimizer step is reported: the progress bar, the trackers (tensorboard) and the progress
    file the app follows (`--progress_file`). Started here, with the run's flags as the trackers' config."""

    def __init__(self, args, accelerator, project: str, max_steps: int, start_step: int, resume_from: Path | None):
        from tqdm.auto import tqdm

        is_main = accelerator.is_main_process
        if is_main:
            accelerator.init_trackers(project, config={k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool))})
        self.accelerator, self.resume_from = accelerator, resume_from
        self.log = ProgressLog(Path(args.output_dir) / args.progress_file if is_main else None, max_steps, start_step)
        self.log.write(event="started", step=start_step, total=max_steps, resumed_from=str(resume_from or ""))
        self.bar = tqdm(total=max_steps, initial=start_step, desc="training", unit="step", disable=not is_main)

    def step(self, step: int, loss: float, lr: float, parts: dict[str, torch.Tensor]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.accelerator.log({"train/loss": loss, "train/lr": lr, **{f"train/{k}": v.item() for k, v in parts.items()}},
                             step=step)
        self.log.step(step, loss, lr)

    def close(self) -> None:
        self.bar.close()
