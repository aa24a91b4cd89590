"""The benchmark tools measure what they say, and the GPU check's code runs (its tiny CPU mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dreamlora.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# A stand-in training script: heap left spare before the loop (freed between small live blocks, so glibc keeps
# it), then a loop whose steps allocate as much again. The loop's memory must show in its peak even though the
# allocator could serve it from the spare heap without the resident set growing.
SCRIPT = textwrap.dedent("""
    import time
    from tqdm.auto import tqdm
    spare = [(bytearray(100_000), bytearray(64)) for _ in range(800)]  # ~80 MB of heap blocks
    spare = [keep for _, keep in spare]  # free the big halves; the small ones pin the heap
    held = []
    bar = tqdm(range(6), desc="Steps")  # as train.py and diffusers' script: a bar updated once per step
    for _ in range(6):
        held += [bytearray(100_000) for _ in range(130)]  # ~13 MB a step, ~80 MB by the end
        time.sleep(0.03)
        bar.update(1)
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_step_clock_times_the_step_bar_and_counts_loop_memory_reused_from_spare_heap(tmp_path):
    script, out = tmp_path / "train.py", tmp_path / "clock.json"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(BENCH / "step_clock.py"), "--steps", "6", str(out), str(script)],
                   check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    sys.path.insert(0, str(BENCH))
    from step_clock import step_stats, step_times

    assert len(step_times(report, 6)) == len(step_times(report, 6, "cpu_times")) == 6
    stats = step_stats(report, 6, skip=1)
    assert stats["steps_timed"] == 4 and 0.025 <= stats["step_s_median"] < 1.0
    assert stats["cpu_s_median"] < stats["step_s_median"]  # sleeping is wall time, not CPU time
    assert report["loop_peak_mib"] > 60, report  # without trimming the spare heap first this read ~0
    assert 70 < report["loop_heap_peak_mib"] < 100, report  # the ~80 MB the loop holds


def test_gpu_check_tiny_cpu_mode_runs_every_part(tmp_path):
    stem = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--tiny", "--methods", "lora,dora",
                           "--steps", "1", "--warmup", "1", "--sample_steps", "2", "--output", str(stem)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads(stem.with_suffix(".json").read_text())
    train, checks = report["training"], report["checks"]
    # 2 methods + the PEFT reference, each {fp16, bf16} × {checkpointing off, on} + AdamW8bit
    assert sorted({r["kind"] for r in train}) == ["dora", "lora", "peft-lora"] and len(train) == 15
    assert all(r["ok"] for r in train), [r for r in train if not r["ok"]]
    assert all(r["adapter_dtypes"] == ["float32"] for r in train if r["kind"] != "peft-lora")
    assert all("x_ref_speed" in r for r in train)
    passed = {(r["check"].split(":")[0], r["method"]) for r in checks if r["ok"]}
    for method in ("lora", "dora"):
        assert ("attach on CPU, .to(cpu)", method) in passed
        assert ("model offload (cpu_offload_with_hook)", method) in passed
    assert {r["method"] for r in checks if r["check"].startswith("sample")} == {"lora", "dora", "peft-lora"}
    assert proc.returncode == (0 if all(r["ok"] for r in train + checks) else 1), proc.stderr[-2000:]
    assert "CPU SMOKE" in stem.with_suffix(".md").read_text()


class _Targets(torch.nn.Module):
    """Target layers of every shape class the equal-parameter count must handle: square, wide, tall, conv."""

    def __init__(self):
        super().__init__()
        self.sq1, self.sq2 = torch.nn.Linear(24, 24), torch.nn.Linear(24, 24)  # identical: counted as one twice
        self.wide = torch.nn.Linear(12, 36, bias=False)
        self.tall = torch.nn.Linear(36, 16)
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)


TARGETS = ["sq1", "sq2", "wide", "tall", "conv"]


def _bench_module(name):
    sys.path.insert(0, str(BENCH))
    return __import__(name)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_param_counter_counts_what_attach_trains(method):
    import dreamlora

    param_counter = _bench_module("equal_params").param_counter
    with torch.device("meta"):
        count, cap = param_counter(_Targets(), method, TARGETS)
    assert cap == 12  # the wide layer's d_in: the smallest side of any target (the conv's is C_out = 16)
    for rank in (1, 3, cap):
        model = dreamlora.attach(_Targets(), dreamlora.AdapterConfig(method=method, rank=rank, target_modules=TARGETS))
        assert count(rank) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("lora_rank", [1, 2, 5])
def test_equal_param_rank_is_the_closest_count_lowest_rank_first(method, lora_rank):
    eq = _bench_module("equal_params")
    with torch.device("meta"):
        model = _Targets()
    count, cap = eq.param_counter(model, method, TARGETS)
    goal = eq.param_counter(model, "lora", TARGETS)[0](lora_rank)
    brute = min(range(1, cap + 1), key=lambda r: (abs(count(r) - goal), count(r), r))
    assert eq.equal_param_rank(count, goal, cap) == brute


def test_equal_param_rank_by_hand():
    """LoHa holds two rank-r LoRAs: equal to LoRA at half the rank. A count with a plateau below the goal (as LoKr
    once its second factor is full) takes the lowest rank of the plateau."""
    eq = _bench_module("equal_params")
    with torch.device("meta"):
        model = _Targets()
    lora, cap = eq.param_counter(model, "lora", TARGETS)
    loha, _ = eq.param_counter(model, "loha", TARGETS)
    assert eq.equal_param_rank(loha, lora(4), cap) == 2 and loha(2) == lora(4)
    assert eq.equal_param_rank(lambda r: 10 * min(r, 5), 1000, 40) == 5
    assert eq.equal_param_rank(lambda r: 10 * r, 25, 40) == 2  # 20 and 30 equally close: the lower count


def test_adapter_bench_plans_equal_param_rows_only_where_the_rank_differs():
    bench = _bench_module("adapter_step")
    eq_ranks = {4: {"dreamlora-a@eq": 2, "dreamlora-b@eq": 4}, 16: {"dreamlora-a@eq": 8, "dreamlora-b@eq": 15}}
    configs = ["floor", "dreamlora-a", "dreamlora-a@eq", "dreamlora-b@eq"]
    assert bench.plan(configs, [4, 16], eq_ranks) == [
        ("floor", 4, 4), ("dreamlora-a", 4, 4), ("dreamlora-a@eq", 4, 2),
        ("floor", 16, 16), ("dreamlora-a", 16, 16), ("dreamlora-a@eq", 16, 8), ("dreamlora-b@eq", 16, 15)]
    assert bench.method_of("dreamlora-a@eq") == bench.method_of("dreamlora-a") == "a"
    assert all(f"dreamlora-{m}" in bench.CONFIGS for m in METHODS)
    assert {c for c in bench.CONFIGS if c.endswith("@eq")} == {f"dreamlora-{m}@eq" for m in METHODS} - {
        "dreamlora-lora@eq"}
