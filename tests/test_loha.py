"""LoHa against LyCORIS 4.1.3 (the reference), and its exact exports: plain LoRA (diffusers) and LyCORIS keys."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import OneLayer, randomize_adapters
from hand_loha import weight_matrix
from test_interop_kohya import Transformers4Layout, merged_by_lycoris, rel_err, tiny_clip
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.methods.loha import refactor
from pipelines.diffusion import export

lycoris_loha = pytest.importorskip("lycoris.modules.loha", reason="lycoris-lora is a test dependency")

RANK, ALPHA = 4, 3.0  # alpha != rank, so a scale applied twice or not at all shows
LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), lambda: torch.randn(2, 5, 24)),
    "conv": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), lambda: torch.randn(2, 6, 9, 9)),
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
PARAMS = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]


def ours_and_lycoris(kind: str, seed: int = 0):
    """The same base layer adapted by dreamlora and by LyCORIS's LohaModule, both initialised from `seed`."""
    make_layer, make_input = LAYERS[kind]
    base = make_layer()
    torch.manual_seed(seed)
    model = attach(OneLayer(copy.deepcopy(base)), AdapterConfig(method="loha", rank=RANK, alpha=ALPHA,
                                                                 target_modules=["proj"]))
    torch.manual_seed(seed)
    theirs = lycoris_loha.LohaModule("lycoris_proj", copy.deepcopy(base), lora_dim=RANK, alpha=ALPHA)
    return model, model.proj.adapters["default"], theirs, make_input()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_init_is_lycoris_own_draw(kind):
    _, ours, theirs, _ = ours_and_lycoris(kind)
    for name in PARAMS:
        torch.testing.assert_close(getattr(ours, name).detach(), getattr(theirs, name).detach(), rtol=0, atol=0)
    assert not ours.hada_w2_a.any()  # so ΔW = 0 at init


@pytest.mark.parametrize("kind", list(LAYERS))
def test_forward_and_gradients_match_lycoris(kind):
    model, ours, theirs, x = ours_and_lycoris(kind)
    with torch.no_grad():  # off the init (w2_a = 0 would make the check trivial), the same values on both sides
        for name in PARAMS:
            getattr(ours, name).normal_(0, 0.3)
            getattr(theirs, name).copy_(getattr(ours, name))
    y_ours, y_theirs = model(x), theirs(x)
    assert rel_err(y_ours - model.proj.base_layer(x), y_theirs - theirs.org_forward(x)) <= 1e-5
    assert rel_err(y_ours, y_theirs) <= 1e-5
    g = torch.randn_like(y_ours)
    (y_ours * g).sum().backward()
    (y_theirs * g).sum().backward()
    for name in PARAMS:
        err = rel_err(getattr(ours, name).grad, getattr(theirs, name).grad)
        assert err <= 1e-5, f"{kind} {name}: relative gradient error {err:.2e}"


def test_dropout_is_refused_by_name():
    with pytest.raises(ValueError, match="--lora_dropout must be 0 for loha"):
        attach(OneLayer(nn.Linear(4, 4)), AdapterConfig(method="loha", rank=2, dropout=0.1, target_modules=["proj"]))


def test_unset_alpha_is_the_rank():
    layer = attach(OneLayer(nn.Linear(4, 4)), AdapterConfig(method="loha", rank=2, target_modules=["proj"]))
    assert layer.proj.adapters["default"].scaling == 1.0


def lora_product(factors: dict) -> torch.Tensor:
    a, b = factors["lora_A.weight"], factors["lora_B.weight"]
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


@pytest.mark.parametrize(("kind", "rank", "factor_rank"), [
    ("linear", 4, 16),  # r² = 16 under the cap min(40, 24)
    ("linear", 6, 24),  # r² = 36 over the cap: re-factorised at d_in = 24
    ("conv", 2, 4),  # PEFT's conv form: A (4, 6, 3, 3), B (10, 4, 1, 1)
    ("conv", 4, 10),  # r² = 16 over the cap d_out = 10
])
def test_lora_factors_are_exact_at_the_capped_rank(kind, rank, factor_rank):
    make_layer, _ = LAYERS[kind]
    base = make_layer()
    model = attach(OneLayer(base), AdapterConfig(method="loha", rank=rank, alpha=ALPHA, target_modules=["proj"]))
    randomize_adapters(model, std=0.3)
    layer = model.proj.adapters["default"]
    factors = layer.lora_factors()
    a, b = factors["lora_A.weight"], factors["lora_B.weight"]
    assert a.shape[0] == b.shape[1] == factor_rank
    if kind == "conv":
        assert a.shape[1:] == base.weight.shape[1:] and b.shape[2:] == (1, 1)
    assert rel_err(lora_product(factors), layer.delta_weight().detach()) <= 1e-6


