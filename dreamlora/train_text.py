"""Adapter fine-tuning of a transformers sequence classifier: `accelerate launch dreamlora/train_text.py --help`.

Reads top to bottom: flags → data (checked before any model loads) → classifier → adapters on the
backbone, head trained in full → optimizer from the core's groups → loop with periodic evaluation → save.
The same core, hooks, checkpoints and progress file as DreamBooth training; nothing here asks which
method it trains. Data order is a function of (seed, epoch), so a resumed run retraces an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch dreamlora/train_text.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import dreamlora
from dreamlora import AdapterConfig
from dreamlora.train_args import method_options
from dreamlora.train_text_args import parse_args
from eval.classification import classification_metrics
from pipelines import training
from pipelines.text import models as text_models
from pipelines.text.data import Columns, PadCollator, read_examples, tokenize
from pipelines.trainer.order import EpochShuffle

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
    with training.adapter_input():
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_requested = training.install_stop_signal()  # first: a Stop during loading still ends cleanly
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)

    # --- data first: bad input fails before a model loads or anything is written --------------------------
    train, validation, labels = read_data(args)
    accelerator = training.make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    resume_from = training.resolve_resume(output_dir, args.resume_from_checkpoint)
    batches_per_epoch, steps_per_epoch = training.steps_per_epoch(
        len(train), args.per_device_train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    training.resolve_method_options(args, max_steps, resume_from and training.adapter_file(resume_from, "model"))
    model, tokenizer, groups, what_trains = build_model(args, labels)
    max_length = text_models.usable_max_length(tokenizer, model.config, args.max_length)
    train_features = tokenize(tokenizer, train, max_length)
    eval_features = tokenize(tokenizer, validation, max_length) if validation is not None else None
    collator = PadCollator(tokenizer.pad_token_id, tokenizer.padding_side)
    optimizer = torch.optim.AdamW(groups)

    # --- data loader and schedule ----------------------------------------------------------------------
    sampler = EpochShuffle(len(train_features), args.seed)
    loader = torch.utils.data.DataLoader(train_features, batch_size=args.per_device_train_batch_size,
                                         sampler=sampler, collate_fn=collator)
    from transformers import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                                 num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    training.register_adapter_hooks(accelerator, {"model": unwrapped})
    progress = training.restore_progress(accelerator, resume_from)

    # --- the loop ----------------------------------------------------------------------------------------
    if accelerator.is_main_process:
        accelerator.init_trackers("dreamlora_text", config={k: v for k, v in vars(args).items()
                                                            if isinstance(v, (int, float, str, bool))})
    is_main = accelerator.is_main_process
    plog = training.ProgressLog(output_dir / args.progress_file if is_main else None, max_steps,
                                progress.global_step)
    history = training.ProgressLog(output_dir / "eval.jsonl" if is_main and eval_features else None, max_steps,
                                   progress.global_step)
    plog.write(event="started", step=progress.global_step, total=max_steps, resumed_from=str(resume_from or ""))
    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=progress.global_step, desc="training", unit="step", disable=not is_main)
    started, train_seconds, last_loss, metrics = time.time(), 0.0, float("nan"), {}
    params = [p for g in groups for p in g["params"]]
    batches = training.resumable_batches(accelerator, loader, progress, batches_per_epoch, sampler.select_epoch)
    model.train()
    step_started = time.time()
    while progress.global_step < max_steps:
        epoch, index, batch = next(batches)
        torch.manual_seed(training.batch_seed(args.seed, epoch, index, accelerator.process_index))  # dropout
        with accelerator.accumulate(model):
            loss = model(**batch).loss + dreamlora.regularization_loss(unwrapped)
            accelerator.backward(loss)
            training.optimizer_step(accelerator, optimizer, lr_scheduler, params, args.max_grad_norm, [unwrapped])
        if not accelerator.sync_gradients:
            continue
        progress.global_step += 1
        step = progress.global_step
        last_loss = accelerator.gather(loss.detach()[None]).mean().item()
        if not math.isfinite(last_loss):
            bar.close()
            raise training.TrainingDiverged(f"loss became {last_loss} at step {step}; stopped without saving")
        lr = lr_scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        accelerator.log({"train/loss": last_loss, "train/lr": lr}, step=step)
        plog.step(step, last_loss, lr)
        train_seconds += time.time() - step_started  # evaluation and checkpoints are not training time
        if eval_features and (step == max_steps or (args.eval_steps and step % args.eval_steps == 0)):
            metrics = evaluate(model, eval_features, collator, args, accelerator, len(labels))
            if is_main:
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                history.write(event="eval", step=step, train_time_s=round(train_seconds, 2), **metrics)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        stop = training.stop_everywhere(accelerator, stop_requested)  # read once per step, on all processes
        if (args.checkpointing_steps and step % args.checkpointing_steps == 0) or stop:
            checkpoint = training.save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit,
                                                  progress)
            plog.write(event="checkpoint", step=step, path=str(checkpoint))
        if stop:
            break
        step_started = time.time()
    bar.close()

    # --- save ----------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    finished = progress.global_step >= max_steps
    if is_main:
        write_outputs(args, output_dir, unwrapped, what_trains, labels, max_length, metrics, {
            "steps": progress.global_step, "finished": finished, "wall_time_s": round(time.time() - started, 2),
            "train_time_s": round(train_seconds, 2), "final_loss": last_loss,
            **training.run_environment(accelerator, resume_from),
            "train_examples": len(train_features), "eval_examples": len(eval_features or []),
        })
        plog.write(event="done" if finished else "stopped", step=progress.global_step)
    accelerator.end_training()
    return 0


def write_outputs(args, output_dir: Path, model, what_trains: dict, labels: list[str], max_length: int,
                  metrics: dict, run: dict) -> None:
    import dataclasses

    from pipelines.text import peft_folder as text_peft

    dreamlora.save(model, output_dir / text_models.ADAPTER_FILE)
    training.save_parameters(model, what_trains["head_parameters"], output_dir / text_models.HEAD_FILE)
    tool_files = text_peft.write_peft_folder(output_dir, model, what_trains["head_parameters"],
                                             what_trains["resolved_model_path"])
    training.write_json_atomic(output_dir / "run.json", {
        "args": vars(args), "task": "text-classification", "method": args.adapter,
        "model_name_or_path": args.model_name_or_path, "labels": labels, "max_length": max_length,
        "adapter_config": dataclasses.asdict(dreamlora.adapter_config(model, "default")),
        "trainable_params": what_trains["adapter_params"] + what_trains["head_params"], **what_trains, **run,
        "files_for_tools": tool_files,
        **{f"eval_{k}": v for k, v in metrics.items()},
    })


def cli(argv: list[str] | None = None) -> int:
    return training.run_cli(main, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())

