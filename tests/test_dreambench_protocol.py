"""The DreamBench protocol shipped with the package, and the metric definitions, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from eval import metrics
from pipelines.dreambench import load_protocol


@pytest.fixture(scope="module")
def protocol():
    return load_protocol()


def test_thirty_subjects_with_their_classes(protocol):
    assert len(protocol.subjects) == 30
    assert protocol.subjects["bear_plushie"].class_noun == "stuffed animal"
    live = sorted(s.name for s in protocol.subjects.values() if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]


def test_objects_get_20_contexts_and_5_properties(protocol):
    prompts = protocol.prompts(protocol.subjects["teapot"], token="sks")
    assert len(prompts) == 25
    assert prompts[0] == "a sks teapot in the jungle"
    assert prompts[19] == "a sks teapot on top of a white rug"
    assert prompts[20:] == ["a red sks teapot", "a purple sks teapot", "a shiny sks teapot", "a wet sks teapot",
                            "a cube shaped sks teapot"]


def test_live_subjects_get_10_contexts_10_accessories_and_5_properties(protocol):
    prompts = protocol.prompts(protocol.subjects["dog"], token="zwx")
    assert len(prompts) == 25
    assert prompts[9] == "a zwx dog on top of a purple rug in a forest"
    assert prompts[10] == "a zwx dog wearing a red hat"
    assert prompts[19] == "a zwx dog in a purple wizard outfit"
    assert prompts[20:] == ["a red zwx dog", "a purple zwx dog", "a shiny zwx dog", "a wet zwx dog",
                            "a cube shaped zwx dog"]
    assert prompts[10:20] != [p.replace("teapot", "dog") for p in protocol.prompts(protocol.subjects["teapot"],
                                                                                     "zwx")[10:20]]


def test_clip_t_prompts_drop_the_identifier_unless_asked(protocol):
    dog = protocol.subjects["dog"]
    assert protocol.clip_t_prompts(dog)[0] == "a dog in the jungle"
    assert protocol.clip_t_prompts(protocol.subjects["teapot"])[22] == "a shiny teapot"
    assert protocol.clip_t_prompts(dog, keep_identifier=True)[0] == "a sks dog in the jungle"


def test_metrics_equal_a_hand_computation():
    gen = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    ref = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0], [1.0, 1.0, 1.0]])

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    pairs = [[cos(g.tolist(), r.tolist()) for r in ref] for g in gen]
    assert metrics.subject_fidelity(gen, ref) == pytest.approx(sum(map(sum, pairs)) / 6, abs=1e-12)
    assert metrics.per_image_subject_fidelity(gen, ref).tolist() == pytest.approx([sum(r) / 3 for r in pairs])
    text = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert metrics.per_image_prompt_fidelity(gen, text).tolist() == pytest.approx([1.0, 0.0])
    same = torch.randn(5, 8)
    assert metrics.subject_fidelity(same[:1], same[:1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one prompt per image"):
        metrics.per_image_prompt_fidelity(gen, text[:1])
