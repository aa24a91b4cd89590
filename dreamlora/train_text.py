"""Adapter fine-tuning of a transformers sequence classifier: `accelerate launch dreamlora/train_text.py --help`.

Reads top to bottom: flags → data (checked before any model loads) → classifier → adapters on the
backbone, head trained in full → optimizer from the core's groups → the one loop (`pipelines.trainer.loop`)
with periodic evaluation → save. This file is the classifier task: the loss of a batch, evaluation and the
output files; the loop, checkpoints and progress file are the ones DreamBooth training uses too
(`pipelines.trainer`); nothing here asks which method it trains. Data order is a function of (seed, epoch), so
a resumed run retraces an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch dreamlora/train_text.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import dreamlora
from dreamlora import AdapterConfig
from dreamlora.atomic import atomic_write_json
from dreamlora.train_args import method_options
from dreamlora.train_text_args import parse_args
from eval.classification import classification_metrics
from pipelines.text import models as text_models
from pipelines.text.data import Columns, PadCollator, read_examples, tokenize
from pipelines.trainer import checkpoints, launch, loop, outputs
from pipelines.trainer.loop import Plan, RunResult
from pipelines.trainer.method_options import check_optimizer, resolve_method_options
from pipelines.trainer.order import EpochShuffle
from pipelines.trainer.progress import ProgressLog
from pipelines.trainer.state import batch_seed, steps_per_epoch

log = logging.getLogger("dreamlora.train_text")


def read_data(args):
    columns = Columns(text=args.text_column, pair=args.text_pair_column, label=args.label_column)
    train, labels = read_examples(args.train_file, "--train_file", args.data_format, columns)
    validation = None
    if args.validation_file:
        validation, _ = read_examples(args.validation_file, "--validation_file", args.data_format, columns, labels)
    for split, limit in ((train, args.max_train_samples), (validation, args.max_eval_samples)):
        if split is not None and limit:
            del split.texts[limit:], split.labels[limit:]
            if split.pairs is not None:
                del split.pairs[limit:]
    return train, validation, labels


def build_model(args, labels):
    """The classifier with adapters on its backbone and a fully trained head. Returns the model, the
    tokenizer, the optimizer groups and a summary of what trains."""
    path = text_models.resolve_model_path(args.model_name_or_path)
    tokenizer = text_models.load_tokenizer(path)
    model, fresh = text_models.load_classifier(path, labels, args.ignore_mismatched_sizes)
    targets = args.target_modules or text_models.default_targets(model)
    with launch.adapter_input():
        config = AdapterConfig(method=args.adapter, rank=args.rank, alpha=args.alpha, target_modules=targets,
                               exclude_modules=text_models.head_exclusions(model), dropout=args.lora_dropout,
                               use_rslora=args.use_rslora, init=args.init_lora_weights, options=method_options(args))
        dreamlora.attach(model, config)
    head = text_models.head_parameter_names(model, fresh)
    params = dict(model.named_parameters())
    for name in head:
        params[name].requires_grad_(True)
    groups = dreamlora.param_groups(model, lr=args.learning_rate, weight_decay=args.weight_decay)
    groups.append({"params": [params[n] for n in head], "lr": args.learning_rate,
                   "weight_decay": args.weight_decay, "name": "head"})
    summary = {"adapter_params": dreamlora.trainable_parameter_count(model),
               "head_params": sum(params[n].numel() for n in head), "head_trained": True,
               "head_parameters": head, "newly_initialised": fresh, "target_modules": targets,
               "resolved_model_path": path}
    return model, tokenizer, groups, summary


def evaluate(model, features, collator, args, accelerator, num_labels: int) -> dict[str, float]:
    """Metrics on the whole validation set, computed on the main process (the others wait)."""
    metrics = {}
    if accelerator.is_main_process:
        predicted = text_models.predict(accelerator.unwrap_model(model), features, collator,
                                        args.per_device_eval_batch_size, accelerator.device)
        metrics = classification_metrics(predicted, [f["labels"] for f in features], num_labels)
    accelerator.wait_for_everyone()
    return metrics


def build(args, accelerator, train, validation, labels, resume_from: Path | None) -> tuple[ClassifierTask, Plan]:
    """Classifier, adapters and data for the loop: the run's length (it sets run-dependent method options),
    the adapted classifier, the tokenized splits, the seeded data order and the optimizer and LR schedule."""
    batches_per_epoch, epoch_steps = steps_per_epoch(
        len(train), args.per_device_train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * epoch_steps
    resolve_method_options(args, max_steps, resume_from and checkpoints.adapter_file(resume_from, "model"))
    model, tokenizer, groups, what_trains = build_model(args, labels)
    max_length = text_models.usable_max_length(tokenizer, model.config, args.max_length)
    train_features = tokenize(tokenizer, train, max_length)
    eval_features = tokenize(tokenizer, validation, max_length) if validation is not None else None
    collator = PadCollator(tokenizer.pad_token_id, tokenizer.padding_side)
    optimizer = torch.optim.AdamW(groups)
    check_optimizer(args, optimizer)
    sampler = EpochShuffle(len(train_features), args.seed)
    loader = torch.utils.data.DataLoader(train_features, batch_size=args.per_device_train_batch_size,
                                         sampler=sampler, collate_fn=collator)
    from transformers import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                                 num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    task = ClassifierTask(args, accelerator, model, what_trains, labels, max_length, collator, eval_features,
                          {"train_examples": len(train_features), "eval_examples": len(eval_features or [])})
    plan = Plan({"model": model}, optimizer, lr_scheduler, loader, sampler.select_epoch, batches_per_epoch, max_steps)
    return task, plan


class ClassifierTask:
    """The text classifier for the one loop (`pipelines.trainer.loop`): the model's own loss, periodic
    evaluation into eval.jsonl, and the adapter, head and run.json files."""

    tracker_project = "dreamlora_text"
    checkpoint_at_end = False

    def __init__(self, args, accelerator, model, what_trains: dict, labels: list[str], max_length: int, collator,
                 eval_features, data_counts: dict):
        self.args, self.accelerator, self.model, self.what_trains = args, accelerator, model, what_trains
        self.labels, self.max_length, self.collator, self.eval_features = labels, max_length, collator, eval_features
        self.data_counts, self.metrics = data_counts, {}
        self.evaluates, self.eval_every = bool(eval_features), args.eval_steps
        self.history = None

    def start(self, models: dict) -> None:
        is_main = self.accelerator.is_main_process and self.evaluates
        self.history = ProgressLog(Path(self.args.output_dir) / "eval.jsonl" if is_main else None, 0, 0)

    def loss(self, models: dict, batch, epoch: int, index: int):
        # dropout draws from the global RNG: seeded by the batch's place, so a resume draws what a straight run did
        torch.manual_seed(batch_seed(self.args.seed, epoch, index, self.accelerator.process_index))
        return models["model"](**batch).loss, {}

    def evaluate(self, models: dict, step: int, train_time_s: float) -> None:
        self.metrics = evaluate(models["model"], self.eval_features, self.collator, self.args, self.accelerator,
                                len(self.labels))
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            self.accelerator.log({f"eval/{k}": v for k, v in self.metrics.items()}, step=step)
            self.history.write(event="eval", step=step, train_time_s=round(train_time_s, 2), **self.metrics)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()))

    def write_outputs(self, result: RunResult) -> None:
        write_outputs(self.args, Path(self.args.output_dir), self.model, self.what_trains, self.labels,
                      self.max_length, self.metrics, {
                          "steps": result.steps, "finished": result.finished, "wall_time_s": result.wall_time_s,
                          "train_time_s": result.train_time_s, "final_loss": result.final_loss,
                          **result.environment, **self.data_counts})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_requested = launch.install_stop_signal()  # first: a Stop during loading still ends cleanly
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train, validation, labels = read_data(args)  # data first: bad input fails before a model loads
    accelerator = launch.make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    resume_from = checkpoints.resolve_resume(Path(args.output_dir), args.resume_from_checkpoint)
    task, plan = build(args, accelerator, train, validation, labels, resume_from)
    return loop.train(task, plan, args, accelerator, stop_requested, resume_from)


def write_outputs(args, output_dir: Path, model, what_trains: dict, labels: list[str], max_length: int,
                  metrics: dict, run: dict) -> None:
    import dataclasses

    from pipelines.text import peft_folder

    dreamlora.save(model, output_dir / text_models.ADAPTER_FILE)
    checkpoints.save_parameters(model, what_trains["head_parameters"], output_dir / text_models.HEAD_FILE)
    outputs.prepare_exports(args, {"model": model})
    tool_files = peft_folder.write_peft_folder(output_dir, model, what_trains["head_parameters"],
                                               what_trains["resolved_model_path"])
    record = {
        "args": vars(args), "task": "text-classification", "method": args.adapter,
        "model_name_or_path": args.model_name_or_path, "labels": labels, "max_length": max_length,
        "adapter_config": dataclasses.asdict(dreamlora.adapter_config(model, "default")),
        "trainable_params": what_trains["adapter_params"] + what_trains["head_params"], **what_trains, **run,
        "files_for_tools": tool_files, **outputs.method_figures(args, output_dir, {"model": model}),
        **{f"eval_{k}": v for k, v in metrics.items()},
    }
    if args.save_merged:  # last: it folds the adapter into the model's weights
        def write(folder: Path) -> None:
            model.save_pretrained(folder)
            text_models.load_tokenizer(what_trains["resolved_model_path"]).save_pretrained(folder)

        record["merged"] = str(outputs.save_merged(output_dir, {"model": model}, write))
    atomic_write_json(output_dir / "run.json", record)


def cli(argv: list[str] | None = None) -> int:
    return launch.run_cli(main, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())

