"""The benchmark tools measure what they say, and the GPU check's code runs (its tiny CPU mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
