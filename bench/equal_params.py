"""The rank at which a method has as many trainable parameters as a reference (LoRA at the bench rank).

At one rank the methods differ in size (LoHa holds two LoRAs, LoKr's size follows its factorisation), so the
benchmark also runs each method at its equal-parameter rank. Counting needs no weights: each method's layer is
built on the target layer's kind (`dreamlora.layer_kinds.kind_of`), and on a meta-device model that allocates
nothing. Identical target layers (same `repr`: type, shapes, bias, conv geometry) are built once and counted
as often as they occur.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import cache

from torch import nn

from dreamlora import AdapterConfig
from dreamlora.inject import find_targets
from dreamlora.layer_kinds import kind_of
from dreamlora.methods import METHODS


def param_counter(model: nn.Module, method: str, targets: list[str]) -> tuple[Callable[[int], int], int]:
    """(rank -> the method's trainable parameter count over the matched layers of `model`, the largest rank
    the core allows there). Works on a meta-device model; counts are memoised per rank."""
    layers = find_targets(model, AdapterConfig(method=method, target_modules=targets))
    kinds = {repr(base): kind_of(base) for base in layers.values()}
    how_many = Counter(repr(base) for base in layers.values())
    cap = min(min(k.d_in, k.d_out) for k in kinds.values())  # inject refuses a rank above this on any layer

    @cache
    def count(rank: int) -> int:
        config = AdapterConfig(method=method, rank=rank, target_modules=targets)
        return sum(n * sum(p.numel() for p in METHODS[method](kinds[key], config).parameters())
                   for key, n in how_many.items())

    return count, cap


def lowest_rank_reaching(count: Callable[[int], int], goal: int, cap: int) -> int | None:
    """The lowest rank in 1..cap whose count is ≥ goal (bisection), None when even `cap` falls short."""
    if count(cap) < goal:
        return None
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < goal else (lo, mid)
    return lo


def equal_param_rank(count: Callable[[int], int], goal: int, cap: int) -> int:
    """The rank in 1..cap whose count is closest to `goal`; of equally close counts the smaller, and of ranks
    with that count the lowest (LoKr's count stops growing once its second factor is full).

    Assumes a count that never falls as the rank grows (true of every low-rank adapter), so a bisection finds
    the two counts around `goal` in O(log cap) layer builds instead of one per rank."""
    above = lowest_rank_reaching(count, goal, cap)
    candidates = [count(cap)] if above is None else [count(above)] + ([count(above - 1)] if above > 1 else [])
    best = min(candidates, key=lambda n: (abs(n - goal), n))
    return lowest_rank_reaching(count, best, cap)
