"""Train-step cost of each adapter on the SD 1.5 UNet: dreamlora vs PEFT vs peft-singlora vs the floor.

Setup (issue #2): SD 1.5 UNet architecture from its config (random init), batch 1, 32×32 latents,
attention targets, AdamW, CPU unless --device says otherwise. Each configuration runs in its own process
(fresh allocator, honest peak memory); rounds interleave the configurations so drift on a noisy machine
hits all of them alike. The floor is the frozen base with the gradient flowing to the input only.

Beside the same-rank rows, `dreamlora-<method>@eq` runs each method at the rank whose trainable parameter
count is closest to dreamlora-lora's at the bench rank (issue #11; counted by `equal_params.py` on a meta-device
UNet). A method whose equal-parameter rank is the bench rank itself gets no extra row: its same-rank row is it.

    python bench/adapter_step.py                     # ranks 4 and 64, writes bench/results/adapter_step.{json,md}
    python bench/adapter_step.py --quick             # rank 4, 3 steps, 1 round (`make bench` runs the full one)

Not a timed test: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import write_report  # bench/report.py (scripts run from bench/)
from step_clock import HeapPeak, heap_in_use_mib, reset_peak

from dreamlora.methods import METHODS  # noqa: E402

REFERENCE = "dreamlora-lora"  # the parameter budget the @eq rows match, and the "× our lora" column
EQUAL = "@eq"  # suffix of a configuration run at its equal-parameter rank
CONFIGS = ["floor", *(f"dreamlora-{m}" for m in METHODS), *(f"dreamlora-{m}{EQUAL}" for m in METHODS
                                                             if f"dreamlora-{m}" != REFERENCE),
           "peft-lora", "peft-dora", "peft-singlora"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RESULTS = Path(__file__).parent / "results"
RUN_STEPS = 1000  # the run length the step hooks are told: AdaLoRA scores importance every step of the first 70 %,
# ReLoRA merges every quarter (never inside the timed steps; its merge cost is bench/relora_merge.py's)


def attach_adapter(unet, config: str, rank: int) -> None:
    """Attach one configuration's adapter (or none, for the floor) to the UNet."""
    if config == "floor":
        unet.requires_grad_(False)
    elif config.startswith("dreamlora-"):
        import dreamlora

        dreamlora.attach(unet, dreamlora.AdapterConfig(method=config.split("-", 1)[1], rank=rank,
                                                        target_modules=TARGETS))
        for layer in dreamlora.adapter_layers(unet, "default").values():
            layer.step = 1  # past SingLoRA's first step, like any step of a real run
    elif config == "peft-singlora":
        from peft import inject_adapter_in_model
        from peft_singlora import SingLoRAConfig, update_singlora_global_step

        unet.requires_grad_(False)
        inject_adapter_in_model(SingLoRAConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, ramp_up_steps=100),
                                unet)
        update_singlora_global_step(unet, 1)
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                    use_dora=config == "peft-dora"))


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024  # kB


