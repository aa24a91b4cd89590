"""The one table: every method × layer kind × base dtype must satisfy the adapter contract."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYER_KINDS, METHOD_NAMES, OneLayer, options_for, supports

import dreamlora
from dreamlora import AdapterConfig, attach

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [(m, k, d) for m in METHOD_NAMES for k in LAYER_KINDS if supports(m, k) for d in DTYPES]
IDS = [f"{m}-{k}-{d}" for m, k, d in CASES]


def build(method: str, kind: str, dtype: str, **options):
    make_layer, make_input = LAYER_KINDS[kind]
    base = OneLayer(make_layer()).to(DTYPES[dtype])
    for p in base.parameters():  # a non-trivial bias and weight so bias handling is visible
        p.data.normal_(0, 0.3)
    config = AdapterConfig(method=method, rank=3, alpha=5.0, target_modules=["proj"],
                           options=options_for(method, singlora_ramp_steps=options.pop("ramp", 10)), **options)
    model = attach(copy.deepcopy(base), config)
    x = make_input()
    return base, model, x.to(DTYPES[dtype]) if x.is_floating_point() else x


def layer_of(model):
    return model.proj.adapters["default"]


def perturb(model, step: int = 4) -> None:
    """Move every adapter parameter off its init so the checks below see a real update."""
    layer = layer_of(model)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    layer.step = step


def tol(dtype: str) -> dict:
    """Within the base dtype's rounding: fp16 keeps 10 mantissa bits, bf16 7."""
    return {"fp32": {"rtol": 1e-5, "atol": 1e-5}, "fp16": {"rtol": 4e-3, "atol": 4e-3},
            "bf16": {"rtol": 2e-2, "atol": 3e-2}}[dtype]


def hand_weight(method: str, model) -> torch.Tensor:
    """W' written straight from the papers' formulas, in fp32 and the base layer's own shape."""
    layer, base = layer_of(model), model.proj.base_layer
    w0 = base.weight.float()
    if isinstance(base, torch.nn.Embedding):  # PEFT's view of an embedding: Wᵀ, vocabulary as d_in
        return hand_weight_matrix(method, layer, w0.T).T
    return hand_weight_matrix(method, layer, w0.reshape(w0.shape[0], -1)).reshape(w0.shape)


def hand_weight_matrix(method: str, layer, w0: torch.Tensor) -> torch.Tensor:
    """W' for a (d_out, d_in) base matrix (a method added in its own file brings its formula: `own_hand_delta`)."""
    s = 5.0 / 3
    if method not in ("lora", "loraplus", "dora", "singlora"):
        return w0 + own_hand_delta(method)(layer)
    if method == "singlora":
        a = layer.singlora_A
        u = min(layer.step / 10, 1.0)
        return w0 + s * u * a[: w0.shape[0]] @ a[: w0.shape[1]].T
    a = layer.lora_A.reshape(3, -1)
    b = layer.lora_B.reshape(-1, 3)
    w = w0 + s * b @ a
    if method == "dora":
        m = layer.lora_magnitude_vector.reshape(-1, 1)
        w = m * w / w.norm(dim=1, keepdim=True)
    return w


def own_hand_delta(method: str):
    """A method not written out above brings its hand formula in its own test file, `tests/test_<method>.py`:
    `hand_delta(layer)`, ΔW (d_out, d_in) in fp32 from the paper's formula and the layer's parameters. So adding
    a method edits no line of this table."""
    module = importlib.import_module(f"test_{method}")
    if not hasattr(module, "hand_delta"):
        raise AssertionError(f"tests/test_{method}.py must define hand_delta(layer) for the method table")
    return module.hand_delta


def apply_weight(base, weight, x):
    if isinstance(base, torch.nn.Embedding):
        return torch.nn.functional.embedding(x, weight)
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x.float(), weight, base.bias.float(), base.stride, base.padding)
    return F.linear(x.float(), weight, base.bias.float())


