"""A method can keep state beyond its parameters (ReLoRA's merged base delta, AdaLoRA's importance averages) and
its per-step hook reaches the optimizer and the LR scheduler. Proved with a throwaway method dropped into a copy
of the package: the state is in the saved adapter file, `dreamlora.save`/`load` round-trip it exactly, it stays
fp32 and moves with the module, and a run stopped half-way and resumed ends with the same parameters and state as
an uninterrupted one."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from text_helpers import SST2_TRAIN, build_tiny_text_model
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent

# The throwaway method: LoRA plus three state buffers its step hook writes. `importance` is an AdaLoRA-style
# decayed average of |A ⊙ ∂L/∂A| (needs the gradients, still there when the hook runs), `lr_seen` sums the
# scheduler's LR weighted by step / total (needs ctx.lr_scheduler and ctx.total_steps), and every RESET_EVERY
# steps the optimizer's moments of the layer's parameters are dropped, as ReLoRA does after a merge (needs
# ctx.optimizer), and `resets` counts it. With STATELORA_STOP_AT=N the hook sends the app's Stop to its own
# process at step N: a stop at a known step, through the real signal path.
STATE_METHOD = '''
"""statelora (a test's throwaway method): LoRA with state beyond its parameters."""

import os
import signal

import torch

from dreamlora.methods.base import register
from dreamlora.methods.lora import LoRA

RESET_EVERY = 2


@register
class StateLoRA(LoRA):
    method = "statelora"
    description = "StateLoRA: LoRA that keeps state (a test)"
    state_keys = {"importance": "importance", "lr_seen": "lr_seen", "resets": "resets"}

    def __init__(self, kind, config):
        super().__init__(kind, config)
        self.register_buffer("importance", torch.zeros(self.lora_A.shape, device=self.lora_A.device))  # like A
        self.register_buffer("lr_seen", torch.zeros((), device=self.lora_A.device))
        self.register_buffer("resets", torch.zeros((), device=self.lora_A.device))

    @classmethod
    def after_optimizer_step(cls, layers, ctx):
        super().after_optimizer_step(layers, ctx)
        lr = ctx.lr_scheduler.get_last_lr()[0]
        with torch.no_grad():
            for layer in layers:
                layer.importance.mul_(0.8).add_((layer.lora_A * layer.lora_A.grad).abs(), alpha=0.2)
                layer.lr_seen.add_(lr * ctx.step / ctx.total_steps)
                if ctx.step % RESET_EVERY == 0:
                    for p in (layer.lora_A, layer.lora_B):
                        ctx.optimizer.state.pop(p, None)
                    layer.resets.add_(1)
        if ctx.step == int(os.environ.get("STATELORA_STOP_AT", "0")):
            os.kill(os.getpid(), signal.SIGUSR1)
'''
STATE_KEYS = ("importance", "lr_seen", "resets")


@pytest.fixture
def state_method(tmp_path):
    """The throwaway method registered in this process (its module imported from a file), removed after."""
    file = tmp_path / "statelora.py"
    file.write_text(STATE_METHOD.lstrip(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("statelora_test_module", file)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    yield "statelora"
    del METHODS["statelora"]


def test_save_and_load_round_trip_the_state_exactly_and_it_stays_fp32(state_method, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.Conv2d(6, 4, 3)).to(torch.bfloat16)
    model = attach(base, AdapterConfig(method=state_method, rank=2, target_modules=["0", "1"]))
    layers = dreamlora.adapter_layers(model, "default")
    with torch.no_grad():
        for layer in layers.values():
            for attr in STATE_KEYS:
                getattr(layer, attr).copy_(torch.randn(getattr(layer, attr).shape))
    model.to(torch.bfloat16)  # a dtype cast of the model leaves adapter state fp32, as its parameters
    assert all(getattr(la, a).dtype == torch.float32 for la in layers.values() for a in STATE_KEYS)
    path = dreamlora.save(model, tmp_path / "a.safetensors")
    stored = load_file(str(path))
    assert {"0.importance", "0.lr_seen", "0.resets", "1.importance"} <= set(stored)
    assert stored["1.importance"].dtype == torch.float32

    again = dreamlora.load(nn.Sequential(nn.Linear(8, 6), nn.Conv2d(6, 4, 3)).to(torch.bfloat16), path)
    for name, layer in dreamlora.adapter_layers(again, "default").items():
        for attr in (*STATE_KEYS, "lora_A", "lora_B"):
            assert torch.equal(getattr(layer, attr), getattr(layers[name], attr)), (name, attr)
    name, layer = next(iter(dreamlora.adapter_layers(again, "default").items()))
    layer.importance.zero_()
    dreamlora.load_weights(again, path)  # the checkpoint path: into the adapter already attached
    assert torch.equal(layer.importance, layers[name].importance)

    del stored["0.importance"]  # a file without the state does not fit, and says which key is missing
    dreamlora.io.atomic_save_file(stored, tmp_path / "b.safetensors", dreamlora.io.read_metadata(path))
    with pytest.raises(ValueError, match=r"missing keys \[0\.importance\]"):
        dreamlora.load(nn.Sequential(nn.Linear(8, 6), nn.Conv2d(6, 4, 3)), tmp_path / "b.safetensors")


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    """A copy of the repository with one new file, `dreamlora/methods/statelora.py`, and nothing else changed."""
    root = tmp_path_factory.mktemp("copy") / "repo"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "artifacts"))
    (root / "dreamlora" / "methods" / "statelora.py").write_text(STATE_METHOD.lstrip(), encoding="utf-8")
    return root


def train_text(repo: Path, model_dir: Path, out: Path, *extra: str, stop_at: int = 0) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(repo),
           "STATELORA_STOP_AT": str(stop_at)}
    cmd = [sys.executable, str(repo / "dreamlora" / "train_text.py"), "--adapter", "statelora", "--rank", "4",
           "--model_name_or_path", str(model_dir), "--train_file", str(SST2_TRAIN), "--max_train_samples", "32",
           "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--num_warmup_steps", "2",
           "--learning_rate", "5e-3", "--max_length", "24", "--max_train_steps", "6", "--report_to", "none",
           "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


def test_state_survives_a_stop_and_resume_exactly(package_copy, tmp_path):
    model_dir = build_tiny_text_model("bert", tmp_path / "bert")
    straight = train_text(package_copy, model_dir, tmp_path / "a")
    stopped = train_text(package_copy, model_dir, tmp_path / "b", stop_at=3)  # Stop after step 3 of 6
    assert not stopped["finished"] and stopped["steps"] == 3
    resumed = train_text(package_copy, model_dir, tmp_path / "b", "--resume_from_checkpoint", "latest")
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["finished"] and straight["finished"]

    a, b = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys()
    state = [k for k in a if k.rsplit(".", 1)[-1] in STATE_KEYS]
    assert len(state) == 3 * sum(k.endswith(".lora_A.weight") for k in a) > 0  # every layer's state is in the file
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert all(a[k] == 3 for k in state if k.endswith(".resets"))  # steps 2, 4 and 6 reset the optimizer
    assert all(a[k] > 0 for k in state if k.endswith(".lr_seen"))
    assert all(a[k].abs().sum() > 0 for k in state if k.endswith(".importance"))
