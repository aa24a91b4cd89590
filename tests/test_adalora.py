"""AdaLoRA: the formula, parity with PEFT 0.21.2's AdaLoRA (allocator and training), its export with pruned
triplets in unmodified diffusers, exact resume across a masking step, and its bad input."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import OneLayer
from safetensors.torch import load_file
from torch import nn
from train_helpers import train_cmd, train_in_process

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.hooks import StepContext
from dreamlora.methods.adalora import AdaLoRA, AdaLoRAOptions, budget_schedule

PEFT_VERSION = "0.21.2"


def _peft_version() -> str | None:
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


# CI sets DREAMLORA_REQUIRE_PEFT_PARITY: there a newer PEFT runs the parity tests (and fails them if it changed)
# instead of skipping them unseen
needs_peft = pytest.mark.skipif(
    _peft_version() != PEFT_VERSION and not os.environ.get("DREAMLORA_REQUIRE_PEFT_PARITY"),
    reason=f"parity is pinned to peft=={PEFT_VERSION} (found {_peft_version()})")


def hand_delta(layer) -> torch.Tensor:
    """ΔW = α/(r + 1e-5) · B·diag(E)·A (the method table's hand formula), (d_out, d_in)."""
    r = layer.lora_A.shape[0]
    return layer.config.alpha / (r + 1e-5) * layer.lora_B @ torch.diag(layer.lora_E.reshape(-1)) @ layer.lora_A


# --- the twins: our adapter and PEFT's on the same base, with PEFT's initial A, E, B copied into ours -------------
TARGETS = ["conv", "fc1", "fc2", "fc3"]
SCHEDULE = {"tinit": 2, "tfinal": 3, "delta_t": 2, "total_step": 12}


class Net(nn.Module):
    """One Conv2d and three Linear layers; returns `.loss`, as PEFT adds its orthogonality term only then."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 16)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x, y):
        h = F.gelu(self.conv(x)).flatten(1)
        out = self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(h)))))
        return SimpleNamespace(loss=F.cross_entropy(out, y))


def twins(rank: int = 4, target_r: int = 2, orth: float = 0.1, **schedule):
    from peft import AdaLoraConfig, get_peft_model

    schedule = {**SCHEDULE, **schedule}
    base = Net()
    peft = get_peft_model(copy.deepcopy(base), AdaLoraConfig(
        init_r=rank, target_r=target_r, lora_alpha=8, target_modules=TARGETS, tinit=schedule["tinit"],
        tfinal=schedule["tfinal"], deltaT=schedule["delta_t"], total_step=schedule["total_step"], beta1=0.85,
        beta2=0.85, orth_reg_weight=orth))
    ours = attach(copy.deepcopy(base), AdapterConfig(method="adalora", rank=rank, alpha=8, target_modules=TARGETS,
                                                     options={"target_r": target_r, "orth_reg_weight": orth,
                                                              **schedule}))
    layers = dreamlora.adapter_layers(ours, "default")
    with torch.no_grad():
        for path, layer in layers.items():
            for f in "AEB":
                getattr(layer, f"lora_{f}").copy_(peft_param(peft, path, f))
    return ours, peft, layers


def peft_param(peft, path: str, f: str) -> nn.Parameter:
    return getattr(peft.base_model.model.get_submodule(path), f"lora_{f}")["default"]


def peft_mask(peft, path: str) -> list[bool] | None:
    pattern = peft.peft_config["default"].rank_pattern
    return None if pattern is None else pattern[f"{path}.lora_E.default"]


def batch(i: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 3, 4, 4, generator=g, dtype=dtype), torch.randint(0, 5, (8,), generator=g)


@needs_peft
def test_budget_schedule_is_peft_s_at_every_step():
    _, peft, layers = twins()
    allocator = peft.base_model.rankallocator
    options = next(iter(layers.values())).config.options
    assert allocator.init_bgt == 16 and allocator.target_bgt == 8
    for step in range(0, 15):
        assert budget_schedule(step, 16, 8, options, 12) == allocator.budget_schedule(step), step


@needs_peft
def test_allocator_on_identical_parameters_and_gradients_matches_peft_exactly():
    """fp32, random parameters and gradients: EMAs, masks and E after each call are bit-equal to PEFT's
    `update_and_allocate(step)` over the whole schedule (warmup, budget steps, forced mask, frozen pattern)."""
    ours, peft, layers = twins()
    torch.manual_seed(1)
    pruned_somewhere = False
    for step in range(1, 15):
        with torch.no_grad():
            for path, layer in layers.items():
                for f in "AEB":
                    theirs = peft_param(peft, path, f)
                    theirs.add_(torch.randn_like(theirs) * 0.1)
                    theirs.grad = torch.randn_like(theirs) * (1 + TARGETS.index(path))  # unequal layers
                    getattr(layer, f"lora_{f}").copy_(theirs)
                    getattr(layer, f"lora_{f}").grad = theirs.grad.clone()
        peft.base_model.update_and_allocate(step)
        AdaLoRA.after_optimizer_step(list(layers.values()), StepContext(step=step))
        for path, layer in layers.items():
            for f in "AEB":
                assert torch.equal(getattr(layer, f"lora_{f}"), peft_param(peft, path, f)), (step, path, f)
                name = f"{path}.lora_{f}.default"
                ema = peft.base_model.rankallocator.exp_avg_ipt
                if name in ema:
                    assert torch.equal(getattr(layer, f"ipt_{f}"), ema[name]), (step, path, f)
                    assert torch.equal(getattr(layer, f"unc_{f}"),
                                       peft.base_model.rankallocator.exp_avg_unc[name]), (step, path, f)
                else:  # PEFT dropped its averages at T - tfinal; ours are zeroed there
                    assert step >= 9 and not getattr(layer, f"ipt_{f}").any()
            if peft_mask(peft, path) is not None:
                assert layer.mask.bool().tolist() == peft_mask(peft, path), (step, path)
                pruned_somewhere |= not all(peft_mask(peft, path))
    assert pruned_somewhere
    kept = {path: int(layer.mask.sum()) for path, layer in layers.items()}
    assert sum(kept.values()) == 8 and len(set(kept.values())) > 1  # the target budget, unevenly spread


@needs_peft
def test_training_end_to_end_in_float64_matches_peft():
    """AdamW, the orthogonality term and the allocator through dreamlora's hooks, in float64 (masks rank by
    `<=` the k-th value, so near-ties need it): losses, parameters and masks agree with PEFT at every step."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours, peft, layers = twins()
        ours_opt = torch.optim.AdamW(dreamlora.param_groups(ours, lr=2e-2, weight_decay=0.01))
        peft_opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.01)
        for step in range(1, 13):
            x, y = batch(step, torch.float64)
            ours_loss = ours(x, y).loss + dreamlora.regularization_loss(ours)
            peft_loss = peft.base_model(x, y).loss
            assert abs(ours_loss.item() - peft_loss.item()) <= 1e-10, step
            ours_loss.backward()
            peft_loss.backward()
            ours_opt.step()
            peft_opt.step()
            assert dreamlora.on_optimizer_step(ours, ours_opt) == step
            peft.base_model.update_and_allocate(step)
            ours_opt.zero_grad()
            peft_opt.zero_grad()
            for path, layer in layers.items():
                for f in "AEB":
                    diff = (getattr(layer, f"lora_{f}") - peft_param(peft, path, f)).abs().max().item()
                    assert diff <= 1e-10, (step, path, f, diff)
                    ema = peft.base_model.rankallocator.exp_avg_unc.get(f"{path}.lora_{f}.default")
                    if ema is not None:  # the importance too (PEFT drops it at T - tfinal)
                        torch.testing.assert_close(getattr(layer, f"unc_{f}"), ema, rtol=1e-8, atol=1e-18)
                if peft_mask(peft, path) is not None:
                    assert layer.mask.bool().tolist() == peft_mask(peft, path), (step, path)
    finally:
        torch.set_default_dtype(previous)
    ranks = {path: int(layer.kept().sum()) for path, layer in layers.items()}
    assert sum(ranks.values()) == 8 and len(set(ranks.values())) > 1


