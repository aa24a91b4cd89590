"""LoKr against LyCORIS 4.1.3 (`lycoris-lora`, the reference): init, form, forward and gradients on the same
weights; its exact plain-LoRA form; its native LyCORIS keys read back by LyCORIS's loader."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import OneLayer, randomize_adapters, tiny_unet
from safetensors.torch import load_file
from test_interop_kohya import Transformers4Layout, merged_by_lycoris, tiny_clip
from test_method_export import TE_TARGETS, UNET_TARGETS
from test_no_full_matrix import LargestNewTensor
from torch import nn
from train_helpers import ROOT, run_train

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.methods.lokr import LoKr, factorization
from pipelines.diffusion import export

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pyproject's test extra)")
from lycoris.modules.lokr import LokrModule  # noqa: E402

PARAMS = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# (layer, rank, factor): low-rank W2 (r < max(b, d)/2) and full W2, Linear and Conv2d (stride, padding)
LAYERS = {
    "linear-lowrank": (lambda: nn.Linear(96, 160), 3, -1),  # 96 = 8·12, 160 = 10·16
    "linear-full": (lambda: nn.Linear(24, 20), 4, -1),
    "linear-factor4": (lambda: nn.Linear(64, 48), 2, 4),  # 64 = 4·16, 48 = 4·12
    "conv-lowrank": (lambda: nn.Conv2d(48, 64, 3, stride=2, padding=1), 2, -1),
    "conv-full": (lambda: nn.Conv2d(8, 12, 3, padding=1), 4, -1),
    # product rank min(a, c)·r above min(d_out, d_in): the LoRA form is re-factorised at the cap
    "linear-capped": (lambda: nn.Linear(16, 256), 7, -1),  # 4·7 = 28 > 16
    "conv-capped": (lambda: nn.Conv2d(4, 64, 1), 3, -1),  # 2·3 = 6 > 4
}


def hand_delta(layer) -> torch.Tensor:
    """ΔW = s·W1 ⊗ W2 (Yeh et al. 2024, LyCORIS): W2 = w2_a·w2_b with s = alpha/r, or a full W2 with s = 1."""
    w1 = layer.lokr_w1.float()
    if layer.lokr_w2 is not None:
        w2, s = layer.lokr_w2.reshape(layer.lokr_w2.shape[0], -1), 1.0
    else:
        w2, s = layer.lokr_w2_a @ layer.lokr_w2_b, layer.config.alpha / layer.config.rank
    d_out, d_in = w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]
    kron = torch.einsum("ik,jl->ijkl", w1, w2).reshape(d_out, d_in)  # (W1 ⊗ W2)[i·b+j, k·d+l] = W1[i,k]·W2[j,l]
    return s * layer.multiplier * kron


def ours(name: str, alpha: float = 5.0, seed: int = 0):
    make, rank, factor = LAYERS[name]
    model = OneLayer(make())
    torch.manual_seed(seed)  # after the base layer's own init: the adapter's draws start from the seed
    model = attach(model, AdapterConfig(method="lokr", rank=rank, alpha=alpha, target_modules=["proj"],
                                                   options={"factor": factor}))
    return model, model.proj.adapters["default"]


def reference(base: nn.Module, name: str, alpha: float = 5.0, seed: int = 0) -> LokrModule:
    _, rank, factor = LAYERS[name]
    torch.manual_seed(seed)
    return LokrModule("lora_unet_proj", base, multiplier=1.0, lora_dim=rank, alpha=alpha, factor=factor)


def randomize(layer) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)


def input_for(base: nn.Module) -> torch.Tensor:
    return torch.randn(2, base.in_channels, 9, 9) if isinstance(base, nn.Conv2d) else torch.randn(2, 3,
                                                                                                   base.in_features)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(LAYERS))
def test_form_and_init_are_lycoris_bit_for_bit(name):
    """Same seed, same parameters: which of W2's forms a layer takes, the shapes and every initial value."""
    model, layer = ours(name)
    ref = reference(copy.deepcopy(model.proj.base_layer), name)
    ref_params = dict(ref.named_parameters())
    assert {a for a in PARAMS if getattr(layer, a) is not None} == set(ref_params)
    for attr, p in ref_params.items():
        assert torch.equal(getattr(layer, attr), p), attr
    assert layer.scaling == ref.scale


