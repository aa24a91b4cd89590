"""Each bad input gets one clear error naming the offending value or module, and changes nothing."""

import copy

import pytest
import torch
from conftest import OneLayer
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.to_v = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(8)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)


def fresh():
    return Block()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "lorra"}, "unknown method 'lorra'"),
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": -2}, "got -2"),
    ({"rank": 2.5}, "got 2.5"),
    ({"alpha": 0}, "alpha must be a positive number, got 0"),
    ({"alpha": -1.0}, "got -1.0"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"method": "singlora", "options": {"ramp_steps": -1}}, "singlora_ramp_steps must be an integer >= 0, got -1"),
    ({"method": "loraplus", "options": {"ratio": 0}}, "loraplus_ratio must be > 0"),
    ({"method": "singlora", "options": {"ratio": 2}}, "singlora has no options ['ratio']"),
    ({"method": "lora", "options": {"ramp_steps": 2}}, "lora has no options ['ramp_steps']; its options are none"),
    ({"init": "zeros"}, "'zeros' is not an init of lora"),
    ({"target_modules": []}, "target_modules is empty"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as e:
        AdapterConfig(**kwargs)
    assert message in str(e.value)


def assert_untouched(model, before):
    assert [n for n, _ in model.named_modules()] == [n for n, _ in before.named_modules()]
    assert all(p.requires_grad for p in model.parameters())


def test_rank_larger_than_layer_allows_names_the_layer():
    model, before = fresh(), fresh()
    with pytest.raises(ValueError, match=r"rank=5 exceeds what 'to_v' allows: min\(d_in=8, d_out=4\) = 4"):
        attach(model, AdapterConfig(rank=5, target_modules=["to_q", "to_v"]))
    assert_untouched(model, before)  # to_q was fine, but nothing was attached


def test_patterns_matching_nothing_list_real_names():
    with pytest.raises(ValueError, match=r"matched no module of Block; some module names: to_q, to_v"):
        attach(fresh(), AdapterConfig(target_modules=["to_k"]))


def test_unsupported_layer_type_is_named():
    with pytest.raises(TypeError, match=r"pattern 'norm' matched 'norm' \(LayerNorm\)"):
        attach(fresh(), AdapterConfig(target_modules=["to_q", "norm"]))
    with pytest.raises(TypeError, match=r"'grouped' \(Conv2d\): grouped Conv2d \(groups=2\)"):
        attach(fresh(), AdapterConfig(target_modules=["grouped"], rank=1))


def test_second_adapter_under_existing_name():
    model = attach(fresh(), AdapterConfig(target_modules=["to_q"]))
    with pytest.raises(ValueError, match="adapter named 'default' is already attached"):
        attach(model, AdapterConfig(method="dora", target_modules=["to_v"]))
    with pytest.raises(ValueError, match="must be an identifier"):
        attach(model, AdapterConfig(target_modules=["to_v"]), name="../evil")


def test_loading_into_the_wrong_base(tmp_path):
    model = attach(fresh(), AdapterConfig(rank=2, target_modules=["to_q", "to_v"]))
    path = dreamlora.save(model, tmp_path / "a.safetensors")

    class Wider(Block):
        def __init__(self):
            super().__init__()
            self.to_v = nn.Linear(8, 6)

    wrong = Wider()
    before = copy.deepcopy(wrong)
    with pytest.raises(ValueError, match=r"to_v.lora_B.weight has shape \(4, 2\) but this model's layer needs "
                                         r"\(6, 2\)"):
        dreamlora.load(wrong, path)
    assert_untouched(wrong, before)  # the half-done attach was rolled back

    unrelated = OneLayer(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"cannot load .* into OneLayer: target_modules .* matched no module"):
        dreamlora.load(unrelated, path)


def test_loading_refuses_pickles_and_names_the_file(tmp_path):
    pickled = tmp_path / "adapter.bin"
    torch.save({"x.lora_A.weight": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match=r"adapter.bin' is a pickle/torch.save file"):
        dreamlora.load(fresh(), pickled)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk.safetensors' is not a safetensors file"):
        dreamlora.load(fresh(), junk)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        dreamlora.load(fresh(), tmp_path / "missing.safetensors")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = attach(fresh(), AdapterConfig(rank=2, target_modules=["to_q", "to_v"]))
    path = dreamlora.save(model, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["to_k.lora_A.weight"] = tensors.pop("to_q.lora_A.weight")
    save_file(tensors, tmp_path / "b.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"1 missing keys \[to_q.lora_A.weight\], 1 unexpected keys "
                                         r"\[to_k.lora_A.weight\]"):
        dreamlora.load(fresh(), tmp_path / "b.safetensors")


def test_save_refuses_other_suffixes_and_unknown_adapters(tmp_path):
    model = attach(fresh(), AdapterConfig(target_modules=["to_q"]))
    with pytest.raises(ValueError, match=r"adapter files are .safetensors; got '.*a.pt'"):
        dreamlora.save(model, tmp_path / "a.pt")
    with pytest.raises(KeyError, match=r"no adapter named 'style' on this model \(attached: default\)"):
        dreamlora.save(model, tmp_path / "a.safetensors", name="style")


def test_safetensors_whose_header_length_looks_like_a_pickle_still_loads(tmp_path):
    """A header of 128 + 256k bytes starts the file with 0x80, pickle's magic byte; it must still load."""
    model = attach(fresh(), AdapterConfig(rank=2, target_modules=["to_q"]))
    for pad in range(256):  # vary the metadata length until the header length ≡ 128 (mod 256)
        path = tmp_path / f"a{pad}.safetensors"
        dreamlora.io.atomic_save_file(dreamlora.io.adapter_state_dict(model), path,
                                      {**dreamlora.io._metadata(AdapterConfig(rank=2, target_modules=["to_q"]),
                                                                "default", 0), "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert dreamlora.load(fresh(), path) is not None