def test_orthogonality_term_is_the_mean_frobenius_distance_of_the_grams():
    model = attach(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 7)),
                   AdapterConfig(method="adalora", rank=3, target_modules=["0", "1"],
                                 options={"orth_reg_weight": 0.3}))
    layers = list(dreamlora.adapter_layers(model, "default").values())
    norms = [torch.linalg.norm(la.lora_A @ la.lora_A.T - torch.eye(3)) for la in layers]
    norms += [torch.linalg.norm(la.lora_B.T @ la.lora_B - torch.eye(3)) for la in layers]
    torch.testing.assert_close(dreamlora.regularization_loss(model), 0.3 * sum(norms) / 4)
    assert dreamlora.regularization_loss(model).requires_grad


def test_export_leaves_pruned_triplets_and_rank_0_layers_out_and_stays_exact():
    model = attach(nn.Sequential(nn.Linear(6, 5), nn.Conv2d(5, 4, 3), nn.Linear(5, 7)),
                   AdapterConfig(method="adalora", rank=3, target_modules=["0", "1", "2"]))
    layers = dreamlora.adapter_layers(model, "default")
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_E.normal_()
        layers["0"].lora_E[1] = 0
        layers["2"].lora_E.zero_()
    assert layers["2"].lora_factors() == {}
    factors = layers["0"].lora_factors()
    assert factors["lora_A.weight"].shape == (2, 6) and factors["lora_B.weight"].shape == (5, 2)
    torch.testing.assert_close(factors["lora_B.weight"] @ factors["lora_A.weight"], layers["0"].delta_weight())
    conv = layers["1"].lora_factors()
    assert conv["lora_A.weight"].shape == (3, 5, 3, 3) and conv["lora_B.weight"].shape == (4, 3, 1, 1)
    tensors, config = dreamlora.io.peft_lora_state_dict(model)
    assert not any(k.startswith("2.") for k in tensors) and "2" not in config["target_modules"]
    assert {p: config["rank_pattern"].get(p, config["r"]) for p in ("0", "1")} == {"0": 2, "1": 3}
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]


