"""`dreamlora.compress` and what the trainers build on it: the plain-LoRA files at `--export_rank` (a truncated
SVD computed from the factors, with its error), and `--save_merged`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from text_helpers import SST2_DEV, SST2_TRAIN, build_tiny_text_model

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.compress import parse_export_rank, spectrum
from dreamlora.train_text import cli


def test_spectrum_from_the_factors_is_the_svd_of_the_product():
    torch.manual_seed(0)
    up, down = torch.randn(40, 6), torch.randn(6, 30)
    spec = spectrum(up, down)
    full = torch.linalg.svdvals(up.double() @ down.double())
    assert torch.allclose(spec.values, full[:6], rtol=1e-10, atol=1e-10)
    rebuilt = spec.left @ torch.diag(spec.values) @ spec.right.T
    assert torch.allclose(rebuilt, up.double() @ down.double(), atol=1e-9)
    tail = (full[3:] ** 2).sum().sqrt() / full.norm()
    assert spec.relative_error(3) == pytest.approx(float(tail), rel=1e-9)


def test_energy_and_effective_rank_follow_the_definitions():
    values = torch.tensor([10.0, 3.0, 0.5, 0.05, 0.0], dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(20, 5, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64))
    spec = spectrum(u * values, v.T)
    assert spec.effective_rank() == 3  # 0.05 is not above 1 % of 10
    # 99 % of 100 + 9 + 0.25 + 0.0025 = 108.16...: 10² alone is 91 %, 10² + 3² is 99.77 %
    assert spec.energy_rank() == 2 and spec.energy_rank(0.999) == 3
    assert spectrum(torch.zeros(4, 2), torch.zeros(2, 3)).effective_rank() == 0


def lora_model(rank: int = 6):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Conv2d(4, 8, 3))
    attach(model, AdapterConfig(rank=rank, target_modules=["0", "1"]))
    with torch.no_grad():
        for layer in dreamlora.adapter_layers(model, "default").values():
            layer.lora_B.normal_()
    return model


@pytest.mark.parametrize("rank", [2, "auto"])
def test_the_exported_file_is_the_best_approximation_at_its_rank(tmp_path, rank):
    model = lora_model()
    dreamlora.set_export_rank(model, rank)
    errors = dreamlora.export_errors(model)
    tensors = load_file(dreamlora.export_lora(model, tmp_path / "a.safetensors"))
    for path, layer in dreamlora.adapter_layers(model, "default").items():
        down, up = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
        kept = down.shape[0]
        assert up.shape[1] == kept and kept == 2 if rank == 2 else kept <= 6
        exact = layer.delta_weight().detach().double()
        values = torch.linalg.svdvals(exact)
        approx = layer.kind.up_matrix(up).double() @ layer.kind.down_matrix(down).double()
        best = float((values[kept:] ** 2).sum().sqrt() / values.norm())  # Eckart–Young
        assert float((exact - approx).norm() / exact.norm()) == pytest.approx(best, rel=1e-4, abs=1e-6)
        assert errors[path] == pytest.approx(best, rel=1e-4, abs=1e-6)
        if rank == "auto":  # the smallest rank keeping 99 % of the energy
            energy = (values ** 2).cumsum(0) / (values ** 2).sum()
            assert kept == int((energy < 0.99).sum()) + 1
    dreamlora.set_export_rank(model, None)  # back to the method's default: LoRA is written exactly
    assert all(e == 0.0 for e in dreamlora.export_errors(model).values())


def test_export_rank_flag_values():
    assert parse_export_rank("auto") == "auto" and parse_export_rank("12") == 12 and parse_export_rank(3) == 3
    for bad in ("0", "-2", "big", 0):
        with pytest.raises(ValueError, match="--export_rank"):
            parse_export_rank(bad)


def test_save_merged_writes_a_classifier_that_predicts_as_the_adapter_does(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.text import models as text_models

    base = build_tiny_text_model("bert", tmp_path / "bert")
    out = tmp_path / "out"
    assert cli(["--model_name_or_path", str(base), "--train_file", str(SST2_TRAIN), "--validation_file",
                str(SST2_DEV), "--max_train_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate",
                "5e-2", "--report_to", "none", "--max_length", "32", "--output_dir", str(out), "--save_merged",
                "--export_rank", "2"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["merged"].endswith("merged") and run["export"]["rank"] == 2 and run["export"]["file_rank_max"] == 2
    assert 0 < run["export"]["relative_error_max"] < 1
    adapted, _, _ = text_models.load_trained(out)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    batch = tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted.eval()(**batch).logits, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_a_bad_export_rank_is_one_clear_error(tmp_path, capsys):
    assert cli(["--model_name_or_path", "m", "--train_file", "f", "--output_dir", str(tmp_path),
                "--export_rank", "lots"]) == 2
    assert "--export_rank" in capsys.readouterr().err
