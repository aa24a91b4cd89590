"""Adapters survive what users do to models: dtype casts, device moves, accelerate's placement, pipelines.

The rule under test (see `AdapterLayer`): a whole-model cast (`.to(dtype)`, `.half()`, `.bfloat16()`) leaves
adapter tensors fp32 while the base layers take the new dtype; a device move (`.to("meta")`, `.cuda()`) moves
them. Every registered method is checked, so a new method inherits these tests.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import OneLayer, randomize_adapters
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.methods import METHODS

LAYERS = {
    "linear": (lambda: nn.Linear(16, 24), lambda: torch.randn(3, 5, 16)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 7, 7)),
}
# Relative error of the cast model against the fp32 model: the base weights and the input are rounded to
# 8 (bf16) or 11 (fp16) significant bits, so the output is off by a few units of that precision.
CAST_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
CASTS = {
    "to_bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "half": (lambda m: m.half(), torch.float16),
}


def adapted(method: str, layer: str, trained: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """A one-layer model with adapter `method` attached; `trained`: off its init, ramps (SingLoRA) complete."""
    make_layer, make_input = LAYERS[layer]
    model = attach(OneLayer(make_layer()), AdapterConfig(method=method, rank=3, target_modules=["proj"]))
    if trained:
        randomize_adapters(model)
        for adapter in dreamlora.adapter_layers(model, "default").values():
            adapter.step = 10**6
    return model, make_input()


def adapter_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    layers = dreamlora.adapter_layers(model, "default").values()
    return [(n, t) for layer in layers for n, t in itertools.chain(layer.named_parameters(), layer.named_buffers())]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_dtype_cast_keeps_adapters_fp32(method, layer, cast):
    model, x = adapted(method, layer)
    fp32_out = model(x)
    base_only = copy.deepcopy(model)  # the README's set-up: half-precision base, fp32 adapters
    apply_cast, dtype = CASTS[cast]
    base_only.proj.base_layer.to(dtype)
    apply_cast(model)
    assert model.proj.base_layer.weight.dtype == dtype
    tensors = adapter_tensors(model)
    assert tensors and all(t.dtype == torch.float32 for _, t in tensors), [(n, t.dtype) for n, t in tensors]
    with torch.no_grad():
        out = model(x.to(dtype))
        assert out.dtype == dtype
        assert torch.equal(out, base_only(x.to(dtype)))
        assert rel_err(out, fp32_out) <= CAST_TOLERANCE[dtype]


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_an_exact_identity_at_init_after_a_cast(method, layer):
    """DoRA's cached ‖W0‖² must stay fp32: rounded to bf16, m/‖W0‖ is no longer exactly 1 at init."""
    model, x = adapted(method, layer, trained=False)
    base = copy.deepcopy(model.proj.base_layer).to(torch.bfloat16)
    model.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x.to(torch.bfloat16)), base(x.to(torch.bfloat16)))


