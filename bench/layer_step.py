"""Train-step cost of one adapted layer, per method, at SD 1.5 attention shapes: a low-noise companion to
adapter_step.py (whose whole-UNet steps are dominated by the frozen convolutions and by machine noise).

    python bench/layer_step.py        # writes bench/results/layer_step.{json,md}

Each (shape, rank) runs every configuration in interleaved rounds; the figure is the 20th-percentile step
time over all rounds, in milliseconds. fwd + bwd (to the adapter and the input) + AdamW step.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from report import write_report  # bench/report.py (scripts run from bench/)
from torch import nn

import dreamlora

RESULTS = Path(__file__).parent / "results"
# (tokens, d_in, d_out): SD 1.5 at 32×32 latents: self-attention of levels 1-3, cross-attention to_k/to_v.
SHAPES = [(1024, 320, 320), (256, 640, 640), (64, 1280, 1280), (77, 768, 320)]
CONFIGS = ["floor", *(f"dreamlora-{m}" for m in dreamlora.METHODS), "peft-lora", "peft-dora"]


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def build(config: str, base: nn.Module, rank: int) -> nn.Module:
    model = copy.deepcopy(base)
    if config == "floor":
        return model.requires_grad_(False)
    if config.startswith("dreamlora-"):
        dreamlora.attach(model, dreamlora.AdapterConfig(method=config.split("-", 1)[1], rank=rank,
                                                         target_modules=["proj"]))
        for layer in dreamlora.adapter_layers(model, "default").values():
            layer.step = 1  # past SingLoRA's first step, like any step of a real run
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"],
                                            use_dora=config == "peft-dora"))


def time_steps(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(x.detach().requires_grad_()).square().mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="4,64")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS / "layer_step"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for tokens, d_in, d_out in SHAPES:
        for rank in (int(r) for r in args.ranks.split(",")):
            base, x = OneLinear(d_in, d_out), torch.randn(1, tokens, d_in)
            models = {c: build(c, base, rank) for c in CONFIGS}
            samples: dict[str, list[float]] = {c: [] for c in CONFIGS}
            for _ in range(args.rounds):
                for config, model in models.items():
                    samples[config] += time_steps(model, x, args.steps)[5:]
            ms = {c: sorted(t)[len(t) // 5] * 1e3 for c, t in samples.items()}
            for config in CONFIGS:
                rows.append({"tokens": tokens, "d_in": d_in, "d_out": d_out, "rank": rank, "config": config,
                             "p20_ms": ms[config], "x_floor": ms[config] / ms["floor"],
                             "x_our_lora": ms[config] / ms["dreamlora-lora"],
                             "x_peft_same": ms[config] / ms.get(config.replace("dreamlora", "peft"), float("nan"))})
    table = ("| tokens×d_in→d_out | rank | config | step (ms, p20) | × floor | × our lora | × PEFT same method |\n"
             "|---|---:|---|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['tokens']}×{r['d_in']}→{r['d_out']} | {r['rank']} | {r['config']} | {r['p20_ms']:.3f} | "
                 f"{r['x_floor']:.3f} | {r['x_our_lora']:.3f} | {r['x_peft_same']:.3f} |\n" for r in rows))
    write_report(args.output, {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "rows": rows}, table)


if __name__ == "__main__":
    main()