def cached_sd15_unet(device: str, dtype: torch.dtype):
    """The same random-init UNet in every worker: built once (slow on CPU), then read from a safetensors cache."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pipelines.diffusion.sd_configs import build_sd15_unet

    cache = RESULTS / ".cache" / "sd15_unet_random_seed0.safetensors"
    unet = build_sd15_unet("meta")
    if not cache.is_file():
        torch.manual_seed(0)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file(build_sd15_unet("cpu").state_dict(), tmp)
        os.replace(tmp, cache)
    unet.to_empty(device=device)
    with torch.no_grad(), safe_open(str(cache), framework="pt") as f:  # tensor by tensor: no second full copy
        for name, tensor in unet.state_dict().items():
            tensor.copy_(f.get_tensor(name))
    return unet.to(dtype)


def worker(config: str, rank: int, latent: int, steps: int, warmup: int, device: str, dtype: str) -> dict:
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    unet = cached_sd15_unet(device, dt)
    attach_adapter(unet, config, rank)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if dt != torch.float32:
        for p in trainable:  # trainable weights in fp32 on a half-precision base, as training does
            p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(1, 4, latent, latent, generator=gen).to(device, dt)
    context = torch.randn(1, 77, 768, generator=gen).to(device, dt)
    target = torch.randn(1, 4, latent, latent, generator=gen).to(device, torch.float32)
    timestep = torch.tensor([500], device=device)
    baseline_rss = reset_peak()  # after set-up: spare heap released, peak forgotten (see step_clock.py)
    heap = HeapPeak() if heap_in_use_mib() is not None else None  # live allocations: the steadier CPU figure
    if heap is not None:
        heap.start()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()

    uses_core = config.startswith("dreamlora-")
    import dreamlora

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = latents.detach().requires_grad_(config == "floor")
        pred = unet(x, timestep, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        if uses_core:  # the method's own terms and step hook, as the trainers' loop runs them (AdaLoRA's
            loss = loss + dreamlora.regularization_loss(unet)  # orthogonality term and importance scores)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            if uses_core:
                dreamlora.on_optimizer_step(unet, optimizer, None, RUN_STEPS)
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    result = {"config": config, "rank": rank, "latent": latent, "dtype": dtype, "device": device,
              "trainable_params": sum(p.numel() for p in trainable), "step_s": times,
              "median_s": statistics.median(times), "min_s": min(times), "peak_rss_mib": peak_rss_mib(),
              "train_rss_mib": peak_rss_mib() - baseline_rss,
              "train_heap_mib": None if heap is None else heap.peak_mib - heap.start_mib}
    if device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["train_cuda_mib"] = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2**20
    return result


def method_of(config: str) -> str:
    """The registry name in a `dreamlora-<method>[@eq]` configuration."""
    return config.split("-", 1)[1].removesuffix(EQUAL)


def equal_param_ranks(configs: list[str], ranks: list[int]) -> dict[int, dict[str, int]]:
    """bench rank -> {`@eq` configuration: the rank at which its parameter count is closest to the reference's}.
    Counted on a meta-device UNet: no weights, one layer built per distinct target shape and probed rank."""
    equal = [c for c in configs if c.endswith(EQUAL)]
    if not equal:
        return {}
    from equal_params import equal_param_rank, param_counter

    from pipelines.diffusion.sd_configs import build_sd15_unet

    unet = build_sd15_unet("meta")
    reference, _ = param_counter(unet, method_of(REFERENCE), TARGETS)
    counters = {c: param_counter(unet, method_of(c), TARGETS) for c in equal}
    return {rank: {c: equal_param_rank(count, reference(rank), cap) for c, (count, cap) in counters.items()}
            for rank in ranks}


def plan(configs: list[str], ranks: list[int], eq_ranks: dict[int, dict[str, int]]) -> list[tuple[str, int, int]]:
    """One round of (configuration, bench rank, rank it runs at). An `@eq` configuration whose rank is the bench
    rank is left out: its same-rank row already is the equal-parameter one."""
    jobs = []
    for rank in ranks:
        for config in configs:
            used = eq_ranks[rank][config] if config.endswith(EQUAL) else rank
            if not (config.endswith(EQUAL) and used == rank):
                jobs.append((config, rank, used))
    return jobs


def run_one(config: str, rank: int, rank_used: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", config.removesuffix(EQUAL), "--ranks", str(rank_used),
           "--latent", str(args.latent), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--dtype", args.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "config": config, "rank": rank, "rank_used": rank_used}


def train_memory(run: dict) -> float:
    """CUDA allocator peak on a GPU; on the CPU the heap peak (live allocations), else the resident-set peak."""
    for key in ("train_cuda_mib", "train_heap_mib", "train_rss_mib"):
        if run.get(key) is not None:
            return run[key]
    raise KeyError("no memory figure in the worker's result")


def summarise(runs: list[dict], ranks: list[int]) -> list[dict]:
    rows = []
    for rank in ranks:
        best = {}
        for config in CONFIGS:
            mine = [r for r in runs if r["config"] == config and r["rank"] == rank]
            if mine:
                # Interference from other work only ever adds time, so the fastest step over all rounds is
                # the steadiest estimate of each configuration's cost; the median is kept beside it.
                best[config] = {"min_s": min(r["min_s"] for r in mine), "rank_used": mine[0]["rank_used"],
                                "median_s": statistics.median(t for r in mine for t in r["step_s"]),
                                "trainable_params": mine[0]["trainable_params"],
                                "train_mem_mib": max(train_memory(r) for r in mine)}
        for config, r in best.items():
            row = {"rank": rank, "config": config, "rank_used": r["rank_used"],
                   "trainable_params": r["trainable_params"], "step_s": r["min_s"], "median_s": r["median_s"],
                   "x_floor": r["min_s"] / best["floor"]["min_s"], "train_mem_mib": r["train_mem_mib"]}
            if REFERENCE in best:
                row["x_our_lora"] = r["min_s"] / best[REFERENCE]["min_s"]
                row["params_x_lora"] = r["trainable_params"] / best[REFERENCE]["trainable_params"]
            rows.append(row)
    return rows


def markdown(rows: list[dict], args, same_rank_equal: dict[int, list[str]]) -> str:
    head = (f"SD 1.5 UNet, {args.latent}×{args.latent} latents, batch 1, attention targets, AdamW, "
            f"{args.device} {args.dtype}, {args.threads} CPU thread(s); fastest of {args.steps} steps × {args.rounds} "
            "interleaved rounds (median beside); train mem = largest heap in use above the heap after set-up (CPU, "
            "glibc mallinfo2) or CUDA max_memory_allocated above the allocated memory after set-up. "
            f"`{EQUAL}` rows: the method at the rank whose trainable parameter count is closest to {REFERENCE}'s "
            "at the row's rank (ties to the lower count, then the lower rank)\n\n"
            "| rank | config | rank used | trainable params | params / lora params | step (s) | median (s) | "
            "× floor | × our lora | train mem (MiB) |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    nan = float("nan")
    table = "".join(
        f"| {r['rank']} | {r['config']} | {r['rank_used']} | {r['trainable_params']:,} | "
        f"{r.get('params_x_lora', nan):.3f} | {r['step_s']:.3f} | {r['median_s']:.3f} | {r['x_floor']:.3f} | "
        f"{r.get('x_our_lora', nan):.3f} | {r['train_mem_mib']:.0f} |\n" for r in rows)
    notes = "".join(f"\nAt rank {rank}, the equal-parameter rank of {', '.join(c.removesuffix(EQUAL) for c in cs)} "
                    "is the bench rank itself: its same-rank row is its equal-parameter row.\n"
                    for rank, cs in same_rank_equal.items() if cs)
    return head + table + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="4,64", help="comma-separated ranks")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {CONFIGS}")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every worker (CPU)")
    parser.add_argument("--output", default=str(RESULTS / "adapter_step"), help="path stem for .json and .md")
    parser.add_argument("--quick", action="store_true", help="rank 4, 3 steps, 1 round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, int(args.ranks), args.latent, args.steps, args.warmup, args.device,
                                args.dtype)))
        return
    if args.quick:
        args.ranks, args.steps, args.warmup, args.rounds = "4", 3, 1, 1
    ranks = [int(r) for r in args.ranks.split(",")]
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or "floor" not in configs:
        sys.exit(f"--configs: unknown {unknown} (known: {CONFIGS}); 'floor' is required for the ratios")
    from tqdm import tqdm

    eq_ranks = equal_param_ranks(configs, ranks)
    one_round = plan(configs, ranks, eq_ranks)
    same_rank_equal = {r: [c for c, used in eq.items() if used == r] for r, eq in eq_ranks.items()}
    jobs = one_round * args.rounds
    runs = [run_one(c, r, used, args) for c, r, used in tqdm(jobs, desc="adapter step bench", unit="process")]
    rows = summarise(runs, ranks)
    table = markdown(rows, args, same_rank_equal)
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "args": vars(args), "equal_param_ranks": eq_ranks}
    write_report(args.output, {"meta": meta, "rows": rows, "runs": runs}, table)


if __name__ == "__main__":
    main()
