"""Where a run is, and the data order that lets it resume exactly there: the step state a checkpoint holds,
batches that continue from it, and the seed of each micro-batch."""

from __future__ import annotations

import math

from pipelines.trainer.order import stable_seed

STATE_FILE = "progress.json"  # the file name inside a checkpoint folder, kept from before TrainState had its name


class TrainState:
    """Where the run is: optimizer steps taken and the next unseen batch. Saved as `progress.json` in each
    checkpoint (JSON, never a pickle)."""

    def __init__(self):
        self.global_step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.epoch, self.batch_in_epoch = (int(state[k]) for k in
                                                             ("global_step", "epoch", "batch_in_epoch"))


def steps_per_epoch(examples: int, batch_size: int, num_processes: int, accumulation: int) -> tuple[int, int]:
    """(batches per epoch per process, optimizer steps per epoch) of a DataLoader without drop_last."""
    batches = math.ceil(math.ceil(examples / batch_size) / num_processes)
    return batches, math.ceil(batches / accumulation)


def resumable_batches(accelerator, loader, state: TrainState, batches_per_epoch: int, select_epoch):
    """(epoch, index, batch) from where `state` says, epoch after epoch, until the caller stops.

    Each epoch's order comes from `select_epoch(epoch)` (seeded samplers and augmentation), not from
    accelerate's own `set_epoch` counter, which restarts at 0 after a resume. `state` always names the
    next unseen batch, so a checkpoint taken after any step resumes exactly there.
    """
    while True:
        epoch, skip = state.epoch, state.batch_in_epoch
        if skip >= batches_per_epoch:
            epoch, skip = epoch + 1, 0
        select_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for index, batch in enumerate(batches, start=skip):
            state.epoch, state.batch_in_epoch = epoch, index + 1
            yield epoch, index, batch
        state.epoch, state.batch_in_epoch = epoch + 1, 0


def batch_seed(seed: int, epoch: int, batch: int, process: int) -> int:
    """The seed of everything random in one micro-batch (noise, timesteps, dropout): a pure function of where
    the batch is, so a resumed run draws exactly what the uninterrupted one drew (a fresh DataLoader
    iterator after a resume would otherwise shift the global RNG)."""
    return stable_seed(seed, epoch, batch, process)