@pytest.mark.parametrize("shape", [(5, 9, 12), (12, 9, 5)])
def test_refactor_is_exact_above_the_cap(shape):
    d_out, big_r, d_in = shape
    up, down = torch.randn(d_out, big_r, dtype=torch.float64), torch.randn(big_r, d_in, dtype=torch.float64)
    u, d = refactor(up, down)
    assert u.shape[1] == d.shape[0] == min(d_out, d_in)
    assert rel_err(u @ d, up @ down) <= 1e-12


def loha(model: nn.Module, targets: list[str]) -> nn.Module:
    model = attach(model, AdapterConfig(method="loha", rank=2, alpha=ALPHA, target_modules=targets))
    randomize_adapters(model, std=0.2)
    return model


@pytest.mark.parametrize("weight_name", [export.DIFFUSERS_WEIGHT_NAME, export.KOHYA_WEIGHT_NAME])
def test_files_load_in_unmodified_diffusers_with_the_same_output(weight_name, tiny_model_dir, tmp_path):
    """The diffusers file holds the exact LoRA form; diffusers' kohya converter rejects `hada_*` keys."""
    from pipelines.diffusion.sample import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), "cpu", torch.float32)
    unet, te = loha(copy.deepcopy(pipe.unet), UNET_TARGETS), loha(copy.deepcopy(pipe.text_encoder), TE_TARGETS)
    ids, latents = torch.tensor([[0, 5, 17, 42, 2]]), torch.randn(1, pipe.unet.config.in_channels, 8, 8)
    with torch.no_grad():
        plain = pipe.unet(latents, 10, pipe.text_encoder(ids)[0]).sample
        context = te(ids)[0]
        ours = unet(latents, 10, context).sample
    export.write_diffusers_lora(tmp_path, unet, te)
    export.write_kohya_lora(tmp_path, unet, te)
    if weight_name == export.KOHYA_WEIGHT_NAME:
        with pytest.raises(Exception):  # noqa: B017 - the point: unmodified diffusers cannot read LyCORIS keys
            pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        return
    pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
    with torch.no_grad():
        theirs_context = pipe.text_encoder(ids)[0]
        theirs = pipe.unet(latents, 10, theirs_context).sample
    assert (ours - plain).abs().max() > 1e-2  # the adapters do something visible
    torch.testing.assert_close(theirs_context, context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_kohya_file_has_lycoris_keys_and_merges_in_lycoris_to_our_weights(monkeypatch):
    from conftest import tiny_unet

    base_unet, base_te = tiny_unet().eval(), Transformers4Layout(tiny_clip())
    unet, te = loha(copy.deepcopy(base_unet), UNET_TARGETS), loha(copy.deepcopy(base_te), TE_TARGETS)
    tensors = {**export.kohya_state_dict(unet, "unet"), **export.kohya_state_dict(te, "text_encoder")}
    suffixes = {key.rsplit(".", 1)[1] for key in tensors}
    assert suffixes == {*PARAMS, "alpha"}
    layers = {(base_unet, p): layer for p, layer in dreamlora.adapter_layers(unet, "default").items()}
    layers |= {(base_te, p): layer for p, layer in dreamlora.adapter_layers(te, "default").items()}

    assert merged_by_lycoris(base_unet, base_te, tensors, monkeypatch) == len(layers)
    worst = max(rel_err(model.get_submodule(path).weight.detach(), layer.merged_weight().detach())
                for (model, path), layer in layers.items())
    assert worst <= 1e-5, f"worst relative weight error {worst:.2e}"


def hand_delta(layer) -> torch.Tensor:
    """ΔW = s·(B1·A1) ⊙ (B2·A2), for the core method table (tests/test_method_table.py `own_hand_delta`)."""
    return weight_matrix(layer, 0.0, layer.scaling)
