"""One core, unchanged, on Stable Diffusion's UNet and text encoder and on transformers text classifiers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import METHOD_NAMES, randomize_adapters, tiny_unet, unet_inputs

import dreamlora
from dreamlora import AdapterConfig, attach


def tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16)
    return CLIPTextModel(cfg), ["q_proj", "k_proj", "v_proj", "out_proj"], lambda m: m(
        torch.randint(0, 100, (2, 7))).last_hidden_state


def tiny_classifier(kind: str):
    from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config, RobertaConfig

    common = {"num_labels": 3}
    if kind == "gpt2":  # transformers Conv1D layers, weight stored (in, out)
        cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16, pad_token_id=0, **common)
        targets = ["c_attn", "c_proj"]
    elif kind == "bert":
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=16, **common)
        targets = ["query", "value"]
    else:
        cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=20, pad_token_id=1, **common)
        targets = ["query", "value"]
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    return model, targets, lambda m: m(torch.randint(2, 100, (2, 7))).logits


def sd_unet():
    inputs = unet_inputs()
    return tiny_unet(), ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], lambda m: m(*inputs).sample


MODELS = {
    "sd_unet": sd_unet,
    "clip_text": tiny_clip_text,
    "gpt2": lambda: tiny_classifier("gpt2"),
    "bert": lambda: tiny_classifier("bert"),
    "roberta": lambda: tiny_classifier("roberta"),
}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_core_runs_unchanged_on_real_architectures(model_name, method):
    torch.manual_seed(0)
    base, targets, run = MODELS[model_name]()
    base.eval()
    model = attach(copy.deepcopy(base), AdapterConfig(method=method, rank=2, target_modules=targets))
    with torch.no_grad():
        torch.manual_seed(1)
        expected = run(base)
        torch.manual_seed(1)
        assert torch.equal(run(model), expected)  # identity at init
    randomize_adapters(model)
    for layer in dreamlora.adapter_layers(model, "default").values():
        layer.step = 50  # SingLoRA past its ramp
    torch.manual_seed(1)
    out = run(model)
    out.float().square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        merged = dreamlora.merge(copy.deepcopy(model))
        torch.manual_seed(1)
        torch.testing.assert_close(run(merged), out.detach(), rtol=1e-4, atol=1e-5)
