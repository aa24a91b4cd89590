"""Caption augmentation (issue #14): `--caption_dropout_rate`, `--shuffle_caption --keep_tokens N`,
`--keep_tokens_separator`. Each draw is a function of (seed, epoch, stream, dataset index), recomputed here; class
rows are never touched; a rate of 0 leaves every batch byte-identical to a dataset without the feature."""

from __future__ import annotations

import math
import random
import shutil

import pytest
import torch
from train_helpers import INSTANCE_DIR, PROMPT

from dreamlora.errors import ArgError
from dreamlora.train_args import parse_args
from pipelines.diffusion import data as dbdata
from pipelines.diffusion.captions import DROPOUT_DRAW, CaptionAugment, shuffle_caption, split_tags
from pipelines.trainer.order import EpochShuffle, stable_seed

TAGS = "sks dog, photo, grass, sunny day, red collar, outdoors"


def tagged_examples(n: int = 4) -> list[dbdata.Example]:
    examples = dbdata.read_examples(INSTANCE_DIR, "--instance_data_dir", PROMPT, 64, is_class=False)[:n]
    for i, e in enumerate(examples):
        e.prompt = f"{TAGS}, tag{i}"
    return examples


def drawn_dropout(seed: int, epoch: int, index: int, rate: float) -> bool:
    """The draw the trainer must make, written out: a uniform from the (seed, epoch, stream 0, index) seed."""
    return random.Random(stable_seed(seed, epoch, 0, index, DROPOUT_DRAW)).random() < rate


def test_shuffle_keeps_the_first_n_tags_and_permutes_the_rest():
    caption = " sks dog ,photo,, grass,sunny day , red collar, outdoors,"  # messy spacing, an empty tag, trailing ','
    orders = set()
    for epoch in range(40):
        rng = random.Random(stable_seed(7, epoch))
        out = shuffle_caption(caption, 2, "", rng)
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "photo"]
        assert sorted(tags[2:]) == sorted(["grass", "sunny day", "red collar", "outdoors"])
        assert out == shuffle_caption(caption, 2, "", random.Random(stable_seed(7, epoch)))  # a function of the seed
        orders.add(tuple(tags[2:]))
    assert len(orders) > 10  # 24 orders exist: a real shuffle, not one fixed permutation
    # keep_tokens beyond the number of tags: nothing moves, only the whitespace is normalised
    normalised = "sks dog, photo, grass, sunny day, red collar, outdoors"
    assert shuffle_caption(caption, 10, "", random.Random(0)) == normalised


def test_keep_tokens_separator_fixes_a_prefix_and_a_suffix():
    caption = "sks dog, photo ||| grass, sunny day, red collar ||| masterpiece, best quality"
    middles = set()
    for seed in range(30):
        tags = shuffle_caption(caption, 5, "|||", random.Random(seed)).split(", ")
        assert tags[:2] == ["sks dog", "photo"] and tags[-2:] == ["masterpiece", "best quality"]
        middles.add(tuple(tags[2:5]))
        assert sorted(tags[2:5]) == ["grass", "red collar", "sunny day"]
    assert len(middles) == 6  # every order of the three movable tags occurs
    # a caption without the separator falls back to --keep_tokens
    assert shuffle_caption("a, b, c", 3, "|||", random.Random(0)) == "a, b, c"


def test_dropout_empties_exactly_the_drawn_samples_and_about_p_of_them():
    rate, seed = 0.3, 11
    augment = CaptionAugment(seed=seed, dropout_rate=rate)
    draws = [(epoch, index) for epoch in range(500) for index in range(40)]
    dropped = [augment("a, b", epoch, 0, index) == "" for epoch, index in draws]
    assert dropped == [drawn_dropout(seed, epoch, index, rate) for epoch, index in draws]
    fraction, sigma = sum(dropped) / len(draws), math.sqrt(rate * (1 - rate) / len(draws))
    print(f"dropped {fraction:.4f} of {len(draws)} captions at P={rate} (sigma {sigma:.4f})")
    assert abs(fraction - rate) < 4 * sigma
    assert not any(CaptionAugment(seed=seed, dropout_rate=0.0)("a, b", e, 0, i) == "" for e, i in draws[:500])
    assert all(CaptionAugment(seed=seed, dropout_rate=1.0)("a, b", e, 0, i) == "" for e, i in draws[:500])


def test_the_dataset_drops_the_drawn_instance_captions_and_never_a_class_prompt():
    instances, classes = tagged_examples(2), tagged_examples(3)
    for e in classes:
        e.prompt, e.is_class = "a photo of dog, in a garden", True
    rate = 0.5
    dataset = dbdata.DreamBoothDataset(instances, classes, 64, True, False, seed=3,
                                       captions=CaptionAugment(seed=3, dropout_rate=rate, shuffle=True, keep_tokens=1))
    seen = 0
    for epoch in range(12):
        dataset.select_epoch(epoch)
        for index in range(len(dataset)):  # 3: instance index 2 wraps onto image 0 with its own draw
            item = dataset[index]
            caption = item["instance"]["prompt"]
            if drawn_dropout(3, epoch, index, rate):
                assert caption == ""
            else:
                tags = caption.split(", ")
                assert tags[0] == "sks dog" and sorted(tags) == sorted(split_tags(instances[index % 2].prompt))
                seen += 1
            assert item["class"]["prompt"] == "a photo of dog, in a garden"  # never dropped, never shuffled
    assert 0 < seen < 36


