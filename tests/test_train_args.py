"""Both trainers' flags come from typed dataclass groups: the flag set and the parsed defaults are those of the
hand-written parsers they replaced, every help text is its field's docstring, and `--config` files are checked
and typed as the command line. Parsing only: no model loads."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dreamlora import train_args, train_text_args
from dreamlora.errors import ArgError
from dreamlora.methods import METHODS
from dreamlora.options import field_docs, unique_specs

TRAINERS = {"train": train_args, "train_text": train_text_args}
REQUIRED = {
    "train": ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p",
              "--output_dir", "o"],
    "train_text": ["--model_name_or_path", "m", "--train_file", "f", "--output_dir", "o"],
}
# The flags of the hand-written parsers before they became dataclasses (sorted(option strings)), less the
# methods' option flags, which the registry adds (checked separately below).
FLAGS_BEFORE = {
    "train": [
        "--adam_beta1", "--adam_beta2", "--adam_epsilon", "--adam_weight_decay", "--adapter", "--alpha",
        "--cache_latents", "--center_crop", "--checkpointing_steps", "--checkpoints_total_limit", "--class_data_dir",
        "--class_prompt", "--config", "--gradient_accumulation_steps", "--gradient_checkpointing", "--help",
        "--init_lora_weights", "--instance_data_dir", "--instance_prompt", "--learning_rate", "--logging_dir",
        "--lora_dropout", "--lr_num_cycles", "--lr_power", "--lr_scheduler", "--lr_warmup_steps", "--max_grad_norm",
        "--max_train_steps", "--mixed_precision", "--no_kohya_format", "--noise_offset", "--num_class_images",
        "--num_train_epochs", "--num_validation_images", "--output_dir", "--output_kohya_format",
        "--export_rank", "--save_merged",
        "--use_ema", "--ema_decay",
        "--pretrained_model_name_or_path", "--pretrained_vae_model_name_or_path",
        "--prior_loss_weight", "--progress_file", "--random_flip", "--rank",
        "--report_to", "--resolution", "--resume_from_checkpoint", "--revision", "--sample_batch_size", "--seed",
        "--snr_gamma", "--target_modules", "--text_encoder_lr", "--text_encoder_target_modules",
        "--train_batch_size", "--train_text_encoder", "--use_8bit_adam", "--use_rslora",
        "--validation_inference_steps", "--validation_prompt", "--validation_steps", "--variant",
        "--with_prior_preservation", "-h",
        # issue #14: caption augmentation and the optimizer choice
        "--caption_dropout_rate", "--shuffle_caption", "--keep_tokens", "--keep_tokens_separator", "--optimizer",
        "--prodigy_beta3", "--prodigy_decouple", "--no-prodigy_decouple", "--prodigy_use_bias_correction",
        "--no-prodigy_use_bias_correction", "--prodigy_safeguard_warmup", "--no-prodigy_safeguard_warmup",
        "--masked_loss", "--alpha_mask",  # issue #14
        "--validation_split", "--validate_every_n_steps", "--max_validation_steps", "--validation_seed",
        "--train_text_encoder_ti", "--train_text_encoder_ti_frac", "--token_abstraction",  # issue #14: pivotal
        "--num_new_tokens_per_abstraction", "--initializer_concept",
        "--enable_bucket", "--min_bucket_reso", "--max_bucket_reso", "--bucket_reso_steps", "--bucket_no_upscale",
        "--use_aspect_ratio_buckets", "--aspect_ratio_buckets",  # issue #14
    ],
    "train_text": [
        "--adapter", "--alpha", "--checkpointing_steps", "--checkpoints_total_limit", "--config", "--data_format",
        "--eval_steps", "--gradient_accumulation_steps", "--help", "--ignore_mismatched_sizes", "--init_lora_weights",
        "--label_column", "--learning_rate", "--logging_dir", "--lora_dropout", "--lr_scheduler_type",
        "--max_eval_samples", "--max_grad_norm", "--max_length", "--max_train_samples", "--max_train_steps",
        "--mixed_precision", "--model_name_or_path", "--num_train_epochs", "--num_warmup_steps", "--output_dir",
        "--export_rank", "--save_merged",
        "--per_device_eval_batch_size", "--per_device_train_batch_size", "--progress_file", "--rank", "--report_to",
        "--resume_from_checkpoint", "--seed", "--target_modules", "--text_column", "--text_pair_column",
        "--train_file", "--use_rslora", "--validation_file", "--weight_decay", "-h",
    ],
}
# `vars(parse_args(REQUIRED))` of the hand-written parsers, less the methods' option flags (all None).
DEFAULTS_BEFORE = {
    "train": {
        "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08, "adam_weight_decay": 0.01, "adapter": "lora",
        "alpha": None, "cache_latents": False, "center_crop": False, "checkpointing_steps": 500,
        "checkpoints_total_limit": None, "class_data_dir": None, "class_prompt": None, "config": None,
        "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "init_lora_weights": None,
        "instance_data_dir": "d", "instance_prompt": "p", "learning_rate": 0.0001, "logging_dir": "logs",
        "lora_dropout": 0.0, "lr_num_cycles": 1, "lr_power": 1.0, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "max_grad_norm": 1.0, "max_train_steps": None, "mixed_precision": None, "no_kohya_format": False,
        "noise_offset": 0.0, "num_class_images": 100, "num_train_epochs": 1, "num_validation_images": 2,
        "output_dir": "o",
        "export_rank": None, "save_merged": False, "output_kohya_format": False, "pretrained_model_name_or_path": "m",
        "pretrained_vae_model_name_or_path": None,
        "use_ema": False, "ema_decay": 0.999,
        "prior_loss_weight": 1.0, "progress_file": "progress.jsonl", "random_flip": False, "rank": 4,
        "report_to": "tensorboard", "resolution": 512, "resume_from_checkpoint": None, "revision": None,
        "sample_batch_size": 4, "seed": 0, "snr_gamma": None, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        "text_encoder_lr": 5e-06, "text_encoder_target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "train_batch_size": 1, "train_text_encoder": False, "use_8bit_adam": False, "use_rslora": False,
        "validation_inference_steps": 25, "validation_prompt": None, "validation_steps": 100, "variant": None,
        "with_prior_preservation": False,
        "caption_dropout_rate": 0.0, "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "",
        "optimizer": "AdamW", "prodigy_beta3": None, "prodigy_decouple": True, "prodigy_use_bias_correction": True,
        "prodigy_safeguard_warmup": True,
        "masked_loss": False, "alpha_mask": False,  # issue #14
        "validation_split": 0.0, "validate_every_n_steps": None, "max_validation_steps": None, "validation_seed": None,
        "train_text_encoder_ti": False, "train_text_encoder_ti_frac": 0.5, "token_abstraction": "TOK",
        "num_new_tokens_per_abstraction": None, "initializer_concept": None,
        "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
        "bucket_no_upscale": False, "use_aspect_ratio_buckets": False, "aspect_ratio_buckets": None,  # issue #14
    },
    "train_text": {
        "adapter": "lora", "alpha": None, "checkpointing_steps": None, "checkpoints_total_limit": None,
        "config": None, "data_format": None, "eval_steps": None, "gradient_accumulation_steps": 1,
        "ignore_mismatched_sizes": False, "init_lora_weights": None, "label_column": "label", "learning_rate": 0.0005,
        "logging_dir": "logs", "lora_dropout": 0.0, "lr_scheduler_type": "linear", "max_eval_samples": None,
        "max_grad_norm": 1.0, "max_length": 128, "max_train_samples": None, "max_train_steps": None,
        "mixed_precision": None, "model_name_or_path": "m", "num_train_epochs": 3, "num_warmup_steps": 0,
        "output_dir": "o",
        "export_rank": None, "save_merged": False, "per_device_eval_batch_size": 128, "per_device_train_batch_size": 32,
        "progress_file": "progress.jsonl", "rank": 8, "report_to": "tensorboard", "resume_from_checkpoint": None,
        "seed": 0, "target_modules": None, "text_column": None, "text_pair_column": None, "train_file": "f",
        "use_rslora": False, "validation_file": None, "weight_decay": 0.0,
    },
}


def method_flags() -> set[str]:
    return {f"--{spec.flag}" for spec in unique_specs(METHODS.values())}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_the_flag_set_is_the_hand_written_one_plus_the_methods_options(trainer):
    parser = TRAINERS[trainer].build_parser()
    flags = sorted(s for action in parser._actions for s in action.option_strings)
    assert len(flags) == len(set(flags))
    assert sorted(set(flags) - method_flags()) == sorted(FLAGS_BEFORE[trainer])
    assert method_flags() <= set(flags) and "--loraplus_ratio" in flags and "--singlora_ramp_steps" in flags


@pytest.mark.parametrize("trainer", TRAINERS)
def test_parsed_defaults_are_the_hand_written_ones(trainer):
    args = vars(TRAINERS[trainer].parse_args(REQUIRED[trainer]))
    own = {flag[2:] for flag in method_flags()}
    assert {k: v for k, v in args.items() if k not in own} == DEFAULTS_BEFORE[trainer]
    assert all(args[k] is None for k in own)  # None: not given, so the method's (or the run's) default applies


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_flag_is_a_documented_field_whose_docstring_is_its_help(trainer):
    module = TRAINERS[trainer]
    actions = {a.dest: a for a in module.build_parser()._actions}
    fields = set()
    for group in module.GROUPS:
        docs = field_docs(group)
        for f in dataclasses.fields(group):
            fields.add(f.name)
            assert docs.get(f.name), f"{group.__name__}.{f.name} has no docstring"
            # a bool that defaults to True is switched off by its `--no-` twin (argparse's BooleanOptionalAction)
            assert actions[f.name].option_strings in ([f"--{f.name}"], [f"--{f.name}", f"--no-{f.name}"])
            if f.name == "adapter":  # the methods' descriptions follow the field's own text
                assert actions[f.name].help.startswith(docs[f.name] + ": ")
            else:
                assert actions[f.name].help == docs[f.name].replace("%", "%%")
    by_hand = set(actions) - fields - {flag[2:] for flag in method_flags()} - {"help", "config"}
    assert not by_hand, f"flags declared outside the dataclasses: {sorted(by_hand)}"


def test_a_subclass_field_docstring_overrides_the_shared_one():
    """The text trainer shares the adapter group; its rank default and its init help are its own."""
    text = {a.dest: a for a in train_text_args.build_parser()._actions}
    unet = {a.dest: a for a in train_args.build_parser()._actions}
    assert (text["rank"].default, unet["rank"].default) == (8, 4)
    assert "kaiming as PEFT" in text["init_lora_weights"].help and "gaussian" in unet["init_lora_weights"].help
    assert text["lora_dropout"].help == unet["lora_dropout"].help  # declared once


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_key_that_is_no_flag_fails_naming_it(trainer, suffix, tmp_path):
    config = tmp_path / f"run{suffix}"
    config.write_text(json.dumps({"rank": 16, "learning_rat": 0.1}))  # JSON is YAML too
    with pytest.raises(ArgError, match=r"unknown keys \['learning_rat'\]"):
        TRAINERS[trainer].parse_args([*REQUIRED[trainer], "--config", str(config)])


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_config_value_outside_a_flags_choices_fails_naming_it(trainer, tmp_path):
    """argparse checks choices on the command line only; a config file's values are defaults to it."""
    config = tmp_path / "run.yaml"
    config.write_text("mixed_precision: fp8\n")
    with pytest.raises(ArgError, match=r"mixed_precision must be one of \['no', 'fp16', 'bf16'\], got 'fp8'"):
        TRAINERS[trainer].parse_args([*REQUIRED[trainer], "--config", str(config)])
    config.write_text("adapter: nope\n")
    with pytest.raises(ArgError, match="adapter must be one of"):
        TRAINERS[trainer].parse_args([*REQUIRED[trainer], "--config", str(config)])