def test_factorization_is_lycoris():
    from lycoris.functional import factorization as theirs

    assert all(factorization(d, f) == theirs(d, f) for d in range(1, 600) for f in (-1, 1, 2, 3, 4, 8, 16, 40))


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_and_gradients_match_lycoris(name, bypass):
    """Our forward (never builds ΔW) against both of LyCORIS's forwards on the same weights, α ≠ r."""
    model, layer = ours(name)
    randomize(layer)
    base = copy.deepcopy(model.proj.base_layer)
    ref = reference(base, name)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if k in PARAMS}, strict=False)
    ref.bypass_mode = bypass
    ref.apply_to()
    x = input_for(base)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    y, y_ref = model(x), base(x_ref)  # `base` now runs LyCORIS's forward
    with torch.no_grad():
        plain = model.proj.base_layer(x)
    assert rel_err(y.detach() - plain, y_ref.detach() - plain) <= 1e-5
    weight = torch.randn_like(y)
    (y * weight).sum().backward()
    (y_ref * weight).sum().backward()
    for attr, p in ref.named_parameters():
        assert rel_err(getattr(layer, attr).grad, p.grad) <= 1e-5, attr
    assert rel_err(x.grad, x_ref.grad) <= 1e-5


@pytest.mark.parametrize("name", list(LAYERS))
def test_delta_weight_is_lycoris_forward_weight(name):
    """ΔW as LyCORIS's forward applies it (kron_weight at scale s, once)."""
    model, layer = ours(name)
    randomize(layer)
    ref = reference(copy.deepcopy(model.proj.base_layer), name)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if k in PARAMS}, strict=False)
    theirs = ref.get_weight(ref.shape).reshape(layer.kind.d_out, -1)
    assert rel_err(layer.delta_weight().detach(), theirs.detach()) <= 1e-6


def test_alpha_unset_means_scale_one_and_lycoris_default_is_alpha_one():
    config = AdapterConfig(method="lokr", rank=3, target_modules=["proj"])
    layer = attach(OneLayer(nn.Linear(96, 160)), config).proj.adapters["default"]
    assert layer.low_rank and config.alpha == 3.0 and layer.scaling == 1.0
    layer = ours("linear-lowrank", alpha=1.0)[1]
    assert layer.scaling == pytest.approx(1 / 3) == reference(nn.Linear(96, 160), "linear-lowrank", 1.0).scale


def test_full_w1_and_w2_ignore_alpha_as_lycoris():
    layer = ours("linear-full", alpha=5.0)[1]
    assert layer.lokr_w2 is not None and layer.scaling == 1.0


def test_dropout_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--lora_dropout must be 0"):
        attach(OneLayer(nn.Linear(24, 20)), AdapterConfig(method="lokr", dropout=0.1, target_modules=["proj"]))


def test_a_bad_factor_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="lokr_factor"):
        AdapterConfig(method="lokr", options={"factor": 0})


