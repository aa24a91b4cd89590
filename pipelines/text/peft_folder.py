"""The text classifier's output folder as a PEFT adapter folder, so tools other than dreamlora load it:

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=N)
    model = PeftModel.from_pretrained(model, output_dir)   # or: model.load_adapter(output_dir)

`adapter_model.safetensors` holds the adapter as the method's exact plain-LoRA factors (`peft_lora_state_dict`,
the "lora" export format: LoRA and LoRA+ as they are, DoRA with its `lora_magnitude_vector`, SingLoRA, LoHa and
LoKr through their exact LoRA form, each layer at its own rank through `rank_pattern`/`alpha_pattern`, alpha =
rank with the scale folded into B) and the head trained in full as PEFT's `modules_to_save` stores it. Keys are
PEFT's saved form, checked against PEFT 0.21 and transformers 5 by loading them back (tests/test_text_peft.py):
`base_model.model.<module path>.lora_A.weight`, `….lora_magnitude_vector.weight` (see `peft_folder_state`), and
each head module's own state dict under `base_model.model.<module path>.`, as PEFT saves `modules_to_save` (it
drops the wrapper's `modules_to_save.default.` level).
A method that cannot be written as plain LoRA gets no PEFT files, and the reason is returned for run.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

import dreamlora
from dreamlora.atomic import atomic_write_text
from dreamlora.io import atomic_save_file
from dreamlora.layer_kinds import Conv1DKind
from dreamlora.methods import ExportUnsupported

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
TOOLS = ("peft", "transformers")  # PeftModel.from_pretrained, PreTrainedModel.load_adapter


def head_modules(model: nn.Module, head_parameters: list[str], name: str = "default") -> list[str]:
    """PEFT's `modules_to_save` for the head trained in full (`text_models.head_parameter_names`): each child of
    the model outside the backbone, whole (`classifier`, GPT-2's `score`; PEFT's SEQ_CLS task adds those two names
    itself, so naming a part of one, `classifier.dense`, would wrap it twice), and the module of each weight
    inside the backbone that the checkpoint lacked, by full path, since PEFT matches these names as plain
    suffixes (`dense` would catch every dense layer). A module both saved whole and adapted is refused."""
    backbone = model.base_model_prefix + "."
    top = [n for n in head_parameters if "." not in n]
    if top:
        raise ExportUnsupported(f"head parameters {top} belong to no submodule, and PEFT saves whole modules")
    paths = {n.rpartition(".")[0] if n.startswith(backbone) else n.partition(".")[0] for n in head_parameters}
    ordered = sorted(paths, key=len)
    outer = [p for i, p in enumerate(ordered) if not any(p.startswith(q + ".") for q in ordered[:i])]
    for adapted in dreamlora.adapter_layers(model, name):
        clash = [p for p in outer if adapted == p or adapted.startswith(p + ".") or p.startswith(adapted + ".")]
        if clash:
            raise ExportUnsupported(f"{adapted} is adapted and also inside the fully trained head {clash[0]}")
    return sorted(outer)


def peft_folder_state(model: nn.Module, head_parameters: list[str], base_model_name_or_path: str,
                      name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of `adapter_model.safetensors` and the dict of `adapter_config.json`. Raises
    `ExportUnsupported` (format and reason named) for a method that has no exact plain-LoRA form."""
    lora_tensors, lora_config = dreamlora.peft_lora_state_dict(model, name)
    heads = head_modules(model, head_parameters, name)
    # DoRA magnitudes as `lora_magnitude_vector.weight`: transformers 5's `load_adapter` drops the bare name
    # PEFT 0.21 itself saves (even from PEFT's own folder), while PEFT's loader reads both spellings.
    tensors = {KEY_PREFIX + (k + ".weight" if k.endswith(".lora_magnitude_vector") else k): v
               for k, v in lora_tensors.items()}
    for path in heads:
        tensors.update({f"{KEY_PREFIX}{path}.{k}": v for k, v in model.get_submodule(path).state_dict().items()})
    # PEFT moves a Conv1D's merge to fan_in_fan_out itself (with a warning); saying it keeps the config exact
    conv1d = any(isinstance(layer.kind, Conv1DKind) for layer in dreamlora.adapter_layers(model, name).values())
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base_model_name_or_path,
              **lora_config, "modules_to_save": heads, "fan_in_fan_out": conv1d, "inference_mode": True}
    return tensors, config


def write_peft_folder(output_dir: str | os.PathLike, model: nn.Module, head_parameters: list[str],
                      base_model_name_or_path: str, name: str = "default") -> dict:
    """Write `adapter_model.safetensors` then `adapter_config.json` (so a reader that finds the config finds
    its weights) into `output_dir`. Returns, for run.json's `files_for_tools`, the file each tool reads, or
    None for each with the reason under `not_written`; then stale PEFT files of an earlier run are removed, so
    the folder never pairs this run's adapter with another run's PEFT files."""
    out = Path(output_dir)
    try:
        tensors, config = peft_folder_state(model, head_parameters, base_model_name_or_path, name)
    except ExportUnsupported as e:
        for stale in (CONFIG_FILE, WEIGHTS_FILE):
            (out / stale).unlink(missing_ok=True)
        return {**dict.fromkeys(TOOLS), "not_written": {"peft": str(e)}}
    atomic_save_file(tensors, out / WEIGHTS_FILE, {"format": "pt"})
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dict.fromkeys(TOOLS, WEIGHTS_FILE)