def test_config_values_are_typed_and_checked_as_flags_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("target_modules: query, value\nmax_length: '64'\nadapter: dora\nrank: 2\nreport_to: none\n")
    args = train_text_args.parse_args([*REQUIRED["train_text"], "--config", str(config), "--rank", "3"])
    assert (args.target_modules, args.max_length, args.adapter, args.rank, args.report_to) == (
        ["query", "value"], 64, "dora", 3, None)
    config.write_text("target_modules: [to_q, ' to_v ']\nresolution: 60\n")
    with pytest.raises(ArgError, match="--resolution must be a multiple of 8"):
        train_args.parse_args([*REQUIRED["train"], "--config", str(config)])
    args = train_args.parse_args([*REQUIRED["train"], "--config", str(config), "--resolution", "64"])
    assert args.target_modules == ["to_q", "to_v"]


def test_a_group_checks_itself_when_built_in_python():
    """The checks live on the dataclasses, so a group built in code is checked as the flags are."""
    with pytest.raises(ArgError, match="--rank must be > 0, got 0"):
        train_args.UNetAdapterArgs(rank=0)
    with pytest.raises(ArgError, match="--eval_steps must be > 0"):
        train_text_args.EvaluationArgs(eval_steps=-2)
    assert train_args.UNetAdapterArgs(target_modules="to_q,,to_k ").target_modules == ["to_q", "to_k"]