@pytest.mark.parametrize("name", ["linear-lowrank", "conv-lowrank"])
def test_low_rank_train_step_builds_no_weight_sized_tensor(name):
    model, layer = ours(name)
    randomize(layer)
    base = model.proj.base_layer
    x = input_for(base)[:1]
    with LargestNewTensor() as probe:
        model(x).square().sum().backward()
    activations = max(x.numel(), base(x).numel())
    assert probe.largest <= max(activations * 4, base.weight.numel() // 8)  # ΔW would be base.weight.numel()
    assert probe.largest < base.weight.numel() // 4


def expected_rank(layer) -> int:
    w1_rank = min(layer.lokr_w1.shape)
    w2_rank = layer.rank if layer.low_rank else min(layer.b, layer.d * layer.window)
    return min(w1_rank * w2_rank, layer.kind.d_out, layer.kind.d_in)


@pytest.mark.parametrize("name", list(LAYERS))
def test_lora_factors_are_exact_at_the_product_rank_or_the_cap(name):
    model, layer = ours(name)
    randomize(layer)
    factors = layer.lora_factors()
    down, up = factors["lora_A.weight"], factors["lora_B.weight"]
    assert down.shape == layer.kind.down_shape(down.shape[0]) and up.shape == layer.kind.up_shape(down.shape[0])
    assert down.shape[0] == expected_rank(layer)
    product = layer.kind.up_matrix(up) @ layer.kind.down_matrix(down)
    assert rel_err(product, layer.delta_weight().detach()) <= 1e-6


def test_a_model_mixing_both_forms_saves_loads_and_trains_every_parameter(tmp_path):
    """Low-rank and full W2 in one adapter: files, optimizer groups and gradients see each layer's own params."""
    model = nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 96))  # full W2, then low-rank
    fresh = copy.deepcopy(model)
    model = attach(model, AdapterConfig(method="lokr", rank=4, alpha=2.0, target_modules=["0", "2"]))
    layers = dreamlora.adapter_layers(model, "default")
    assert sorted(layer.low_rank for layer in layers.values()) == [False, True]
    for layer in layers.values():
        randomize(layer)
    path = dreamlora.save(model, tmp_path / "lokr.safetensors")
    restored = dreamlora.load(fresh, path)
    x = torch.randn(3, 24)
    assert torch.equal(restored(x), model(x))
    grouped = {id(p) for g in dreamlora.param_groups(model, lr=1e-3) for p in g["params"]}
    params = {id(p) for layer in layers.values() for p in layer.parameters()}
    assert grouped == params and len(params) == 5  # w1, w2_a, w2_b on the low-rank layer; w1, w2 on the full one
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for layer in layers.values() for p in layer.parameters())


def adapted_lokr(model: nn.Module, targets: list[str]) -> nn.Module:
    """rank 2, alpha 3 on the tiny models: low-rank W2 (scale 3/2) on the 32- and 64-wide layers."""
    model = attach(model, AdapterConfig(method="lokr", rank=2, alpha=3.0, target_modules=targets))
    randomize_adapters(model, std=0.3)
    return model


def test_the_kohya_file_merges_in_lycoris_loader_to_our_weights_at_scale_not_one(monkeypatch):
    """Native keys, scale folded into lokr_w1 and alpha = r: LyCORIS 4.1.3's merge applies its scale twice, so
    only a file whose scale is 1 merges right there (and in ComfyUI, which applies it once)."""
    base_unet, base_te = tiny_unet().eval(), Transformers4Layout(tiny_clip())
    unet, te = adapted_lokr(copy.deepcopy(base_unet), UNET_TARGETS), adapted_lokr(copy.deepcopy(base_te), TE_TARGETS)
    layers = {(base_unet, p): layer for p, layer in dreamlora.adapter_layers(unet, "default").items()}
    layers |= {(base_te, p): layer for p, layer in dreamlora.adapter_layers(te, "default").items()}
    assert any(layer.low_rank and layer.scaling != 1 for layer in layers.values())
    tensors = {**export.kohya_state_dict(unet, "unet"), **export.kohya_state_dict(te, "text_encoder")}
    assert any(key.endswith(".lokr_w2_a") for key in tensors)  # full W2 files: test_interop_kohya's rank-4 case
    assert merged_by_lycoris(base_unet, base_te, tensors, monkeypatch) == len(layers)
    worst = max(rel_err(model.get_submodule(path).weight.detach(), layer.merged_weight().detach())
                for (model, path), layer in layers.items())
    assert worst <= 1e-5, f"worst relative weight error {worst:.2e}"


