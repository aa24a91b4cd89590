"""`python -m pipelines.compose`: learn how to mix trained adapters for a new subject or task from a few examples,
without gradients (LoRAHub), and write the mix as a normal adapter output folder.

    python -m pipelines.compose --pretrained_model_name_or_path BASE --adapter runs/dog --adapter runs/cat \\
        --instance_data_dir photos/ --instance_prompt "a photo of sks dog" --output_dir runs/mix
    python -m pipelines.compose --model_name_or_path minilm --adapter runs/sst2 --adapter runs/subj \\
        --train_file few.txt --validation_file dev.txt --output_dir runs/mr-mix

Reads top to bottom: flags → the library (every adapter checked before any model loads) → the base, the examples
and their objective (`objectives`) → the adapters attached (and checked against the base) → the search (`search`):
under the "updates" rule the library adapters are scaled live, under "factors" the mixed factors are written into
one attached adapter per candidate (`dreamlora.compose`) → the composed adapter, scored once more as written →
the output folder (`outputs`). `accelerate launch -m pipelines.compose ...` splits the examples over processes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import dreamlora
from dreamlora import compose
from dreamlora.errors import ArgError, DataError
from pipelines.compose import library as lib
from pipelines.compose import outputs, search
from pipelines.compose.objectives import CrossEntropyObjective, DenoisingObjective
from pipelines.trainer import launch

log = logging.getLogger("dreamlora.compose")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.compose", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and library")
    g.add_argument("--pretrained_model_name_or_path", "--model_name_or_path", dest="pretrained_model_name_or_path",
                   help="the base: a diffusers SD folder or hub id, or a classifier base ('minilm', a folder, a hub "
                        "id) (required)")
    g.add_argument("--revision", help="hub revision of a diffusers base")
    g.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="a trained adapter: a training output folder (or one native UNet adapter file); repeat it")
    g = p.add_argument_group("examples of the new subject (images) or task (classifier)")
    g.add_argument("--instance_data_dir", help="a few photos of the new subject (images)")
    g.add_argument("--instance_prompt", help="their prompt, e.g. 'a photo of sks dog' (images)")
    g.add_argument("--resolution", type=int, default=512, help="photos are resized and center-cropped to this")
    g.add_argument("--num_pairs", type=int, default=8, help="fixed (timestep, noise) pairs per photo")
    g.add_argument("--train_file", help="the few labelled examples (classifier; formats as train_text.py)")
    g.add_argument("--validation_file", help="scores the composed classifier; eval_accuracy goes to run.json")
    g.add_argument("--data_format", choices=["csv", "tsv", "jsonl", "label_text"])
    g.add_argument("--text_column")
    g.add_argument("--text_pair_column")
    g.add_argument("--label_column", default="label")
    g.add_argument("--max_length", type=int, default=128)
    g = p.add_argument_group("search")
    g.add_argument("--rule", choices=list(compose.RULES), default="updates",
                   help="updates: the exact ΔW = Σ wᵢ·ΔWᵢ (any ranks and methods); factors: LoRAHub's A = Σ wᵢAᵢ, "
                        "B = Σ wᵢBᵢ (same layers and ranks)")
    g.add_argument("--budget", type=int, default=40, help="evaluations, the seeded candidates included")
    g.add_argument("--l1", type=float, default=0.05, help="weight of the L1 penalty mean|wᵢ| (LoRAHub's 0.05)")
    g.add_argument("--lower_bound", type=float, default=-1.5, help="smallest weight (LoRAHub: -1.5)")
    g.add_argument("--upper_bound", type=float, default=1.5, help="largest weight (LoRAHub: 1.5)")
    g.add_argument("--optimizer", default=search.DEFAULT_OPTIMIZER, help="a nevergrad optimizer name")
    g.add_argument("--seed", type=int, default=0, help="seed of the optimizer and of the (timestep, noise) pairs")
    g.add_argument("--restart_from", help="a search.jsonl of an earlier search: its points are told to the optimizer")
    g.add_argument("--weights", help="comma-separated weights, one per --adapter: no search, this mix is scored and "
                                     "written (as PEFT's add_weighted_adapter or kohya's merge scripts would take it)")
    g = p.add_argument_group("run and output")
    g.add_argument("--output_dir", help="the composed adapter's output folder (required)")
    g.add_argument("--batch_size", type=int, default=8, help="examples per forward pass, per process")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    g.add_argument("--report_to", choices=["tensorboard", "none"], default="tensorboard")
    g.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    g.add_argument("--no_kohya_format", action="store_true", help="skip kohya_lora.safetensors (images)")
    g.add_argument("--output_kohya_format", action="store_true",
                   help="accepted as in train.py; the kohya file is written by default")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag in ("pretrained_model_name_or_path", "output_dir"):
        if not getattr(args, flag):
            raise ArgError(f"--{flag} is required")
    for flag in ("resolution", "num_pairs", "batch_size", "max_length"):
        if getattr(args, flag) <= 0:
            raise ArgError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.resolution % 8:
        raise ArgError(f"--resolution must be a multiple of 8 (the VAE's factor), got {args.resolution}")
    args.report_to = None if args.report_to == "none" else args.report_to
    return args


@dataclass
class Setup:
    """One side (images or classifier): the components the adapters attach to, the objective, and the heads."""

    task: str
    models: dict[str, torch.nn.Module]
    objective: object
    heads: outputs.HeadMix | None = None
    extra: dict = field(default_factory=dict)


def check_data_flags(args, task: str) -> None:
    if task == "image":
        if args.train_file or args.validation_file:
            raise ArgError("--train_file/--validation_file are for classifier adapters; these adapters are DreamBooth "
                           "(image) adapters: give --instance_data_dir and --instance_prompt")
        if not args.instance_data_dir or not args.instance_prompt:
            raise ArgError("image adapters are composed on a few photos: give --instance_data_dir and "
                           "--instance_prompt")
    else:
        if args.instance_data_dir:
            raise ArgError("--instance_data_dir is for image adapters; these are classifier adapters: give "
                           "--train_file")
        if not args.train_file:
            raise ArgError("classifier adapters are composed on a few labelled examples: give --train_file")


def image_setup(args, accelerator) -> Setup:
    from pipelines.diffusion.loss import prediction_type
    from pipelines.diffusion.models import load_components

    try:
        sd = load_components(args.pretrained_model_name_or_path, args.revision)
        prediction_type(sd.noise_scheduler)
    except ValueError as e:
        raise ArgError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: {e}") from None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (sd.unet, sd.vae, *sd.text_encoders.values()):  # SDXL's VAE stays fp32 (it overflows in fp16)
        model.requires_grad_(False).to(accelerator.device, torch.float32 if sd.is_sdxl and model is sd.vae
                                       else dtype).eval()
    objective = DenoisingObjective(sd, args.instance_data_dir, args.instance_prompt, args.resolution, args.num_pairs,
                                   args.seed, args.batch_size, accelerator, dtype)
    return Setup("image", {"unet": sd.unet, **sd.text_encoders}, objective,
                 extra={"photos": objective.photos, "prediction_type": sd.noise_scheduler.config.prediction_type})


def text_setup(args, accelerator, library: list[lib.LibraryAdapter]) -> Setup:
    from pipelines.text import models as text_models
    from pipelines.text.data import Columns, PadCollator, read_examples, tokenize

    columns = Columns(text=args.text_column, pair=args.text_pair_column, label=args.label_column)
    train, found = read_examples(args.train_file, "--train_file", args.data_format, columns)
    lib.check_labels(library, found, "--train_file", args.train_file)
    labels = library[0].labels  # the heads' order: the examples' label indices follow it
    train.labels = [labels.index(found[i]) for i in train.labels]
    validation = None
    if args.validation_file:
        validation, _ = read_examples(args.validation_file, "--validation_file", args.data_format, columns, labels)
    path = text_models.resolve_model_path(args.pretrained_model_name_or_path)
    tokenizer = text_models.load_tokenizer(path)
    model, _ = text_models.load_classifier(path, labels, ignore_mismatched_sizes=True)
    model.requires_grad_(False).to(accelerator.device).eval()
    max_length = text_models.usable_max_length(tokenizer, model.config, args.max_length)
    collator = PadCollator(tokenizer.pad_token_id, tokenizer.padding_side)
    features = tokenize(tokenizer, train, max_length)
    heads = outputs.HeadMix(model, [(a.label, a.head) for a in library])
    objective = CrossEntropyObjective(model, features, collator, args.batch_size, accelerator)
    return Setup("text", {"model": model}, objective, heads,
                 extra={"labels": labels, "max_length": max_length, "collator": collator, "resolved_path": path,
                        "validation": validation and tokenize(tokenizer, validation, max_length),
                        "examples": len(features)})


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    library = lib.resolve_all(args.adapter, args.rule)
    task = library[0].task
    check_data_flags(args, task)
    settings = search.SearchSettings(budget=args.budget, l1=args.l1, lower=args.lower_bound, upper=args.upper_bound,
                                     seed=args.seed, optimizer=args.optimizer)
    labels = [a.label for a in library]
    fixed = parse_weights(args.weights, labels) if args.weights else None
    if fixed is None:
        search.check_settings(settings, len(library), restarting=bool(args.restart_from))
    restart = search.read_history(args.restart_from, labels) if args.restart_from else []
    if args.output_kohya_format:
        print("note: --output_kohya_format is the default here: the kohya file is written unless --no_kohya_format")

    import accelerate

    accelerator = accelerate.Accelerator(mixed_precision=args.mixed_precision,
                                         cpu=launch.device_type() == "cpu")
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ArgError("--mixed_precision fp16 needs a CUDA or Apple MPS device; on the CPU use bf16 or no")
    setup = image_setup(args, accelerator) if task == "image" else text_setup(args, accelerator, library)
    names = lib.attach(setup.models, library, args.pretrained_model_name_or_path)
    mixer = Mixer(setup, library, names, args.rule)

    output_dir = Path(args.output_dir)
    record = outputs.SearchRecord(output_dir, labels, accelerator.is_main_process)
    tracker = outputs.start_tracker(accelerator, args, output_dir)
    search_start = time.perf_counter()

    def evaluate(weights: list[float]) -> float:
        mixer.apply(weights)
        return setup.objective()

    if fixed is not None:
        history = [search.fixed(evaluate, fixed, settings.l1)]
        record.add(history[0], tracker)
    else:
        stop_requested = launch.install_stop_signal()
        history = search.search(evaluate, labels, settings, accelerator, restart,
                                on_evaluation=lambda e: record.add(e, tracker),
                                stop=lambda: launch.stop_everywhere(accelerator, stop_requested))
    search_time = time.perf_counter() - search_start
    if tracker is not None:
        tracker.close()
    chosen = search.best(history)
    errors = mixer.finish(chosen.weights)
    composed_loss = setup.objective()
    if accelerator.is_main_process:
        summary = {
            "composed": True, "rule": args.rule, "rule_formula": compose.RULES[args.rule],
            "weights": dict(zip(labels, chosen.weights, strict=True)),
            "best": search.as_json(chosen, labels), "search_loss": chosen.loss, "composed_loss": composed_loss,
            "objective_history": [h.objective for h in history], "evaluations": len(history) - len(restart),
            "stopped_early": fixed is None and len(history) - len(restart) < args.budget,
            "restarted_from": args.restart_from, "search_time_s": search_time,
            "wall_time_s": time.perf_counter() - start, "library": [a.describe() for a in library],
            "seeded": {h.source: {"loss": h.loss, "objective": h.objective} for h in history
                       if h.source not in (settings.optimizer, "restart")},
            "budget": args.budget, "l1": args.l1, "bounds": [args.lower_bound, args.upper_bound], "seed": args.seed,
            "optimizer": args.optimizer, "truncated_layers": errors, "processes": accelerator.num_processes,
        }
        outputs.write(args, output_dir, setup, mixer.components, summary, history)
        print(f"composed {len(labels)} adapters by the {args.rule} rule in {search_time:.1f}s "
              f"({summary['evaluations']} evaluations): loss {chosen.loss:.4f} (base {_seeded_loss(history, 'base')}), "
              f"weights {', '.join(f'{k}={v:+.3f}' for k, v in summary['weights'].items())} -> {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def parse_weights(text: str, labels: list[str]) -> list[float]:
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise ArgError(f"--weights {text!r}: comma-separated numbers, one per --adapter") from None
    if len(weights) != len(labels):
        raise ArgError(f"--weights has {len(weights)} values for {len(labels)} --adapter flags")
    if not all(math.isfinite(w) for w in weights):
        raise ArgError(f"--weights {text!r}: finite numbers only")
    return weights


def _seeded_loss(history, source: str) -> str:
    found = [h.loss for h in history if h.source == source]
    return f"{found[0]:.4f}" if found else "not evaluated"


class Mixer:
    """Applies candidate weights: live `set_scale` on the library adapters under "updates", the mixed factors
    written into one attached adapter under "factors"; the heads (classifiers) mixed in place either way. `finish`
    leaves only the composed adapter ("default") on each component, holding the chosen weights."""

    def __init__(self, setup: Setup, library: list[lib.LibraryAdapter], names: list[str], rule: str):
        self.setup, self.rule, self.names, self.labels = setup, rule, names, [a.label for a in library]
        # component -> (indices into the library of the adapters that adapt it, their names)
        self.members = {c: [i for i, a in enumerate(library) if c in a.files] for c in setup.models}
        self.members = {c: ids for c, ids in self.members.items() if ids}
        self.components: dict[str, compose.Composition] = {}
        if rule == "factors":
            self._compose()

    def _compose(self) -> None:
        for component, ids in self.members.items():
            model = self.setup.models[component]
            factors = {f"--adapter {self.labels[i]!r}": compose.adapter_factors(model, self.names[i]) for i in ids}
            for i in ids:
                dreamlora.detach(model, self.names[i])
            try:
                self.components[component] = compose.Composition(model, factors, self.rule, name="default")
            except compose.CompositionError as e:
                raise DataError(f"{component}: {e}") from None

    def apply(self, weights: list[float]) -> None:
        for component, ids in self.members.items():
            if self.components:
                self.components[component].set_weights([weights[i] for i in ids])
            else:
                for i in ids:
                    dreamlora.set_scale(self.setup.models[component], self.names[i], weights[i])
        if self.setup.heads is not None:
            self.setup.heads.apply(weights)

    def finish(self, weights: list[float]) -> dict[str, dict[str, float]]:
        if not self.components:
            self._compose()
        errors = {}
        for component, ids in self.members.items():
            found = self.components[component].set_weights([weights[i] for i in ids])
            if found:
                errors[component] = found
                log.warning("%s: %d layers need a rank above the composed adapter's %d; they hold the best "
                            "approximation (relative error up to %.2g): compose fewer adapters or use --rule factors",
                            component, len(found), self.components[component].rank, max(found.values()))
        if self.setup.heads is not None:
            self.setup.heads.apply(weights)
        return errors


def cli(argv: list[str] | None = None) -> int:
    return launch.run_cli(main, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
