"""The text classifier's output folder is also a PEFT adapter folder (`pipelines/text/peft_folder.py`): PEFT's
`PeftModel.from_pretrained` and transformers' `load_adapter` read it and predict as `load_trained` does, for
every registered method; a method without an exact plain-LoRA form gets no PEFT files and run.json says why."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import METHOD_NAMES, options_for, randomize_adapters
from peft import PeftModel
from text_helpers import SST2_TRAIN, build_tiny_text_model
from transformers import AutoModelForSequenceClassification

import dreamlora
from dreamlora import AdapterConfig
from dreamlora.methods import METHODS
from dreamlora.methods.lora import LoRA
from dreamlora.train_text import cli, write_outputs
from pipelines.text import models as text_models
from pipelines.text import peft_folder as text_peft

KINDS = ("bert", "roberta", "gpt2")
LABELS = ["negative", "neutral", "positive"]
SENTENCES = ["a gorgeous , witty , seductive movie .", "it 's a bad sign .", "the film is strictly routine ."]


@pytest.fixture(scope="module")
def tiny_text_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_text_peft")
    return {kind: build_tiny_text_model(kind, root / kind) for kind in KINDS}


def trained_run(model_dir, out, method: str, fresh_extra: tuple[str, ...] = (), targets=None) -> torch.nn.Module:
    """A classifier as the trainer leaves it, written by `write_outputs`: adapters attached as `build_model`
    attaches them, then adapter, head (and `fresh_extra`) weights moved off their init, as training would."""
    model, fresh = text_models.load_classifier(str(model_dir), LABELS)
    fresh = sorted({*fresh, *fresh_extra})
    config = AdapterConfig(method=method, rank=4, target_modules=targets or text_models.default_targets(model),
                           exclude_modules=text_models.head_exclusions(model),
                           options=options_for(method, singlora_ramp_steps=4))
    dreamlora.attach(model, config)
    randomize_adapters(model, std=0.3)
    for layer in dreamlora.adapter_layers(model, "default").values():
        layer.step = 3  # SingLoRA's ramp at u = 3/4: its factor must reach the file too
    head = text_models.head_parameter_names(model, fresh)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in head:
            params[name].add_(torch.randn_like(params[name]) * 0.5)
    what_trains = {"head_parameters": head, "resolved_model_path": str(model_dir), "adapter_params": 1,
                   "head_params": 1}
    args = SimpleNamespace(adapter=method, model_name_or_path=str(model_dir), export_rank=None, save_merged=False,
                           rank=config.rank)
    write_outputs(args, out, model, what_trains, LABELS, 32, {}, {})
    return model.eval()


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def bare_classifier(model_dir, tokenizer, labels=LABELS):
    """What a user builds before loading the PEFT folder (GPT-2 needs its pad id to find the last token)."""
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels),
                                                              pad_token_id=tokenizer.pad_token_id)


def peft_logits(model_dir, out, tokenizer) -> dict[str, torch.Tensor]:
    through_peft = PeftModel.from_pretrained(bare_classifier(model_dir, tokenizer), out).eval()
    through_transformers = bare_classifier(model_dir, tokenizer)
    through_transformers.load_adapter(str(out))
    return {"peft": logits(through_peft, tokenizer), "transformers": logits(through_transformers.eval(), tokenizer)}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_and_transformers_load_the_folder_with_load_trained_predictions(tiny_text_models, tmp_path, kind,
                                                                              method):
    out = tmp_path / "run"
    trained_run(tiny_text_models[kind], out, method)
    summary = json.loads((out / "run.json").read_text())
    reason = METHODS[method].unsupported_reason("lora")
    if reason is not None:  # no exact plain-LoRA form: no PEFT files, and the reason in run.json
        assert summary["files_for_tools"]["not_written"]["peft"].endswith(reason)
        assert not (out / text_peft.CONFIG_FILE).exists() and not (out / text_peft.WEIGHTS_FILE).exists()
        return
    assert summary["files_for_tools"] == dict.fromkeys(text_peft.TOOLS, text_peft.WEIGHTS_FILE)
    model, tokenizer, _ = text_models.load_trained(out)
    expected = logits(model, tokenizer)
    dreamlora.disable(model, "default")
    assert (logits(model, tokenizer) - expected).abs().max() > 1e-3  # the adapter matters to these logits
    for route, got in peft_logits(tiny_text_models[kind], out, tokenizer).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"{route}: {method} on {kind}")


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_layers_of_other_shapes_keep_their_own_rank(tiny_text_models, tmp_path, method):
    """GPT-2's square (32×32) and rectangular (32→96, 32→128, 128→32) Conv1D layers: a method whose exact LoRA
    form has a rank that depends on the layer's shape gets it per layer through `rank_pattern`/`alpha_pattern`,
    and both loaders read it."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    trained_run(tiny_text_models["gpt2"], out, method, targets=["c_attn", "c_proj", "c_fc"])
    if METHODS[method].unsupported_reason("lora") is not None:
        return  # its reason is checked above
    config = json.loads((out / text_peft.CONFIG_FILE).read_text())
    ranks = {k.removeprefix(text_peft.KEY_PREFIX).removesuffix(".lora_A.weight"): v.shape[0]
             for k, v in load_file(str(out / text_peft.WEIGHTS_FILE)).items() if k.endswith(".lora_A.weight")}
    assert len(ranks) == 2 * 4  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert {p: config["rank_pattern"].get(p, config["r"]) for p in ranks} == ranks
    assert config["alpha_pattern"] == config["rank_pattern"] and config["lora_alpha"] == config["r"]
    if method == "lokr":  # rank 16 on the rectangular layers, 32 on the square one: the case this test is for
        assert config["rank_pattern"]
    model, tokenizer, _ = text_models.load_trained(out)
    expected = logits(model, tokenizer)
    for route, got in peft_logits(tiny_text_models["gpt2"], out, tokenizer).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"{route}: {method}")