def test_the_diffusers_file_loads_in_unmodified_diffusers_with_the_same_output(tiny_model_dir, tmp_path):
    """The exact plain-LoRA form at each layer's own rank (capped layers re-factorised) in diffusers' loader."""
    from pipelines.diffusion.sample import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), "cpu", torch.float32)
    unet = adapted_lokr(copy.deepcopy(pipe.unet), UNET_TARGETS)
    te = adapted_lokr(copy.deepcopy(pipe.text_encoder), TE_TARGETS)
    layers = dreamlora.adapter_layers(unet, "default").values()
    ranks = {layer.lora_factors()["lora_A.weight"].shape[0] for layer in layers}
    assert len(ranks) > 1  # per-layer ranks, none of them the rank option alone
    ids, latents = torch.tensor([[0, 5, 17, 42, 2]]), torch.randn(1, pipe.unet.config.in_channels, 8, 8)
    with torch.no_grad():
        plain = pipe.unet(latents, 10, pipe.text_encoder(ids)[0]).sample
        context = te(ids)[0]
        ours_out = unet(latents, 10, context).sample
    export.write_diffusers_lora(tmp_path, unet, te)
    pipe.load_lora_weights(str(tmp_path), weight_name=export.DIFFUSERS_WEIGHT_NAME)
    with torch.no_grad():
        theirs_context = pipe.text_encoder(ids)[0]
        theirs = pipe.unet(latents, 10, theirs_context).sample
    assert (ours_out - plain).abs().max() > 1e-2  # the adapters do something visible
    torch.testing.assert_close(theirs_context, context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ours_out, rtol=1e-5, atol=1e-5)


def test_trains_in_train_py_with_its_flag_and_writes_every_file(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_train(tiny_model_dir, out, "--adapter", "lokr", "--rank", "2", "--lokr_factor", "4", "--max_train_steps", "2",
              "--checkpointing_steps", "100")
    summary = json.loads((out / "run.json").read_text())
    assert summary["method"] == "lokr" and summary["steps"] == 2 and summary["args"]["lokr_factor"] == 4
    native = load_file(out / "unet_adapter.safetensors")
    zero_init = [t for k, t in native.items() if k.endswith(("lokr_w2", "lokr_w2_b"))]
    assert zero_init and any(t.abs().max() > 0 for t in zero_init)  # it trained: W2 moved off its zero init
    kohya = load_file(out / export.KOHYA_WEIGHT_NAME)
    assert any(k.endswith(".lokr_w1") for k in kohya) and not any("lora_down" in k for k in kohya)
    assert (out / export.DIFFUSERS_WEIGHT_NAME).exists()


def test_trains_in_train_text_py(tmp_path):
    from text_helpers import SST2_TRAIN, build_tiny_text_model

    bert, out = build_tiny_text_model("bert", tmp_path / "bert"), tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "dreamlora" / "train_text.py"), "--adapter", "lokr", "--model_name_or_path",
           str(bert), "--train_file", str(SST2_TRAIN), "--max_train_steps", "2", "--per_device_train_batch_size", "4",
           "--max_length", "24", "--max_train_samples", "16", "--report_to", "none", "--output_dir", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    summary = json.loads((out / "run.json").read_text())
    assert summary["method"] == "lokr" and summary["finished"]
    assert summary["adapter_config"]["options"] == {"factor": -1}


def test_is_in_the_apps_method_list_with_its_option_field():
    probe = ("import json, app; from app_backend.settings import TrainSettings; "
             "s = TrainSettings(name='r', base_model='tiny', method='lokr', method_options={'lokr_factor': '4'})"
             ".validate(); print(json.dumps({'choices': app.method_choices(), 'fields': app.option_flags(), "
             "'argv': s.argv(__import__('pathlib').Path('r'))}))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert [LoKr.description, "lokr"] in found["choices"] and "lokr_factor" in found["fields"]
    argv = found["argv"]
    assert argv[argv.index("--adapter") + 1] == "lokr" and argv[argv.index("--lokr_factor") + 1] == "4"


def test_unbatched_conv_input_is_the_batched_result():
    model, layer = ours("conv-lowrank")
    randomize(layer)
    x = torch.randn(48, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.unsqueeze(0)).squeeze(0), rtol=1e-6, atol=1e-6)
        assert (model(x) - model.proj.base_layer(x)).abs().max() > 1e-2
