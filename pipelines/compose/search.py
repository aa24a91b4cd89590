"""The gradient-free search over the composition weights w: nevergrad (NGOpt by default, LoRAHub's choice) on
objective(w) = loss(w) + l1·mean|wᵢ| (LoRAHub's regulariser), w in [lower, upper]ᵏ, from w = 0, with a fixed seed.

Before the optimiser's own proposals it evaluates the base (w = 0), the uniform average (wᵢ = 1/k) and each adapter
alone (one-hot): they count in the budget, and since the result is the best *evaluated* point (never an unevaluated
recommendation), the composition is never worse on the search's examples than any of them. Every evaluation is
recorded (weights, loss, objective); a search restarts from a record by telling its points back to the optimiser,
which then proposes new points only (a restart is not bit-exact: the optimiser's internal state is not saved).

Under `accelerate launch` only the main process runs nevergrad: each candidate is broadcast, every process
evaluates its share of the examples, and the loss is reduced across processes (`objectives`), so all of them
apply the same weights in the same order.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dreamlora.errors import ArgError, DataError

DEFAULT_OPTIMIZER = "NGOpt"


@dataclass
class Evaluation:
    index: int
    weights: list[float]
    loss: float
    objective: float
    source: str  # "base", "uniform", "single:<label>", the optimiser's name, or "restart"
    time_s: float


@dataclass
class SearchSettings:
    budget: int = 40
    l1: float = 0.05
    lower: float = -1.5
    upper: float = 1.5
    seed: int = 0
    optimizer: str = DEFAULT_OPTIMIZER


def objective_of(loss: float, weights: list[float], l1: float) -> float:
    return loss + l1 * sum(abs(w) for w in weights) / len(weights)


def seed_candidates(labels: list[str]) -> list[tuple[str, list[float]]]:
    """The base, the uniform average and each adapter alone, in that order."""
    k = len(labels)
    out = [("base", [0.0] * k), ("uniform", [1.0 / k] * k)]
    out += [(f"single:{label}", [1.0 if j == i else 0.0 for j in range(k)]) for i, label in enumerate(labels)]
    return out


def check_settings(settings: SearchSettings, k: int, restarting: bool = False) -> None:
    if not settings.lower <= 0.0 and 1.0 <= settings.upper:
        raise ArgError(f"--lower_bound {settings.lower:g} / --upper_bound {settings.upper:g}: the bounds must hold "
                       "0 (the base) and 1 (each adapter alone)")
    if settings.budget < 1 or (settings.budget < k + 2 and not restarting):
        raise ArgError(f"--budget {settings.budget}: at least {k + 2} evaluations, the base, the uniform average and "
                       f"each of the {k} adapters alone (at least 1 with --restart_from, which evaluated them)")
    if not (math.isfinite(settings.l1) and settings.l1 >= 0):
        raise ArgError(f"--l1 must be a number >= 0, got {settings.l1}")


def make_optimizer(settings: SearchSettings, k: int):
    try:
        import nevergrad as ng
    except ImportError:
        raise ArgError("the search needs nevergrad: pip install 'dreamlora[compose]' (or give --weights)") from None
    import numpy as np

    if settings.optimizer not in ng.optimizers.registry:
        raise ArgError(f"--optimizer {settings.optimizer!r} is not a nevergrad optimizer (e.g. NGOpt, Shiwa, CMA, "
                       "OnePlusOne, TwoPointsDE)")
    space = ng.p.Array(init=np.zeros(k), lower=settings.lower, upper=settings.upper)
    space.random_state = np.random.RandomState(settings.seed)
    return ng.optimizers.registry[settings.optimizer](parametrization=space, budget=settings.budget, num_workers=1)


def read_history(path: str | Path, labels: list[str]) -> list[Evaluation]:
    """The evaluations recorded by an earlier search (`search.jsonl`), for a restart; they must be over the same
    adapters in the same order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--restart_from {str(path)!r} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(Evaluation(**{f: row[f] for f in Evaluation.__dataclass_fields__}))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"--restart_from {str(path)!r} line {n} is not a recorded evaluation") from None
        if row.get("labels", labels) != labels:
            raise DataError(f"--restart_from {str(path)!r} searched over {row['labels']}, not {labels}: give the "
                            "same --adapter flags in the same order")
    return rows