class NoPlainLoRA(LoRA):
    """A method that says it cannot be written as plain LoRA, as a future one without an exact LoRA form would."""

    method = "no_plain_lora"
    unsupported_formats = {"lora": "its update has no exact low-rank form (test method)"}


def test_a_method_without_a_lora_form_gets_no_peft_files_and_run_json_says_why(tiny_text_models, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setitem(METHODS, NoPlainLoRA.method, NoPlainLoRA)
    out = tmp_path / "run"
    out.mkdir()
    for stale in (text_peft.CONFIG_FILE, text_peft.WEIGHTS_FILE):  # an earlier run's PEFT files in the folder
        (out / stale).write_text("from an earlier run")
    trained = trained_run(tiny_text_models["bert"], out, NoPlainLoRA.method)
    files = json.loads((out / "run.json").read_text())["files_for_tools"]
    assert files["peft"] is None and files["transformers"] is None
    assert "format 'lora'" in files["not_written"]["peft"]
    assert files["not_written"]["peft"].endswith(NoPlainLoRA.unsupported_formats["lora"])
    assert not (out / text_peft.CONFIG_FILE).exists() and not (out / text_peft.WEIGHTS_FILE).exists()
    model, tokenizer, _ = text_models.load_trained(out)  # dreamlora's own files are still there
    torch.testing.assert_close(logits(model, tokenizer), logits(trained, tokenizer), rtol=0, atol=0)


def test_a_fresh_weight_inside_the_backbone_is_saved_by_its_full_path(tiny_text_models, tmp_path):
    """A weight the checkpoint lacked trains in full wherever it sits; PEFT matches `modules_to_save` as plain
    suffixes, so only the full path (`bert.pooler.dense`, not `dense`) names that one module."""
    out = tmp_path / "run"
    pooler = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")
    trained_run(tiny_text_models["bert"], out, "lora", fresh_extra=pooler)
    config = json.loads((out / text_peft.CONFIG_FILE).read_text())
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    assert config["task_type"] == "SEQ_CLS" and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(tiny_text_models["bert"])
    model, tokenizer, _ = text_models.load_trained(out)
    expected = logits(model, tokenizer)
    for route, got in peft_logits(tiny_text_models["bert"], out, tokenizer).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=route)


def test_the_trainer_writes_the_peft_folder(tiny_text_models, tmp_path):
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(tiny_text_models["gpt2"]), "--train_file", str(SST2_TRAIN),
            "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "5e-3",
            "--report_to", "none", "--max_length", "32", "--output_dir", str(out), "--adapter", "dora"]
    assert cli(argv) == 0
    assert json.loads((out / "run.json").read_text())["files_for_tools"]["peft"] == text_peft.WEIGHTS_FILE
    assert json.loads((out / text_peft.CONFIG_FILE).read_text())["fan_in_fan_out"] is True  # GPT-2's Conv1D
    model, tokenizer, summary = text_models.load_trained(out)
    expected = logits(model, tokenizer)
    from_peft = PeftModel.from_pretrained(bare_classifier(tiny_text_models["gpt2"], tokenizer, summary["labels"]),
                                          out).eval()
    torch.testing.assert_close(logits(from_peft, tokenizer), expected, rtol=0, atol=1e-5)
