"""The native file: PEFT key names, full metadata, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.conv = nn.Conv2d(3, 5, 3)


def test_native_dora_file_uses_peft_names_and_records_its_config(tmp_path):
    config = AdapterConfig(method="dora", rank=2, alpha=3.0, target_modules=["to_q", "conv"], use_rslora=True)
    model = attach(Net(), config, name="subject")
    for layer in dreamlora.adapter_layers(model, "subject").values():
        layer.step = 12
    path = dreamlora.save(model, tmp_path / "a.safetensors", name="subject")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {
        "to_q.lora_A.weight": (2, 8), "to_q.lora_B.weight": (8, 2), "to_q.lora_magnitude_vector": (8,),
        "conv.lora_A.weight": (2, 3, 3, 3), "conv.lora_B.weight": (5, 2, 1, 1),
        "conv.lora_magnitude_vector": (1, 5, 1, 1),
    }
    assert meta["format"] == "dreamlora" and meta["method"] == "dora" and meta["name"] == "subject"
    assert meta["step"] == "12"
    assert AdapterConfig.from_json(meta["config"]) == config
    assert json.loads(meta["config"])["use_rslora"] is True
    assert not (tmp_path / "a.lora.safetensors").exists()  # DoRA's native file already is PEFT LoRA


def test_writes_are_atomic_and_overwrite_in_place(tmp_path):
    model = attach(Net(), AdapterConfig(rank=2, target_modules=["to_q"]))
    path = tmp_path / "deep" / "a.safetensors"
    dreamlora.save(model, path)
    with torch.no_grad():
        dreamlora.adapter_layers(model, "default")["to_q"].lora_B.fill_(1.0)
    dreamlora.save(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.safetensors"]  # no temp file left behind
    reloaded = dreamlora.load(Net(), path)
    assert torch.equal(dreamlora.adapter_layers(reloaded, "default")["to_q"].lora_B, torch.ones(8, 2))


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    import dreamlora.io as io

    model = attach(Net(), AdapterConfig(rank=2, target_modules=["to_q"]))
    path = dreamlora.save(model, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    try:
        dreamlora.save(model, path)
    except OSError:
        pass
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_embedding_keys_follow_peft(tmp_path):
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(30, 8)

    model = attach(WithEmbedding(), AdapterConfig(rank=2, target_modules=["tokens"]))
    with safe_open(str(dreamlora.save(model, tmp_path / "e.safetensors")), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"tokens.lora_embedding_A": (2, 30), "tokens.lora_embedding_B": (8, 2)}
    tensors, _ = dreamlora.peft_lora_state_dict(model)
    assert set(tensors) == {"tokens.lora_embedding_A", "tokens.lora_embedding_B"}


class LongNames(nn.Module):
    """Module names on which `(a+)+b` backtracks exponentially (2^22 paths: seconds; each extra `a` doubles it)."""

    def __init__(self):
        super().__init__()
        self.add_module("a" * 22, nn.Linear(6, 6))
        self.to_q = nn.Linear(6, 6)


def _rewrite_config(path, out, **changes) -> None:
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps({**json.loads(meta["config"]), **changes})
    save_file(tensors, out, metadata=meta)


def test_a_file_saved_from_a_regex_config_loads_where_it_was_saved(tmp_path):
    torch.manual_seed(0)
    config = AdapterConfig(rank=2, target_modules=r"(to_q|conv)", exclude_modules=r"nothing")
    model = attach(Net(), config)
    with torch.no_grad():
        for layer in dreamlora.adapter_layers(model, "default").values():
            layer.lora_B.normal_()
    path = dreamlora.save(model, tmp_path / "a.safetensors")
    fresh = Net()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                           if "adapters" not in k})
    dreamlora.load(fresh, path)
    assert dreamlora.adapter_config(fresh, "default") == config  # the regex is kept, for the next save
    assert sorted(dreamlora.adapter_layers(fresh, "default")) == ["conv", "to_q"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(fresh.to_q(x), model.to_q(x), rtol=0, atol=0)


def test_a_regex_read_from_a_file_is_never_run(tmp_path, monkeypatch):
    """A file is untrusted input: its `target_modules` / `exclude_modules` regex could backtrack for hours on a
    model's module names. The file's own keys name the layers it adapts, so `load` attaches there and runs no
    pattern from the file."""
    import dreamlora.inject

    model = attach(LongNames(), AdapterConfig(rank=2, target_modules=["to_q"]))
    path = dreamlora.save(model, tmp_path / "a.safetensors")
    hostile = tmp_path / "hostile.safetensors"
    _rewrite_config(path, hostile, target_modules="(a+)+b", exclude_modules="(a|a)*c")
    ran = []
    original = dreamlora.inject._matches

    def spy(name, patterns):
        if isinstance(patterns, str):
            ran.append(patterns)
        return original(name, patterns)

    monkeypatch.setattr(dreamlora.inject, "_matches", spy)
    loaded = dreamlora.load(LongNames(), hostile)
    assert ran == []
    assert list(dreamlora.adapter_layers(loaded, "default")) == ["to_q"]
    assert dreamlora.adapter_config(loaded, "default").target_modules == "(a+)+b"  # kept as text, never run


def test_a_file_naming_a_module_the_model_lacks_is_refused_by_name(tmp_path):
    model = attach(LongNames(), AdapterConfig(rank=2, target_modules=".*to_q"))
    path = dreamlora.save(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"cannot load '.*a.safetensors' into Sequential: .*module 'to_q'"):
        dreamlora.load(nn.Sequential(nn.Linear(6, 6)), path)
    not_adaptable = nn.Module()
    not_adaptable.to_q = nn.LayerNorm(6)
    with pytest.raises(ValueError, match=r"cannot load '.*a.safetensors' into Module: .*'to_q' \(LayerNorm\)"):
        dreamlora.load(not_adaptable, path)
