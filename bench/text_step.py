"""Train-step cost per method on a real text classifier (all-MiniLM-L6-v2, offline), as ratios in one run.

    python bench/text_step.py        # writes bench/results/text_step.{json,md}

The sweep's wall times (pipelines.text.sweep) measure whole runs on a shared machine; this isolates the
step: one fixed SST-2 batch (16 sentences, dynamic padding), forward + backward + AdamW over adapters and
head, every method built once and timed in interleaved rounds. The figure is the 20th-percentile step time;
the ratio is to LoRA in the same run. "head only" is the floor: the frozen backbone's forward and the
head's update, no adapters.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from report import write_report  # bench/report.py (scripts run from bench/)

import dreamlora
from pipelines.text import models as text_models
from pipelines.text.data import Columns, PadCollator, read_examples, tokenize

RESULTS = Path(__file__).parent / "results"
SST2 = Path(__file__).parent.parent / "tests" / "assets" / "text" / "sst2_train_400.txt"
CONFIGS = ["head only", *dreamlora.METHODS, "peft-lora", "peft-dora"]
RUN_STEPS = 1000  # the run length the step hooks are told (AdaLoRA scores importance over its first 70 %)


def build(config: str, base, rank: int):
    model = copy.deepcopy(base)
    targets = ["query", "value"]
    if config.startswith("peft-"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                 use_dora=config == "peft-dora", modules_to_save=["classifier"]))
    elif config == "head only":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
    else:
        dreamlora.attach(model, dreamlora.AdapterConfig(method=config, rank=rank, target_modules=targets,
                                                        exclude_modules=["classifier"]))
        for layer in dreamlora.adapter_layers(model, "default").values():
            layer.step = 1  # past SingLoRA's first step, like any step of a real run
        model.classifier.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def step_time(model, optimizer, batch) -> float:
    """One optimizer step as train_text.py's loop takes it: the methods' extra loss term and step hook included
    (AdaLoRA's orthogonality term and importance scores; a no-op for the others and for PEFT's models)."""
    start = time.perf_counter()
    (model(**batch).loss + dreamlora.regularization_loss(model)).backward()
    optimizer.step()
    dreamlora.on_optimizer_step(model, optimizer, None, RUN_STEPS)
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="timed steps per config per round")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    path = text_models.resolve_model_path("minilm")
    tokenizer = text_models.load_tokenizer(path)
    base, _ = text_models.load_classifier(path, ["0", "1"])
    examples, _ = read_examples(SST2, "--train_file", None, Columns())
    batch = PadCollator(tokenizer.pad_token_id)(tokenize(tokenizer, examples, 128)[: args.batch])
    models = {c: build(c, base, args.rank) for c in CONFIGS}
    times = {c: [] for c in CONFIGS}
    for c in CONFIGS:  # warm-up
        step_time(*models[c][:2], batch)
    for _ in range(args.rounds):
        for c in CONFIGS:
            times[c] += [step_time(*models[c][:2], batch) for _ in range(args.steps)]
    ms = {c: 1000 * float(torch.tensor(t).quantile(0.2)) for c, t in times.items()}
    rows = ["| config | trainable params | step (ms) | / lora |", "|---|---:|---:|---:|"]
    for c in CONFIGS:
        rows.append(f"| {c} | {models[c][2]:,} | {ms[c]:.1f} | {ms[c] / ms['lora']:.3f} |")
    table = (f"MiniLM-L6 (22.7M) classifier, SST-2 batch of {args.batch} (padded to "
             f"{batch['input_ids'].shape[1]} tokens), rank {args.rank} on query/value, fp32, "
             f"{torch.get_num_threads()} threads; 20th percentile of {args.rounds}×{args.steps} interleaved steps.\n\n"
             + "\n".join(rows) + "\n")
    write_report(RESULTS / "text_step", {"args": vars(args), "ms": ms, "times_s": times,
                                         "params": {c: m[2] for c, m in models.items()}}, table)


if __name__ == "__main__":
    main()