@pytest.mark.parametrize(("method", "kind", "dtype"), CASES, ids=IDS)
def test_identity_at_init(method, kind, dtype):
    base, model, x = build(method, kind, dtype)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize(("method", "kind", "dtype"), CASES, ids=IDS)
def test_adapter_is_fp32_and_only_trainable_part(method, kind, dtype):
    _, model, _ = build(method, kind, dtype)
    adapter = set(map(id, layer_of(model).parameters()))
    assert adapter
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in adapter), name
        if id(p) in adapter:
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == DTYPES[dtype], name


@pytest.mark.parametrize(("method", "kind", "dtype"), CASES, ids=IDS)
def test_forward_and_merge_equal_the_formula(method, kind, dtype):
    _, model, x = build(method, kind, dtype)
    perturb(model)
    with torch.no_grad():
        expected_w = hand_weight(method, model)
        torch.testing.assert_close(layer_of(model).merged_weight(), expected_w, rtol=1e-5, atol=1e-5)
        expected = apply_weight(model.proj.base_layer, expected_w, x)
        out = model(x)
        assert out.dtype == DTYPES[dtype]  # cast out
        torch.testing.assert_close(out.float(), expected, **tol(dtype))


@pytest.mark.parametrize(("method", "kind", "dtype"), CASES, ids=IDS)
def test_merged_equals_unmerged(method, kind, dtype):
    base, model, x = build(method, kind, dtype)
    perturb(model)
    with torch.no_grad():
        unmerged = model(x)
        merged_model = dreamlora.merge(copy.deepcopy(model))
        assert type(merged_model.proj) is type(base.proj)  # no dreamlora code left in the path
        merged = merged_model(x)
    assert merged.dtype == unmerged.dtype
    torch.testing.assert_close(merged.float(), unmerged.float(), **tol(dtype))


@pytest.mark.parametrize(("method", "kind", "dtype"), CASES, ids=IDS)
def test_gradients_reach_adapter_only(method, kind, dtype):
    _, model, x = build(method, kind, dtype)
    perturb(model)
    if x.is_floating_point():
        x.requires_grad_()
    model(x).float().square().mean().backward()
    for p in layer_of(model).parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    for p in model.proj.base_layer.parameters():
        assert p.grad is None
    assert x.grad is not None or not x.is_floating_point()  # the adapter does not cut the graph to the input


@pytest.mark.parametrize(("method", "kind", "dtype"), CASES, ids=IDS)
def test_save_load_bit_exact(method, kind, dtype, tmp_path):
    base, model, x = build(method, kind, dtype)
    perturb(model, step=7)
    path = dreamlora.save(model, tmp_path / "adapter.safetensors")
    restored = dreamlora.load(copy.deepcopy(base), path)
    saved, loaded = layer_of(model), layer_of(restored)
    for (name, p), (_, q) in zip(saved.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert loaded.step == 7 and loaded.config == saved.config
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_singlora_first_step_is_not_zeroed(kind):
    _, model, x = build("singlora", kind, "fp32")
    model(x).square().mean().backward()
    grad = layer_of(model).singlora_A.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("accumulation", [1, 3])
def test_singlora_ramp_follows_optimizer_steps(accumulation):
    _, model, x = build("singlora", "linear_wide", "fp32", ramp=4)
    layer = layer_of(model)
    opt = torch.optim.SGD(dreamlora.param_groups(model, lr=1e-2))
    for k in range(1, 7):
        for _ in range(accumulation):  # micro-batches: forwards and backwards must not move t
            (model(x).square().mean() / accumulation).backward()
            assert layer.step == k - 1
        opt.step()
        assert dreamlora.on_optimizer_step(model, opt) == k
        opt.zero_grad()
        assert layer.ramp() == min(k / 4, 1.0)
    # the ramp state rides in model.state_dict(), so an accelerate checkpoint resumes it
    fresh = build("singlora", "linear_wide", "fp32", ramp=4)[1]
    fresh.load_state_dict(model.state_dict())
    assert layer_of(fresh).step == 6
