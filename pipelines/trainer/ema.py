"""An exponential moving average (EMA) of the trained weights (`--use_ema`), for any method whose weights can be
averaged (`AdapterLayer.averageable`): kept in fp32 beside the live weights, updated after each real optimizer
step, swapped in for validation images and for its own output folder, and carried by every checkpoint.

The update after the k-th real optimizer step (k = 1, 2, ...), for every trained tensor w with shadow e:

    e = d_k·e + (1 − d_k)·w,   d_k = min(decay, (1 + s)/(10 + s)),   s = k − 1   (d_1 = 0: e starts at w)

the schedule of diffusers' `EMAModel` with its defaults (`use_ema_warmup=False`, `update_after_step=0`), which
SimpleTuner and OneTrainer use too. The warm-up caps the decay while the run is young, so the average never
reaches back to the adapter's identity init (B = 0), which a constant decay would keep weighing by decay^k.
Skipped steps (gradient accumulation, a step the fp16 GradScaler threw away) change no weight and do not count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from dreamlora.errors import ArgError
from dreamlora.inject import adapter_layers, adapter_names
from dreamlora.io import atomic_save_file, read_metadata

log = logging.getLogger(__name__)

EMA_DIR = "ema"  # the EMA weights' own output folder, beside the raw files in --output_dir
CHECKPOINT_FILE = "ema.safetensors"  # the shadow inside each checkpoint folder
FORMAT = "dreamlora-ema"
SCHEDULE = "d_k = min(decay, (1 + s)/(10 + s)), s = k - 1 (diffusers' EMAModel)"


def decay_at(update: int, decay: float) -> float:
    """d_k of the k-th update (1-based), see the module docstring."""
    s = update - 1
    return 0.0 if s <= 0 else min(decay, (1 + s) / (10 + s))


def refusal(method_cls) -> str | None:
    """Why `--use_ema` cannot average an adapter of `method_cls`, as the error line; None when it can."""
    if method_cls.averageable:
        return None
    return f"--use_ema: {method_cls.method} adapters cannot be averaged: {method_cls.averaging_note}"


class AdapterEMA:
    """The fp32 shadow of every trainable tensor of `models` (component name -> model: `unet`, `text_encoder`), as
    they are when it is built (after the adapters are attached, before `accelerator.prepare`, which keeps the
    parameter objects)."""

    def __init__(self, models: dict[str, nn.Module], decay: float):
        for model in models.values():
            for name in adapter_names(model):
                method = type(next(iter(adapter_layers(model, name).values())))
                if refusal(method):
                    raise ArgError(refusal(method))
        self.decay, self.updates = decay, 0
        self.params = {f"{component}.{name}": p for component, model in models.items()
                       for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ArgError("--use_ema: nothing is trained, so there is nothing to average")
        self.shadow = {key: p.detach().float().clone() for key, p in self.params.items()}

    # the loop's per-step hooks (`loop.StepHook`): the EMA is the last hook of each real optimizer step
    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        self.update()

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the live weights; call it after each real optimizer step only."""
        self.updates += 1
        weight = 1.0 - decay_at(self.updates, self.decay)
        shadows = list(self.shadow.values())
        live = [p.detach().float() for p in self.params.values()]  # fp32 weights: the tensors themselves, no copy
        torch._foreach_lerp_(shadows, live, weight)  # e + weight·(w − e) = d·e + (1 − d)·w, one kernel per dtype

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the models for the duration, then the live weights back bit for bit."""
        saved = {key: p.detach().clone() for key, p in self.params.items()}
        try:
            with torch.no_grad():
                for key, p in self.params.items():
                    p.copy_(self.shadow[key])
            yield
        finally:
            with torch.no_grad():
                for key, p in self.params.items():
                    p.copy_(saved[key])

    def record(self) -> dict:
        """run.json's `ema` entry."""
        return {"dir": EMA_DIR, "decay": self.decay, "updates": self.updates,
                "last_decay": decay_at(self.updates, self.decay), "schedule": SCHEDULE}

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        atomic_save_file({k: v.contiguous() for k, v in self.shadow.items()}, path,
                         {"format": FORMAT, "updates": str(self.updates), "decay": repr(self.decay)})

    @torch.no_grad()
    def load(self, path: Path) -> None:
        """The shadow and update count of `path`; ValueError naming the file when it does not fit these models."""
        from safetensors.torch import load_file

        meta = read_metadata(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an EMA file written by dreamlora")
        tensors = load_file(str(path))
        missing, unexpected = sorted(set(self.shadow) - set(tensors)), sorted(set(tensors) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"{path} averages other weights than this run trains: {len(missing)} missing "
                             f"({missing[:2]}), {len(unexpected)} unexpected ({unexpected[:2]})")
        for key, value in tensors.items():
            if value.shape != self.shadow[key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, this run's is "
                                 f"{tuple(self.shadow[key].shape)}")
        for key, value in tensors.items():
            self.shadow[key].copy_(value)
        self.updates = int(meta["updates"])

    def register_checkpoint_hooks(self, accelerator) -> None:
        """Every `accelerator.save_state` writes the shadow as `ema.safetensors` (main process) and every
        `load_state` reads it back, beside the adapters' own hooks (`checkpoints.register_adapter_hooks`)."""
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.FSDP:
            raise ArgError("--use_ema does not work with FSDP: each process holds only a shard of the weights")

        def save_hook(models, weights, output_dir):
            if accelerator.is_main_process:
                self.save(Path(output_dir) / CHECKPOINT_FILE)

        def load_hook(models, input_dir):
            file = Path(input_dir) / CHECKPOINT_FILE
            if file.is_file():
                self.load(file)
            else:  # a run that adds --use_ema on resume: the average starts from the resumed weights
                log.warning("--use_ema: %s has no %s (it was saved without --use_ema); the average starts at the "
                            "resumed weights", input_dir, CHECKPOINT_FILE)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)


def ema_weights(ema: AdapterEMA | None):
    """`ema.swapped_in()`, or nothing to swap without --use_ema."""
    return nullcontext() if ema is None else ema.swapped_in()


def write_ema_output(ema: AdapterEMA, output_dir: Path, write) -> dict:
    """`write(folder)` (the trainer's own output writer) with the EMA weights swapped in, into `output_dir/ema/`;
    returns run.json's `ema` entry."""
    folder = Path(output_dir) / EMA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with ema.swapped_in():
        write(folder)
    return ema.record()
