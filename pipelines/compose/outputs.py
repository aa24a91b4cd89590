"""What a composition writes: the search as it runs (`search.jsonl`, one evaluation per line: what the app's Compose
view follows; tensorboard's `compose/objective`), then the composed adapter as a normal output folder.

- images: `unet_adapter.safetensors` (and `text_encoder_adapter.safetensors`, SDXL's
  `text_encoder_2_adapter.safetensors`), diffusers' `pytorch_lora_weights`
  and the kohya file, as `dreamlora/train.py` writes them, so `pipelines.sample`, DreamBench, scoring, the app and
  `pipe.load_lora_weights(output_dir)` take it like a trained adapter;
- classifiers: `adapter.safetensors`, `head.safetensors` (the heads mixed with the same weights) and the PEFT
  folder, as `dreamlora/train_text.py` writes them, with the validation scores when --validation_file is given;
- `run.json` (`"weights": {adapter as given: w}`, the history, the wall time) and `search.png`.
Files are written atomically; a classifier's run.json is what `pipelines.text.models.load_trained` reads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

import dreamlora
from dreamlora.atomic import atomic_write_json
from dreamlora.errors import DataError
from pipelines.compose.search import Evaluation, as_json

SEARCH_FILE = "search.jsonl"
SEARCH_PLOT = "search.png"


class HeadMix:
    """A classifier's head (trained in full with each adapter) as Σ wᵢ·Hᵢ, written into the model in place."""

    def __init__(self, model: torch.nn.Module, heads: list[tuple[str, Path]]):
        from safetensors.torch import load_file

        from dreamlora.io import read_metadata

        params = dict(model.named_parameters())
        self.heads = []
        for label, path in heads:
            read_metadata(path)  # a safetensors file, before any parser sees it (never unpickled)
            tensors = load_file(str(path))
            for name, value in tensors.items():
                if name not in params or params[name].shape != value.shape:
                    raise DataError(f"--adapter {label!r}: its head {name} {tuple(value.shape)} does not fit the "
                                    "base's classifier (another base or label count?)")
            self.heads.append({n: t.to(params[n].device, torch.float32) for n, t in tensors.items()})
        names = [sorted(h) for h in self.heads]
        if any(n != names[0] for n in names):
            raise DataError("--adapter: the classifier heads of the adapters hold different weights "
                            f"({names[0]} vs {next(n for n in names if n != names[0])}); they cannot be mixed")
        self.params = {n: params[n] for n in names[0]}

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @torch.no_grad()
    def apply(self, weights: list[float]) -> None:
        for name, param in self.params.items():
            param.copy_(sum(w * head[name] for w, head in zip(weights, self.heads, strict=True)))


class SearchRecord:
    """`search.jsonl`, appended as the search runs (main process only). The output folder is created here, once every
    input was checked: a refused input leaves nothing behind."""

    def __init__(self, output_dir: Path, labels: list[str], main: bool):
        self.path, self.labels, self.main = output_dir / SEARCH_FILE, labels, main
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")

    def add(self, evaluation: Evaluation, tracker) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(as_json(evaluation, self.labels)) + "\n")
        if tracker is not None:
            tracker.add_scalar("compose/objective", evaluation.objective, evaluation.index)
            tracker.add_scalar("compose/loss", evaluation.loss, evaluation.index)


def start_tracker(accelerator, args, output_dir: Path):
    """A tensorboard writer on the main process (None without --report_to tensorboard)."""
    if not accelerator.is_main_process or args.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output_dir / args.logging_dir))


def write(args, output_dir: Path, setup, components: dict, summary: dict, history: list[Evaluation]) -> None:
    from eval.plots import search_history

    first = setup.models[next(iter(components))]
    run = {"args": vars(args), **summary, "method": "lora",
           "adapter_config": dataclasses.asdict(dreamlora.adapter_config(first, "default")),
           "composed_rank": {c: comp.rank for c, comp in components.items()}}
    if setup.task == "image":
        run.update(_write_image(args, output_dir, setup, components))
    else:
        run.update(_write_text(args, output_dir, setup))
    search_history([h.objective for h in history], [h.source for h in history], summary["weights"],
                   output_dir / SEARCH_PLOT, f"{args.rule} rule, {len(summary['weights'])} adapters")
    run["search_plot"] = SEARCH_PLOT
    atomic_write_json(output_dir / "run.json", run)


def _write_image(args, output_dir: Path, setup, components: dict) -> dict:
    from pipelines.diffusion.export import write_tool_files
    from pipelines.trainer.checkpoints import adapter_file

    for component in components:
        dreamlora.save(setup.models[component], adapter_file(output_dir, component))
    encoders = {c: setup.models[c] if c in components else None for c in ("text_encoder", "text_encoder_2")}
    files = write_tool_files(output_dir, setup.models["unet"], encoders["text_encoder"], kohya=not args.no_kohya_format,
                             text_encoder_2=encoders["text_encoder_2"],
                             prediction_type=setup.extra.get("prediction_type"))
    return {"files_for_tools": files, "instance_prompt": args.instance_prompt, "photos": setup.extra["photos"],
            "pretrained_model_name_or_path": args.pretrained_model_name_or_path}


def _write_text(args, output_dir: Path, setup) -> dict:
    from eval.classification import classification_metrics
    from pipelines.text import models as text_models
    from pipelines.text import peft_folder
    from pipelines.trainer.checkpoints import save_parameters

    model, extra = setup.models["model"], setup.extra
    dreamlora.save(model, output_dir / text_models.ADAPTER_FILE)
    save_parameters(model, setup.heads.names, output_dir / text_models.HEAD_FILE)
    files = peft_folder.write_peft_folder(output_dir, model, setup.heads.names, extra["resolved_path"])
    out = {"task": "text-classification", "composed": True, "model_name_or_path": args.pretrained_model_name_or_path,
           "labels": extra["labels"], "max_length": extra["max_length"], "files_for_tools": files,
           "train_examples": extra["examples"], "head_parameters": setup.heads.names}
    if extra["validation"]:
        device = next(model.parameters()).device
        predicted = text_models.predict(model, extra["validation"], extra["collator"], 128, device)
        metrics = classification_metrics(predicted, [f["labels"] for f in extra["validation"]], len(extra["labels"]))
        out.update({f"eval_{k}": v for k, v in metrics.items()}, eval_examples=len(extra["validation"]))
    return out
