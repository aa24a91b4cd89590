"""The native file: PEFT key names, full metadata, atomic writes."""

from __future__ import annotations

import json

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
