"""Checkpoints: where they are, how one is written (adapters only, never the frozen base) and read back, and
the parameter files of weights trained outside the adapters (a classifier head)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

import dreamlora
from dreamlora.atomic import atomic_write_json
from dreamlora.errors import ArgError
from dreamlora.io import atomic_save_file, read_metadata
from pipelines.trainer.state import STATE_FILE, TrainState

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. A folder only gets its final name once fully written."""
    found = []
    for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    return sorted(found)


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint` names ("latest", a path, or a name in `output_dir`)."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            log.warning("--resume_from_checkpoint latest: no checkpoint in %s yet, starting fresh", output_dir)
            return None
        return found[-1][1]
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = output_dir / value
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r}: no such checkpoint folder")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None, state: TrainState) -> Path:
    """accelerate state (adapters via the save hook, optimizer, scheduler, RNG) and the run's position as
    `progress.json`, under a temporary name, renamed when complete; then prune the oldest beyond `total_limit`."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{final.name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, state.state_dict())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_train_state(checkpoint: Path) -> TrainState:
    """The position saved in `checkpoint`'s `progress.json`. Checkpoints from before that file kept it in
    accelerate's `custom_checkpoint_0.pkl`, which accelerate only loads by unpickling: refused, never read."""
    file = checkpoint / STATE_FILE
    if not file.is_file():
        why = ("was written by an older dreamlora that pickled its progress (custom_checkpoint_0.pkl), which is "
               "never unpickled; finish it with that version or start again" if
               (checkpoint / "custom_checkpoint_0.pkl").exists() else f"has no {STATE_FILE}")
        raise ArgError(f"--resume_from_checkpoint {str(checkpoint)!r} {why}")
    state = TrainState()
    try:
        state.load_state_dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArgError(f"--resume_from_checkpoint {str(checkpoint)!r}: {STATE_FILE} is unreadable: {e}") from None
    return state


def restore_train_state(accelerator, resume_from: Path | None) -> TrainState:
    """With a checkpoint (`resolve_resume`), load everything from it: adapters via the hooks (their parameters
    and method state), optimizer, scheduler, RNG, then the position. A checkpoint that does not fit the run is
    bad input, named."""
    if resume_from is None:
        return TrainState()
    state = read_train_state(resume_from)  # first: a bad checkpoint fails before anything is loaded
    try:
        accelerator.load_state(str(resume_from))
    except ValueError as e:
        raise ArgError(f"--resume_from_checkpoint {str(resume_from)!r} does not fit this run: {e}") from None
    log.info("resumed from %s at step %d", resume_from, state.global_step)
    return state


def adapter_file(folder: Path, component: str) -> Path:
    return Path(folder) / f"{component}_adapter.safetensors"


def full_weights_file(folder: Path, component: str) -> Path:
    return Path(folder) / f"{component}_trained_weights.safetensors"


def save_parameters(model: torch.nn.Module, names: list[str], path: Path) -> None:
    """Named parameters of `model` (e.g. a classifier head trained in full) as one safetensors file."""
    params = dict(model.named_parameters())
    atomic_save_file({n: params[n].detach().contiguous() for n in names}, path, {"format": "pt"})


def load_parameters(model: torch.nn.Module, path: Path) -> None:
    """The inverse of `save_parameters`: every name and shape is checked before anything is copied."""
    from safetensors.torch import load_file

    read_metadata(path)  # refuses anything that is not safetensors before a parser sees it
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{path}: weights {unknown[:3]} do not exist in the model")
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def trained_outside_adapters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable weights that are not adapter factors, e.g. a classifier head trained in full."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n}


def register_adapter_hooks(accelerator, components: dict[str, torch.nn.Module]) -> None:
    """Checkpoints hold only the adapters (not the frozen base): accelerate's model weights are replaced by
    dreamlora's native files, one per trained component (parameters and method state, `dreamlora.save`), and the
    component's weights trained outside adapters (a classifier head, pivotal tuning's token rows)."""
    def owner(model):
        unwrapped = accelerator.unwrap_model(model)
        return next(name for name, m in components.items() if m is unwrapped)

    def save_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                unwrapped, name = accelerator.unwrap_model(model), owner(model)
                if dreamlora.adapter_names(unwrapped):  # a text encoder trained for its new tokens only has none
                    dreamlora.save(unwrapped, adapter_file(output_dir, name))
                extra = trained_outside_adapters(unwrapped)
                if extra:
                    save_parameters(unwrapped, list(extra), full_weights_file(output_dir, name))
        weights.clear()  # accelerate must not write the full base weights

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            unwrapped, name = accelerator.unwrap_model(model), owner(model)
            if dreamlora.adapter_names(unwrapped):
                dreamlora.load_weights(unwrapped, adapter_file(input_dir, name))
            if trained_outside_adapters(unwrapped):
                load_parameters(unwrapped, full_weights_file(input_dir, name))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