def test_rate_zero_and_no_shuffle_give_byte_identical_batches():
    examples = tagged_examples()
    plain = dbdata.DreamBoothDataset(examples, [], 64, False, True, seed=5)
    off = dbdata.DreamBoothDataset(examples, [], 64, False, True, seed=5, captions=CaptionAugment(seed=5))
    for epoch in range(3):
        for dataset in (plain, off):
            dataset.select_epoch(epoch)
        a = dbdata.collate([plain[i] for i in range(4)])
        b = dbdata.collate([off[i] for i in range(4)])
        assert a["pixel_values"].numpy().tobytes() == b["pixel_values"].numpy().tobytes()
        assert (a["prompts"], a["keys"], a["rows"]) == (b["prompts"], b["keys"], b["rows"])
        assert torch.equal(a["is_class"], b["is_class"])
        assert a["prompts"] == [e.prompt for e in examples]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_captions_do_not_depend_on_the_batch_size_or_on_shuffling(batch_size):
    """The caption of (epoch, index) is the same in any batch; and shuffling on or off drops the same captions."""
    examples = tagged_examples()

    def captions(batch, shuffle):
        dataset = dbdata.DreamBoothDataset(examples, [], 64, True, False, seed=9,
                                           captions=CaptionAugment(seed=9, dropout_rate=0.4, shuffle=shuffle))
        sampler = EpochShuffle(len(dataset), 9)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=dbdata.collate)
        found = {}
        for epoch in range(6):
            dataset.select_epoch(epoch)
            sampler.select_epoch(epoch)
            for b in loader:
                found.update({(epoch, index): prompt for (_, index), prompt in zip(b["rows"], b["prompts"],
                                                                                  strict=True)})
        return found

    one, many = captions(1, True), captions(batch_size, True)
    assert one == many
    unshuffled = captions(batch_size, False)
    assert {k for k, v in unshuffled.items() if v == ""} == {k for k, v in many.items() if v == ""}
    assert any(v not in ("", examples[k[1]].prompt) for k, v in many.items())  # some were reordered


def test_the_empty_prompt_is_encoded_like_any_prompt(tiny_model_dir):
    from dreamlora.train import PromptEncoder
    from pipelines.diffusion.models import encode_prompts, load_components

    sd = load_components(str(tiny_model_dir))
    prompts = ["", TAGS, ""]
    with torch.no_grad():
        expected = torch.cat([encode_prompts(sd.tokenizer, sd.text_encoder, [p]) for p in prompts])
    cached = PromptEncoder(sd.tokenizer, None, sd.text_encoder)
    torch.testing.assert_close(cached(prompts), expected)
    assert set(cached.cache) == {"", TAGS}
    uncached = PromptEncoder(sd.tokenizer, None, sd.text_encoder, cache=False)  # --shuffle_caption
    torch.testing.assert_close(uncached(prompts), expected)
    assert uncached.cache == {}


def test_caption_flags_are_checked_before_anything_loads(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p",
            "--output_dir", str(tmp_path)]
    for extra, message in [
        (["--caption_dropout_rate", "1.5"], "--caption_dropout_rate must be in [0, 1], got 1.5"),
        (["--keep_tokens", "2"], "--keep_tokens/--keep_tokens_separator only apply with --shuffle_caption"),
        (["--shuffle_caption", "--keep_tokens", "-1"], "--keep_tokens must be >= 0, got -1"),
        (["--shuffle_caption", "--keep_tokens_separator", ", "], "must not contain the tag separator ','"),
    ]:
        with pytest.raises(ArgError) as e:
            parse_args(base + extra)
        assert message in str(e.value)
    args = parse_args(base + ["--caption_dropout_rate", "0.1", "--shuffle_caption", "--keep_tokens", "1"])
    assert (args.caption_dropout_rate, args.shuffle_caption, args.keep_tokens) == (0.1, True, 1)


def tagged_folder(tmp_path):
    folder = tmp_path / "tagged"
    shutil.copytree(INSTANCE_DIR, folder)
    for i, image in enumerate(sorted(folder.glob("*.jpg"))):
        image.with_suffix(".txt").write_text(f"{TAGS}, tag{i}")
    return folder


def adapters(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "unet_adapter.safetensors")


def test_training_with_caption_augmentation_resumes_exactly(tiny_model_dir, tmp_path):
    """6 steps over 4 tagged photos (1.5 epochs) from scratch, and the same run resumed from its step-3 checkpoint:
    the same adapter. The flags reach training: without them the adapter differs."""
    from train_helpers import train_in_process

    folder = tagged_folder(tmp_path)
    flags = ["--max_train_steps", 6, "--checkpointing_steps", 3, "--learning_rate", 1e-2, "--random_flip",
             "--caption_dropout_rate", 0.5, "--shuffle_caption", "--keep_tokens", 1]
    reference, resumed, plain = tmp_path / "reference", tmp_path / "resumed", tmp_path / "plain"
    assert train_in_process(tiny_model_dir, reference, *flags, instance_dir=folder) == 0
    shutil.copytree(reference / "checkpoint-3", resumed / "checkpoint-3")
    assert train_in_process(tiny_model_dir, resumed, *flags, "--resume_from_checkpoint", "latest",
                            instance_dir=folder) == 0
    a, b = adapters(reference), adapters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_in_process(tiny_model_dir, plain, *flags[:7], instance_dir=folder) == 0
    c = adapters(plain)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-6
