"""Batches of one group each (aspect-ratio buckets: every batch one tensor shape), in an order that is a pure
function of (seed, epoch), dealt evenly to every process.

One epoch, for N rows in groups (buckets) and batch size B:
- inside each group, its rows in a permutation seeded by (seed, epoch, group), cut into batches of B; a group's
  last partial batch is kept as a smaller batch (as kohya's sd-scripts do), never padded with rows of another
  group and never dropped;
- the batches of all groups in a permutation seeded by (seed, epoch);
- with P processes, the epoch is evened out to a multiple of P batches by splitting batches: while the count is
  not a multiple of P, the largest batch (the first of them in the order) is cut in two halves, the second placed
  right after the first. Every row is then still seen exactly once per epoch across all processes. Only when every
  batch holds a single row and there are fewer than P left over (fewer rows than processes in the last round) are
  the epoch's first batches repeated to fill the round.

accelerate's `prepare` wraps a custom batch sampler in `BatchSamplerShard`, which deals whole batches round-robin
(batch i to process i mod P). It treats batches as fixed-size when the sampler has a `batch_size`: it then skips
any round whose last batch is short and tops up the final one with rows from the start of the epoch, which would
mix shapes. This sampler's `batch_size` is None, so the shard deals its batches as they are; their count is
already a multiple of P, so it pads nothing and every process gets len(sampler) / P batches.

The order is chosen by `select_epoch`, not accelerate's `set_epoch` (its own count of loader passes restarts at
0 after a resume), so a resumed run sees the batches of the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from pipelines.trainer.order import stable_seed

STREAM = 3  # stable_seed's stream tag of bucket orders (0, 1: instance and class rows; 2: validation)


def permutation(length: int, *seed: int) -> list[int]:
    return torch.randperm(length, generator=torch.Generator().manual_seed(stable_seed(*seed))).tolist()


def even_out(batches: list[list[int]], num_processes: int) -> list[list[int]]:
    """`batches` made a multiple of `num_processes` long (see the module's note): split the largest, else repeat."""
    batches = [list(b) for b in batches]
    while len(batches) % num_processes:
        largest = max(range(len(batches)), key=lambda i: (len(batches[i]), -i))
        batch = batches[largest]
        if len(batch) < 2:  # single rows only: repeat the first ones to fill the last round
            batches += [batches[i % len(batches)] for i in range(num_processes - len(batches) % num_processes)]
            break
        half = (len(batch) + 1) // 2
        batches[largest: largest + 1] = [batch[:half], batch[half:]]
    return batches


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset rows, each from one group (`groups[i]`: the group of row i, e.g. its bucket's size)."""

    batch_size = None  # batches have their own sizes: accelerate's shard must deal them whole (module note)
    drop_last = False

    def __init__(self, groups: Sequence[Hashable], batch_size: int, num_processes: int, seed: int):
        self.rows: dict[Hashable, list[int]] = {}
        for row, group in enumerate(groups):
            self.rows.setdefault(group, []).append(row)
        self.order = sorted(self.rows, key=repr)  # a group's seed follows its key, not the photos' order
        self.size, self.num_processes, self.seed, self.epoch = batch_size, num_processes, seed, 0
        self.length = len(self.epoch_batches(0))  # the same every epoch: only the order changes

    def select_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        batches = []
        for g, group in enumerate(self.order):
            members = self.rows[group]
            shuffled = [members[i] for i in permutation(len(members), self.seed, STREAM, epoch, g)]
            batches += [shuffled[i: i + self.size] for i in range(0, len(shuffled), self.size)]
        batches = [batches[i] for i in permutation(len(batches), self.seed, STREAM, epoch, -1)]
        return even_out(batches, self.num_processes)

    def __iter__(self):
        return iter(self.epoch_batches(self.epoch))

    def __len__(self) -> int:
        return self.length

    def batches_per_process(self) -> int:
        return self.length // self.num_processes
