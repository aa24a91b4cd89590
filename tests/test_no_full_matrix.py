"""DoRA and SingLoRA train from the input side: no d_out×d_in tensor is ever built in forward or backward."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import METHOD_NAMES, OneLayer, options_for
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dreamlora import AdapterConfig, attach

D_IN, D_OUT, TOKENS = 64, 96, 5  # every activation (TOKENS × 96) is far smaller than d_out × d_in


class LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor any op materialises (views do not allocate and are skipped)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


def largest_in_train_step(model) -> int:
    x = torch.randn(TOKENS, D_IN)
    with LargestNewTensor() as probe:
        model(x).square().sum().backward()
    return probe.largest


@pytest.mark.parametrize("method", METHOD_NAMES)  # every registered method, so a new one is checked too
def test_train_step_builds_no_weight_sized_tensor(method):
    config = AdapterConfig(method=method, rank=8, target_modules=["proj"],
                           options=options_for(method, singlora_ramp_steps=0))
    model = attach(OneLayer(nn.Linear(D_IN, D_OUT)), config)
    assert largest_in_train_step(model) < D_OUT * D_IN // 4


def test_the_probe_sees_peft_dora_build_the_full_matrix():
    """Control: PEFT's DoRA computes B·A every forward, and the probe must notice."""
    from peft import LoraConfig, get_peft_model

    base = OneLayer(nn.Linear(D_IN, D_OUT))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["proj"], use_dora=True))
    assert largest_in_train_step(peft) >= D_OUT * D_IN


def test_the_core_imports_only_torch_and_safetensors():
    code = ("import sys, dreamlora; heavy = {'diffusers', 'transformers', 'gradio', 'peft', 'accelerate', "
            "'open_clip'} & {m.split('.')[0] for m in sys.modules}; print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