def test_an_untrained_adapter_saves_and_loads_without_a_lora_file(tmp_path):
    """E = 0 at attach: no layer has a LoRA form, so `save` writes the native file alone (it raised before)."""
    model = attach(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 7)),
                   AdapterConfig(method="adalora", rank=3, target_modules=["0", "1"]))
    path = dreamlora.save(model, tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    fresh = dreamlora.load(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 7)), path)
    assert {k: v.shape for k, v in dreamlora.io.adapter_state_dict(fresh).items()} == {
        k: v.shape for k, v in dreamlora.io.adapter_state_dict(model).items()}


def test_embeddings_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="adalora adapts Linear, Conv1D and Conv2d layers .* not Embedding"):
        attach(OneLayer(nn.Embedding(10, 4)), AdapterConfig(method="adalora", rank=2, target_modules=["proj"]))


# --- export through the trained pipeline's files, in unmodified diffusers ---------------------------------------
def test_pruned_export_loads_in_diffusers_with_the_same_image(tiny_model_dir, tmp_path):
    from pipelines.diffusion import export
    from pipelines.diffusion.sample import load_pipeline

    def image(pipe):
        out = pipe("a photo of sks dog", num_inference_steps=4, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
        return np.round(out * 255).astype(np.int16)

    pipe = load_pipeline(str(tiny_model_dir), "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    plain = image(pipe)
    reference = copy.deepcopy(pipe)
    attach(pipe.unet, AdapterConfig(method="adalora", rank=4, alpha=4.0, target_modules=["to_q", "to_v", "conv1"]))
    layers = dreamlora.adapter_layers(pipe.unet, "default")
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.lora_E.normal_(0, 40.0)  # E starts at 0: give each triplet a visible singular value
            layer.lora_E[: i % 4] = 0  # 0 to 3 of the 4 triplets pruned, by layer
        empty = next(iter(layers))
        layers[empty].lora_E.zero_()  # one layer pruned to rank 0
    ours = image(pipe)
    export.write_diffusers_lora(tmp_path, pipe.unet, None)
    file = tmp_path / export.DIFFUSERS_WEIGHT_NAME
    keys = load_file(str(file))
    assert not any(k.startswith(f"unet.{empty}.") for k in keys)
    config = json.loads(dreamlora.io.read_metadata(file)["lora_adapter_metadata"])
    patterns = {k.removeprefix("unet."): v for k, v in config.items()}  # diffusers packs it under `unet.`
    assert patterns["rank_pattern"] and patterns["alpha_pattern"] == patterns["rank_pattern"]
    reference.load_lora_weights(str(tmp_path), weight_name=export.DIFFUSERS_WEIGHT_NAME)
    assert np.abs(ours - plain).max() > 10
    assert np.abs(image(reference) - ours).max() <= 2


# --- the trainers: resume across a masking step, the report, and bad input ----------------------------------------
RESUME = ["--adapter", "adalora", "--rank", 4, "--max_train_steps", 12, "--checkpointing_steps", 4,
          "--adalora_tinit", 2, "--adalora_tfinal", 4, "--adalora_delta_t", 2, "--learning_rate", 5e-3,
          "--train_text_encoder"]


def test_dreambooth_resume_across_masking_steps_is_exact_and_reports_the_ranks(tiny_model_dir, tmp_path):
    """Masks at steps 4, 6 and (forced) 8, frozen after; killed after checkpoint-4, resumed: the same files."""
    reference = tmp_path / "straight"
    assert train_in_process(tiny_model_dir, reference, *RESUME) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_model_dir, killed, *RESUME), env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ((killed / "progress.jsonl").is_file() and '"event": "checkpoint", "step": 4'
                                          in (killed / "progress.jsonl").read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "unet_adapter.safetensors").exists()
    assert train_in_process(tiny_model_dir, killed, *RESUME, "--resume_from_checkpoint", "latest") == 0
    for component in ("unet", "text_encoder"):
        a = load_file(reference / f"{component}_adapter.safetensors")
        b = load_file(killed / f"{component}_adapter.safetensors")
        assert a.keys() == b.keys() and any(k.endswith(".adalora_mask") for k in a)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
        masks = [t for k, t in a.items() if k.endswith(".adalora_mask")]
        assert sum(int(m.sum()) for m in masks) == 3 * len(masks)  # target_r = round(2/3 · 4) = 3 per matrix
    run = json.loads((reference / "run.json").read_text())
    report = run["method_report"]["unet"]
    assert report["budget"]["final"] == report["budget"]["target"] == sum(report["rank_per_layer"].values())
    exported = load_file(reference / "pytorch_lora_weights.safetensors")  # the pruned plain-LoRA form
    assert report["final_params"] == sum(t.numel() for k, t in exported.items() if k.startswith("unet."))
    assert (reference / run["ranks_plot"]).is_file()


@pytest.mark.parametrize(("options", "message"), [
    ({"target_r": 5}, "--adalora_target_r 5 is more than --rank 4"),
    ({"tinit": 8, "tfinal": 4, "total_step": 12}, "--adalora_tinit 8 and --adalora_tfinal 4 leave no steps"),
    ({"delta_t": 0}, "--adalora_delta_t must be an integer >= 1"),
    ({"beta1": 1.0}, "--adalora_beta1 must be in (0, 1)"),
])
def test_bad_options_name_the_flag(options, message):
    with pytest.raises(ValueError) as e:
        AdapterConfig(method="adalora", rank=4, options=options)
    assert str(e.value).startswith(message)


def test_the_schedule_checked_against_the_run():
    options = AdaLoRAOptions(tinit=3, tfinal=7)
    config = AdapterConfig(method="adalora", rank=4)
    with pytest.raises(ValueError, match=r"^--adalora_tinit 3 and --adalora_tfinal 7 leave no steps to prune in 10"):
        options.check(config, 10)
    with pytest.raises(ValueError, match=r"^--adalora_total_step 20 is more than the run's 10"):
        AdaLoRAOptions(total_step=20).check(config, 10)
    AdaLoRAOptions(**AdaLoRAOptions.run_defaults(1)).check(config, 1)  # the trainers' defaults fit any run


@pytest.mark.parametrize(("extra", "message"), [
    (["--adalora_target_r", 6], "error: --adalora_target_r 6 is more than --rank 4"),
    (["--adalora_tinit", 2, "--adalora_tfinal", 1], "error: --adalora_tinit 2 and --adalora_tfinal 1 leave no steps"),
])
def test_the_trainer_names_the_flag(tiny_model_dir, tmp_path, extra, message, capsys):
    code = train_in_process(tiny_model_dir, tmp_path / "out", "--adapter", "adalora", "--rank", 4,
                            "--max_train_steps", 3, *extra)
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
