"""A method owns its export: the writers ask it for its factors, their rank per layer and its kohya keys, and
never assume LoRA's shape; a method that cannot be written in a format says so, and only that file is skipped.

Proved with throwaway methods registered for these tests only: `test_widelora` (LoRA at twice its `rank` option
on the layers where d_in != d_out, so its exact LoRA form has a different rank from layer to layer) and methods
declaring a format unsupported."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_adapters, tiny_unet
from safetensors import safe_open
from test_interop_kohya import Transformers4Layout, merged_by_lycoris, rel_err, tiny_clip
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.methods import METHODS, register
from dreamlora.methods.base import ExportUnsupported, kaiming_
from dreamlora.methods.lora import LoRA
from dreamlora.methods.singlora import SingLoRA
from pipelines.diffusion import export

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "conv1"]
# all four attention projections: diffusers' kohya converter misnames a text encoder's q/v without k/out
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


class WideLoRA(LoRA):
    """LoRA whose factors have rank 2r on layers with d_in != d_out (Conv2d always: d_in = C_in·kh·kw), r elsewhere;
    `self.rank` stays the option, as for a method whose exported rank is not its option (LoHa's r1·r2)."""

    method = "test_widelora"
    description = "test: LoRA at rank 2r where d_in != d_out"

    def __init__(self, kind, config):
        super().__init__(kind, config)
        if kind.d_in != kind.d_out:
            width = 2 * config.rank
            self.lora_A = nn.Parameter(kaiming_(torch.empty(kind.down_shape(width))))
            self.lora_B = nn.Parameter(torch.zeros(kind.up_shape(width)))


class NoKohyaLoRA(LoRA):
    method = "test_nokohya"
    description = "test: LoRA without a kohya form"
    unsupported_formats = {"kohya": "no kohya form for this test method"}


class NoLoRAForm(LoRA):
    method = "test_nolora"
    description = "test: LoRA without a plain-LoRA form"
    unsupported_formats = {"lora": "no exact LoRA form for this test method"}


class SingNoLoRA(SingLoRA):
    method = "test_singnolora"
    description = "test: SingLoRA without a plain-LoRA form"
    unsupported_formats = {"lora": "no exact LoRA form for this test method"}


@pytest.fixture(scope="module", autouse=True)
def throwaway_methods():
    classes = [WideLoRA, NoKohyaLoRA, NoLoRAForm, SingNoLoRA]
    for cls in classes:
        register(cls)
    yield
    for cls in classes:
        del METHODS[cls.method]


def wide(model: nn.Module, targets: list[str]) -> nn.Module:
    model = attach(model, AdapterConfig(method="test_widelora", rank=2, alpha=3.0, target_modules=targets))
    randomize_adapters(model, std=0.2)
    ranks = {layer.lora_A.shape[0] for layer in dreamlora.adapter_layers(model, "default").values()}
    assert ranks == {2, 4}  # the test means something: the factor rank differs between layers
    return model


@pytest.mark.parametrize("weight_name", [export.DIFFUSERS_WEIGHT_NAME, export.KOHYA_WEIGHT_NAME])
def test_per_layer_ranks_load_in_unmodified_diffusers_with_the_same_output(weight_name, tiny_model_dir, tmp_path):
    """The diffusers file (rank_pattern/alpha_pattern) and the kohya file (per-module alpha, through diffusers'
    kohya converter) both give dreamlora's UNet and text-encoder outputs."""
    from pipelines.diffusion.sample import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), "cpu", torch.float32)
    unet, te = wide(copy.deepcopy(pipe.unet), UNET_TARGETS), wide(copy.deepcopy(pipe.text_encoder), TE_TARGETS)
    ids, latents = torch.tensor([[0, 5, 17, 42, 2]]), torch.randn(1, pipe.unet.config.in_channels, 8, 8)
    with torch.no_grad():
        plain = pipe.unet(latents, 10, pipe.text_encoder(ids)[0]).sample
        context = te(ids)[0]
        ours = unet(latents, 10, context).sample
    export.write_diffusers_lora(tmp_path, unet, te)
    export.write_kohya_lora(tmp_path, unet, te)
    pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
    with torch.no_grad():
        theirs_context = pipe.text_encoder(ids)[0]
        theirs = pipe.unet(latents, 10, theirs_context).sample
    assert (ours - plain).abs().max() > 1e-2  # the adapters do something visible
    torch.testing.assert_close(theirs_context, context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_per_layer_ranks_in_the_kohya_file_merge_in_lycoris_to_our_weights(monkeypatch):
    pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pyproject's test extra)")
    base_unet, base_te = tiny_unet().eval(), Transformers4Layout(tiny_clip())
    unet, te = wide(copy.deepcopy(base_unet), UNET_TARGETS), wide(copy.deepcopy(base_te), TE_TARGETS)
    tensors = {**export.kohya_state_dict(unet, "unet"), **export.kohya_state_dict(te, "text_encoder")}
    alphas = {t.item() for key, t in tensors.items() if key.endswith(".alpha")}
    dims = {t.shape[0] for key, t in tensors.items() if key.endswith(".lora_down.weight")}
    assert alphas == {2.0} and dims == {2, 4}  # one alpha (the rank option), each module at its own rank
    layers = {(base_unet, p): layer for p, layer in dreamlora.adapter_layers(unet, "default").items()}
    layers |= {(base_te, p): layer for p, layer in dreamlora.adapter_layers(te, "default").items()}

    assert merged_by_lycoris(base_unet, base_te, tensors, monkeypatch) == len(layers)
    worst = max(rel_err(model.get_submodule(path).weight.detach(), layer.merged_weight().detach())
                for (model, path), layer in layers.items())
    assert worst <= 1e-5, f"worst relative weight error {worst:.2e}"


def test_the_kohya_header_says_dynamic_when_layers_differ_in_rank(tmp_path):
    path = export.write_kohya_lora(tmp_path, wide(tiny_unet(), UNET_TARGETS))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "2"
    assert meta["dreamlora_method"] == "test_widelora"


@pytest.mark.parametrize(("method", "fmt", "skipped", "kept"), [
    ("test_nokohya", "kohya", ["kohya_lora"], [export.DIFFUSERS_WEIGHT_NAME]),
    ("test_nolora", "lora", ["diffusers_lora", "kohya_lora"], []),  # the default kohya form is the LoRA factors
])
def test_a_format_the_method_cannot_be_written_in_is_skipped_with_its_reason(method, fmt, skipped, kept, tmp_path):
    unet = attach(tiny_unet(), AdapterConfig(method=method, rank=2, target_modules=["to_q", "conv1"]))
    reason = METHODS[method].unsupported_formats[fmt]
    with pytest.warns(UserWarning) as caught:
        files = export.write_tool_files(tmp_path, unet)
    messages = [str(w.message) for w in caught]  # one per skipped file, the format and the reason named
    assert len(messages) == len(skipped) and f"format '{fmt}'" in messages[0] and all(reason in m for m in messages)
    assert sorted(files["not_written"]) == skipped and all(reason in why for why in files["not_written"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == kept  # the other file is still written, no partial one
    assert files["diffusers"] == (export.DIFFUSERS_WEIGHT_NAME if kept else None) and files["kohya"] is None
    with pytest.raises(ExportUnsupported, match=f"{method} adapter cannot be written as .* '{fmt}'.*{reason}"):
        if fmt == "kohya":
            export.write_kohya_lora(tmp_path, unet)
        else:
            dreamlora.export_lora(unet, tmp_path / "x.safetensors")


@pytest.mark.parametrize(("method", "beside"), [("singlora", True), ("test_singnolora", False)])
def test_save_writes_the_lora_form_beside_only_when_the_method_has_one(method, beside, tmp_path):
    model = attach(tiny_unet(), AdapterConfig(method=method, rank=2, target_modules=["to_q"]))
    dreamlora.save(model, tmp_path / "a.safetensors")
    assert (tmp_path / "a.lora.safetensors").is_file() == beside and (tmp_path / "a.safetensors").is_file()


def test_export_formats_are_checked_by_name():
    with pytest.raises(ValueError, match="unknown export format 'peft'; known: lora, kohya"):
        LoRA.unsupported_reason("peft")
    assert LoRA.unsupported_reason("lora") is None and LoRA.unsupported_reason("kohya") is None
    assert NoLoRAForm.unsupported_formats["lora"] in NoLoRAForm.unsupported_reason("kohya")
