"""Data order and randomness as pure functions of (seed, epoch, position), so a resumed run retraces an
uninterrupted one and one process with batch 2k draws what k processes with batch 2 draw."""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*values: int) -> int:
    """A seed from integers that every Python version and platform computes alike (Python's hash() of a
    tuple is an implementation detail): BLAKE2b, 8-byte digest, of the values as 8-byte little-endian signed
    integers, read little-endian with the top bit cleared. Exact resume depends on it."""
    data = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A permutation per epoch from (seed, epoch) alone, so the order after a resume is the original order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def select_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self) -> int:
        return self.length