@pytest.mark.parametrize("move", ["to_meta", "to_meta_bf16"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_device_move_moves_adapters(method, layer, move):
    model, x = adapted(method, layer)
    shape = model(x).shape
    if move == "to_meta":
        model.to("meta")
    else:
        model.to("meta", torch.bfloat16)
    tensors = adapter_tensors(model)
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for _, t in tensors)
    dtype = model.proj.base_layer.weight.dtype
    out = model(x.to("meta", dtype))
    assert out.device.type == "meta" and out.shape == shape and out.dtype == dtype


def _place_like_accelerate(model: nn.Module, device: str, dtype: torch.dtype | None = None) -> None:
    """Place every tensor the way accelerate's hooks and loaders do: `set_module_tensor_to_device`, which writes
    `module._parameters` / `_buffers` directly and never calls `nn.Module._apply`. With `dtype` the current value
    is passed in and cast, as `load_checkpoint_in_model(dtype=...)` does."""
    from accelerate.utils import set_module_tensor_to_device

    for name, tensor in list(itertools.chain(model.named_parameters(), model.named_buffers())):
        value = None if dtype is None else tensor.detach().clone()
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_accelerate_placement_that_bypasses_apply(method, layer):
    model, x = adapted(method, layer)
    reference = model(x)
    # accelerate can cast adapter tensors without `_apply` (loading with a dtype): the adapter then computes in
    # the dtype it holds instead of failing on a dtype mismatch.
    cast = copy.deepcopy(model)
    _place_like_accelerate(cast, "cpu", torch.bfloat16)
    assert {t.dtype for _, t in adapter_tensors(cast)} == {torch.bfloat16}
    with torch.no_grad():
        assert rel_err(cast(x.to(torch.bfloat16)), reference) <= 2 * CAST_TOLERANCE[torch.bfloat16]
    # A device move by accelerate: cached state (DoRA's norm) must have moved with the module.
    _place_like_accelerate(model, "meta")
    out = model(x.to("meta"))
    assert out.device.type == "meta" and out.shape == reference.shape


@pytest.fixture(scope="module")
def pipeline_and_files(tiny_model_dir, tmp_path_factory):
    """The tiny SD pipeline, and one adapter file per method saved from its UNet (attention and convs)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    folder = tmp_path_factory.mktemp("adapters")
    files = {}
    for method in sorted(METHODS):
        config = AdapterConfig(method=method, rank=2, target_modules=["to_q", "to_v", "conv1"])
        attach(pipe.unet, config, name="trained")
        randomize_adapters(pipe.unet, "trained", std=0.05)
        for adapter in dreamlora.adapter_layers(pipe.unet, "trained").values():
            adapter.step = 10**6
        files[method] = dreamlora.save(pipe.unet, folder / f"{method}.safetensors", name="trained")
        dreamlora.detach(pipe.unet, "trained")
    return pipe, files


def unet_call(unet: nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    context = torch.randn(1, 4, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(latents.to(device, dtype), torch.tensor([10], device=device), context.to(device, dtype)).sample


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loaded_pipeline_survives_pipe_to(method, pipeline_and_files):
    template, files = pipeline_and_files
    pipe = copy.deepcopy(template)
    dreamlora.load(pipe.unet, files[method], name="default")
    fp32_out = unet_call(pipe.unet, "cpu", torch.float32)

    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    tensors = adapter_tensors(pipe.unet)
    assert tensors and all(t.dtype == torch.float32 for _, t in tensors)
    assert rel_err(unet_call(pipe.unet, "cpu", torch.bfloat16), fp32_out) <= 5e-2

    pipe.to("meta")
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for _, t in adapter_tensors(pipe.unet))
    out = unet_call(pipe.unet, "meta", torch.bfloat16)
    assert out.device.type == "meta" and out.shape == fp32_out.shape


@pytest.mark.parametrize("method", sorted(METHODS))
def test_accelerate_offload_hooks(method):
    """Model offload (`enable_model_cpu_offload`: the whole model is `.to(device)`-ed before its forward) works
    for every method. Sequential offload keeps each layer's weights on 'meta' outside that layer's own call:
    methods that only read the base output work; one that reads W0 itself (DoRA) says what to do instead."""
    from accelerate import cpu_offload, cpu_offload_with_hook

    model, x = adapted(method, "linear")
    reference = model(x)
    moved = copy.deepcopy(model)
    cpu_offload_with_hook(moved, execution_device=torch.device("meta"))
    out = moved(x)
    assert out.device.type == "meta" and out.shape == reference.shape

    sequential = copy.deepcopy(model)
    cpu_offload(sequential, execution_device=torch.device("cpu"))
    assert sequential.proj.base_layer.weight.is_meta  # offloaded until the base layer's own call
    if METHODS[method].reads_base_weight:
        with pytest.raises(RuntimeError, match=r"sequential CPU offload.*dreamlora.merge"):
            sequential(x)
    else:
        assert torch.equal(sequential(x), reference)
    # diffusers removes the hooks again when such a pipeline is moved or reset: the weights come back, and the
    # host must not pass for the hooked base layer (it proxies attribute reads, but not accelerate's `_hf_hook`)
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(sequential, recurse=True)
    assert not sequential.proj.base_layer.weight.is_meta
    assert torch.equal(sequential(x), reference)
