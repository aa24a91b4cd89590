"""ReLoRA's cost on the SD 1.5 UNet: one merge-and-restart, and the train step as merges accumulate.

Setup: SD 1.5 UNet architecture (random init, the cache of adapter_step.py), attention targets, batch 1, 32×32
latents, AdamW, fp32, CPU unless --device says otherwise. Per rank:

- merge: the work of a merge step beyond a plain step (every layer's merge_and_restart, the seeded re-draw and
  the full reset of AdamW's moments), timed for each of the first merges;
- step after k merges: the stacked merges stay factors (merged_B·merged_A·x in the forward, rank k·r), so the
  step grows with k; timed at k = 0 and at each --merges value, as a ratio to k = 0 in the same process;
- state: the bytes of the stacked merges against fp32 copies of every adapted weight (what ReLoRA would keep if
  it stored the merged weights instead).

    python bench/relora_merge.py            # ranks 4 and 16; writes bench/results/relora_merge.{json,md}
    python bench/relora_merge.py --quick    # rank 4, merges 0 and 2

Not a timed test: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from adapter_step import RESULTS, TARGETS, cached_sd15_unet  # bench/ (scripts run from bench/)
from report import write_report

import dreamlora
from dreamlora.methods.relora import ReLoRAOptions, reset_moments


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(rank: int, merges: list[int], steps: int, latent: int, device: str) -> dict:
    torch.manual_seed(0)
    unet = cached_sd15_unet(device, torch.float32)
    options = ReLoRAOptions(steps=10**9, warmup_steps=0)  # merges are called below, never by the step hook
    dreamlora.attach(unet, dreamlora.AdapterConfig(method="relora", rank=rank, target_modules=TARGETS,
                                                    options=options))
    layers = list(dreamlora.adapter_layers(unet, "default").values())
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, latent, latent, generator=gen).to(device)
    context = torch.randn(1, 77, 768, generator=gen).to(device)
    target = torch.randn(1, 4, latent, latent, generator=gen).to(device)
    timestep = torch.tensor([500], device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = torch.nn.functional.mse_loss(unet(latents, timestep, context).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    def merge():
        for layer in layers:
            layer.merge_and_restart()
        reset_moments(layers, optimizer, options)
        sync()

    step()  # warm-up (and AdamW's state exists before the first reset)
    merge_s, step_s = [], {}
    for k in range(max(merges) + 1):
        if k in merges:
            step_s[k] = [timed(step) for _ in range(steps)]
        if k < max(merges):
            if not step_s.get(k):
                step()  # the factors must move between merges, or each merge appends zeros
            merge_s.append(timed(merge))
    merged_bytes = sum(t.numel() * t.element_size() for layer in layers for t in (layer.merged_A, layer.merged_B))
    dense_bytes = sum(layer.delta_weight().numel() * 4 for layer in layers)  # ΔW has the adapted weight's shape
    median = {k: statistics.median(v) for k, v in step_s.items()}
    return {"rank": rank, "layers": len(layers), "merge_s": merge_s, "step_s": step_s, "median_step_s": median,
            "merged_state_mib": merged_bytes / 2**20, "dense_fp32_mib": dense_bytes / 2**20,
            "merges_done": max(merges)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="4,16")
    p.add_argument("--merges", default="0,4,16", help="step times after this many merges (0 is the baseline)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per merge count")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.ranks, args.merges, args.steps = "4", "0,2", 2
    merges = sorted({0, *(int(k) for k in args.merges.split(","))})
    runs = [measure(int(r), merges, args.steps, args.latent, args.device) for r in args.ranks.split(",")]
    rows = ["| rank | one merge (ms), all layers | step after 0 merges (s) | "
            + " | ".join(f"after {k} (× 0)" for k in merges[1:]) + " | merged state (MiB) | dense fp32 (MiB) |",
            "|---:|---:|---:|" + "---:|" * (len(merges) - 1) + "---:|---:|"]
    for run in runs:
        base = run["median_step_s"][0]
        after = " | ".join(f"{run['median_step_s'][k]:.2f} ({run['median_step_s'][k] / base:.2f}×)"
                           for k in merges[1:])
        rows.append(f"| {run['rank']} | {1000 * statistics.median(run['merge_s']):.0f} | {base:.2f} | {after} | "
                    f"{run['merged_state_mib']:.1f} after {run['merges_done']} | {run['dense_fp32_mib']:.1f} |")
    table = (f"ReLoRA on the SD 1.5 UNet ({runs[0]['layers']} attention projections), batch 1, {args.latent}×"
             f"{args.latent} latents, fp32, {args.device}, {torch.get_num_threads()} threads; medians of "
             f"{args.steps} steps.\n\n" + "\n".join(rows) + "\n")
    write_report(RESULTS / ("relora_merge_quick" if args.quick else "relora_merge"),
                 {"args": vars(args), "python": sys.version.split()[0], "torch": torch.__version__, "runs": runs},
                 table)


if __name__ == "__main__":
    main()
