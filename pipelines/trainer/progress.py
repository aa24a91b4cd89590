"""What a run reports while and after it trains: the progress file the app follows, and run.json's shared part."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

import dreamlora


class ProgressLog:
    """JSON lines the app follows: one per optimizer step and one per event. Main process only (a None path
    writes nothing, so every process can call it)."""

    def __init__(self, path: Path | None, total_steps: int, start_step: int):
        self.path, self.total, self.start_step, self.t0 = path, total_steps, start_step, time.time()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def step(self, step: int, loss: float, lr: float) -> None:
        done = step - self.start_step
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else None
        self.write(event="step", step=step, total=self.total, loss=round(loss, 6), lr=lr,
                   eta_s=None if eta is None or math.isinf(eta) else round(eta, 1))


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:  # Linux; peak resident set size
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run_environment(accelerator, resume_from: Path | None) -> dict:
    """The run.json fields every trainer shares: where and how it ran."""
    return {"peak_memory_mib": round(peak_memory_mib(accelerator.device), 1), "world_size": accelerator.num_processes,
            "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
            "resumed_from": str(resume_from) if resume_from else None,
            "versions": {"torch": torch.__version__, "dreamlora": dreamlora.__version__}}