def search(evaluate: Callable[[list[float]], float], labels: list[str], settings: SearchSettings, accelerator,
           restart: list[Evaluation] = (), on_evaluation: Callable[[Evaluation], None] | None = None,
           stop: Callable[[], bool] | None = None) -> list[Evaluation]:
    """Run the search; `evaluate(w)` is the loss (collective: every process calls it with the same w). Returns the
    evaluations of this run (restart points first, then `settings.budget` new ones, fewer when `stop()` turns true:
    the app's Stop, which keeps the best mix found so far)."""
    from tqdm.auto import tqdm

    k = len(labels)
    main = accelerator.is_main_process
    optimizer = make_optimizer(settings, k) if main else None
    history: list[Evaluation] = []
    for old in restart:  # told back to the optimiser, not evaluated again
        if main:
            optimizer.tell(optimizer.parametrization.spawn_child(new_value=_array(old.weights)), old.objective)
        history.append(Evaluation(len(history), old.weights, old.loss, old.objective, "restart", 0.0))
        if on_evaluation is not None:  # the new record holds the old points too, so restarts chain
            on_evaluation(history[-1])
    seeds = [] if restart else seed_candidates(labels)
    if main:
        for _, weights in seeds:
            optimizer.suggest(_array(weights))
    bar = tqdm(range(settings.budget), desc="composing", unit="eval", disable=not main)
    for i in bar:
        if stop is not None and i > 0 and stop():
            break
        start = time.perf_counter()
        candidate = _ask_new(optimizer, history) if main else None
        weights = _broadcast([float(v) for v in candidate.value] if main else [0.0] * k, accelerator)
        loss = evaluate(weights)
        value = objective_of(loss, weights, settings.l1) if math.isfinite(loss) else float("inf")
        if main:
            optimizer.tell(candidate, value)
        source = _source(weights, seeds) if i < len(seeds) else settings.optimizer
        record = Evaluation(len(history), weights, loss, value, source, time.perf_counter() - start)
        history.append(record)
        best = min(h.objective for h in history)
        bar.set_postfix(objective=f"{value:.4f}", best=f"{best:.4f}")
        if on_evaluation is not None:
            on_evaluation(record)
    return history


def fixed(evaluate: Callable[[list[float]], float], weights: list[float], l1: float) -> Evaluation:
    """One evaluation of given weights (no search)."""
    start = time.perf_counter()
    loss = evaluate(weights)
    value = objective_of(loss, weights, l1) if math.isfinite(loss) else float("inf")
    return Evaluation(0, list(weights), loss, value, "given", time.perf_counter() - start)


def best(history: list[Evaluation]) -> Evaluation:
    """The evaluated point with the lowest objective (the first of equals)."""
    finite = [h for h in history if math.isfinite(h.objective)]
    if not finite:
        raise DataError("every evaluation of the search gave a non-finite loss (NaN/inf): nothing to compose")
    return min(finite, key=lambda h: h.objective)


def as_json(record: Evaluation, labels: list[str]) -> dict:
    return {**asdict(record), "labels": labels}


def _ask_new(optimizer, history: list[Evaluation], tries: int = 20):
    """The optimiser's next candidate, skipping points already evaluated (after a restart it proposes its start
    again): those are told their recorded objective instead of costing an evaluation."""
    known = {tuple(h.weights): h.objective for h in history}
    for _ in range(tries):
        candidate = optimizer.ask()
        value = known.get(tuple(float(v) for v in candidate.value))
        if value is None:
            return candidate
        optimizer.tell(candidate, value)
    return candidate


def _source(weights: list[float], seeds: list[tuple[str, list[float]]]) -> str:
    """Which seeded candidate `weights` is (nevergrad hands suggestions back in its own order)."""
    for name, seed in seeds:
        if all(abs(a - b) <= 1e-12 for a, b in zip(weights, seed, strict=True)):
            return name
    return "suggested"


def _array(weights: list[float]):
    import numpy as np

    return np.asarray(weights, dtype=float)


def _broadcast(weights: list[float], accelerator) -> list[float]:
    """The main process's weights on every process (float64, so every process applies exactly the same values)."""
    if accelerator.num_processes == 1:
        return weights
    from accelerate.utils import broadcast

    tensor = torch.tensor(weights, dtype=torch.float64, device=accelerator.device)
    return [float(v) for v in broadcast(tensor, from_process=0).cpu()]
