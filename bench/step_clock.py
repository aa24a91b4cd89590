"""Run a training script under one clock: `python bench/step_clock.py --steps N OUT.json SCRIPT [ARGS...]`.

Every training script compared here (`dreamlora/train.py`, diffusers' `train_dreambooth_lora.py`) advances a tqdm
bar with `update(1)` once per optimizer step (an iterated bar updates in batches: not for this). This wrapper
patches tqdm to note `time.perf_counter()` at each update, runs SCRIPT as `__main__` with ARGS, and writes, per
bar, the update times, plus memory measured the same way for every script:

- `peak_rss_mib`: the whole process's peak resident set (VmHWM), loading included;
- `loop_peak_mib`: the peak above the resident set at the moment the step bar was created (after loading and set-up,
  before the first step): activations, gradients and optimizer states. Pages mapped from files are left out on
  both ends (a loader that maps safetensors lazily pages the weights in during the first step). At the bar's
  creation the wrapper first hands back what Python and glibc hold spare (gc, malloc_trim), then resets the peak
  (Linux clear_refs 5): heap an earlier phase left free (a load, DoRA's norms) would otherwise be reused by the
  loop without showing in its peak. Resident-set figures still move by tens of MiB with the allocator's layout;
- `loop_heap_peak_mib`: the steadier figure: the largest heap in use (glibc mallinfo2, sampled every 2 ms from
  the step bar's creation) above the heap in use at that moment: live allocations only.

Step times are then summarised by `step_stats` for every script alike. Linux only (/proc).
"""

from __future__ import annotations

import ctypes
import gc
import json
import runpy
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use_mib() -> float | None:
    """Bytes malloc has handed out and not had back, all arenas and mmapped blocks (glibc mallinfo2): live memory,
    whatever the resident set keeps. None where that call is missing."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return (info.uordblks + info.hblkhd) / 2**20


class HeapPeak(threading.Thread):
    """Samples the heap in use every `interval` seconds (torch releases the GIL inside its ops, so the samples
    land inside forward and backward) and keeps the largest."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.start_mib = interval, heap_in_use_mib()
        self.peak_mib = self.start_mib

    def run(self) -> None:
        while True:
            self.peak_mib = max(self.peak_mib, heap_in_use_mib())
            time.sleep(self.interval)


def file_backed_mib() -> float:
    """Resident pages mapped from files (and shared memory): safetensors weights that a loader maps lazily are
    paged in by the first forward, which is not memory the training loop allocates."""
    return _status_mib("RssFile") + _status_mib("RssShmem")


def reset_peak() -> float:
    """Release spare heap, forget the peak so far, and return the resident set now (MiB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak then includes whatever the heap keeps
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


class Clock:
    """Update times per bar, and the resident set when the first bar of `steps` total was created."""

    def __init__(self, steps: int | None):
        self.steps, self.bars, self.loop_start_rss = steps, [], None
        self.start_file_mib = self.loop_file_mib = 0.0
        self.heap = None

    def install(self) -> None:
        from tqdm import std

        clock, init, update = self, std.tqdm.__init__, std.tqdm.update

        def timed_init(bar, *args, **kwargs):
            init(bar, *args, **kwargs)
            bar._clock = {"desc": getattr(bar, "desc", None), "total": bar.total, "times": [], "cpu_times": []}
            clock.bars.append(bar._clock)
            if clock.loop_start_rss is None and clock.steps is not None and bar.total == clock.steps:
                clock.loop_start_rss = reset_peak()
                clock.start_file_mib = clock.loop_file_mib = file_backed_mib()
                if heap_in_use_mib() is not None:
                    clock.heap = HeapPeak()
                    clock.heap.start()
                bar._clock["steps"] = True

        def timed_update(bar, n=1):
            result = update(bar, n)
            if hasattr(bar, "_clock"):
                bar._clock["times"].extend([time.perf_counter()] * int(n))
                bar._clock["cpu_times"].extend([time.process_time()] * int(n))
                if bar._clock.get("steps"):  # while the model lives: the script may unmap it before it exits
                    clock.loop_file_mib = max(clock.loop_file_mib, file_backed_mib())
            return result

        std.tqdm.__init__, std.tqdm.update = timed_init, timed_update

    def report(self) -> dict:
        peak = _status_mib("VmHWM")
        loop = None
        if self.loop_start_rss is not None:  # anonymous memory only: weights paged in from a mapped file are not
            loop = (peak - self.loop_file_mib) - (self.loop_start_rss - self.start_file_mib)  # the loop's
        heap = None if self.heap is None else self.heap.peak_mib - self.heap.start_mib
        return {"bars": self.bars, "peak_rss_mib": peak, "loop_start_rss_mib": self.loop_start_rss,
                "loop_file_mib": self.loop_file_mib, "loop_peak_mib": loop, "loop_heap_peak_mib": heap}


def step_times(report: dict, steps: int, clock: str = "times") -> list[float]:
    """Update times of the step bar (the bar with `steps` total and the most updates): wall-clock `times`, or
    `cpu_times`, the process's CPU time, which waiting for a core that other work holds does not advance."""
    bars = [b for b in report["bars"] if b["total"] == steps and b["times"]]
    if not bars:
        raise ValueError(f"no progress bar with total {steps} was updated; bars seen: "
                         f"{[(b['desc'], b['total'], len(b['times'])) for b in report['bars']]}")
    return max(bars, key=lambda b: len(b["times"]))[clock]


def intervals(times: list[float], skip: int) -> list[float]:
    """Seconds between consecutive step updates, leaving out the first `skip` (warm-up) steps."""
    if len(times) < skip + 3:
        raise ValueError(f"need at least {skip + 3} step updates to skip {skip}, got {len(times)}")
    return [b - a for a, b in zip(times[skip:], times[skip + 1:], strict=False)]


def step_stats(report: dict, steps: int, skip: int) -> dict:
    """Median and fastest step after warm-up, wall-clock, and the median step in process CPU time. The wall median
    is the rate a quiet machine gives (spikes left out); the CPU-time median is the steadier figure on a machine
    other work shares (with one thread, it counts this process's work, not its waiting)."""
    wall, cpu = intervals(step_times(report, steps), skip), intervals(step_times(report, steps, "cpu_times"), skip)
    return {"step_s_median": statistics.median(wall), "step_s_min": min(wall), "cpu_s_median": statistics.median(cpu),
            "steps_timed": len(wall)}


def run_checked(cmd: list[str], env: dict) -> None:
    """Run a benchmark's subprocess from the repository root; on failure stop with the end of its output."""
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] != "--steps":
        sys.exit("usage: step_clock.py --steps N OUT.json SCRIPT [ARGS...]")
    steps, out, script = int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    clock = Clock(steps)
    clock.install()
    sys.argv = [str(script), *sys.argv[5:]]
    sys.path[0] = str(script.resolve().parent)  # as `python SCRIPT` would
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    out.write_text(json.dumps(clock.report()))
    sys.exit(code)


if __name__ == "__main__":
    main()
