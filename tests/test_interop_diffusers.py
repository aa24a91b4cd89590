"""What dreamlora writes as LoRA loads in unmodified diffusers/PEFT and gives the same output."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import METHOD_NAMES, options_for, randomize_adapters, tiny_unet, unet_inputs
from safetensors.torch import load_file

import dreamlora
from dreamlora import AdapterConfig, attach

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]  # attention Linear and ResNet Conv2d together


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_exported_lora_loads_in_diffusers_with_the_same_output(method, tmp_path):
    base = tiny_unet().eval()
    model = attach(copy.deepcopy(base), AdapterConfig(method=method, rank=4, alpha=6.0, target_modules=TARGETS,
                                                      options=options_for(method, singlora_ramp_steps=10)))
    randomize_adapters(model)
    for layer in dreamlora.adapter_layers(model, "default").values():
        layer.step = 4  # mid-ramp for SingLoRA: the export must carry u(t) too
    path = dreamlora.export_lora(model, tmp_path / "export.safetensors")

    tensors = load_file(path)
    # one key style only (diffusers drops weights from files that mix `lora.down` and `lora_A` keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")) for k in tensors)
    assert any(k.endswith("lora_magnitude_vector") for k in tensors) == (method == "dora")

    # the file's LoraConfig (per-layer rank_pattern/alpha_pattern) goes with the tensors, as diffusers' own files
    # carry it: diffusers 0.34 infers one alpha for a bare dict, wrong for a layer of another rank (LoKr)
    peft_config = json.loads(dreamlora.io.read_metadata(path)["peft_config"])
    reference = copy.deepcopy(base)
    reference.load_lora_adapter(tensors, prefix=None, adapter_name="dreamlora", metadata=peft_config)
    from_file = copy.deepcopy(base)  # and the file alone, as a user loads it: its header carries the config
    from_file.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix=None, adapter_name="dreamlora")
    inputs = unet_inputs()
    with torch.no_grad():
        ours, theirs, plain = model(*inputs).sample, reference(*inputs).sample, base(*inputs).sample
        theirs_from_file = from_file(*inputs).sample
    assert (ours - plain).abs().max() > 1e-2  # the adapter does something visible
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs_from_file, ours, rtol=1e-5, atol=1e-5)


def test_singlora_export_is_lossless_as_a_dreamlora_lora(tmp_path):
    base = tiny_unet().eval()
    model = attach(copy.deepcopy(base), AdapterConfig(method="singlora", rank=4, target_modules=TARGETS,
                                                      options={"ramp_steps": 0}))
    randomize_adapters(model)
    native = dreamlora.save(model, tmp_path / "sing.safetensors")
    beside = tmp_path / "sing.lora.safetensors"
    assert beside.is_file()  # the LoRA export is written beside the native file
    as_lora = dreamlora.load(copy.deepcopy(base), beside)
    assert dreamlora.adapter_config(as_lora, "default").method == "lora"
    reloaded = dreamlora.load(copy.deepcopy(base), native)
    inputs = unet_inputs()
    with torch.no_grad():
        expected = model(*inputs).sample
        torch.testing.assert_close(as_lora(*inputs).sample, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(reloaded(*inputs).sample, expected)
