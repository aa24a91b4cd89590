"""Pivotal tuning (`--train_text_encoder_ti`) on the tiny SD and SDXL presets: only the new rows of the embedding
matrices train (fp32, every other row bit-identical), they stop at the `--train_text_encoder_ti_frac` step, the
embedding files reload through diffusers' `load_textual_inversion` to `pipelines.sample`'s image, the kohya file
bundles them for A1111, ComfyUI's own loader reads the separate file, a resume is exact, and bad input is refused
with one line naming the flag."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from comfyui_loader import comfyui_root
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import INSTANCE_DIR, ROOT, launch_two, train_cmd, train_in_process

from dreamlora.errors import ArgError
from dreamlora.train_args import parse_args
from pipelines.diffusion import pivotal
from pipelines.diffusion.sample import main as sample_main

PROMPT = "a photo of TOK dog"
TOKENS = ["<s0>", "<s1>"]
VOCAB = 49408  # the CLIP BPE vocabulary of the tiny presets
ROWS = "token_embedding.new_token_rows"
FAST = ["--max_train_steps", 4, "--learning_rate", 5e-3, "--text_encoder_lr", 2e-2, "--train_text_encoder_ti"]


def train(model, out, *extra):
    assert train_in_process(model, out, "--instance_prompt", PROMPT, *FAST, *extra) == 0


@pytest.fixture(scope="module")
def sd_run(tiny_model_dir, tmp_path_factory):
    """SD 1.x, the embeddings only (no --train_text_encoder), training for the first 2 of 4 steps."""
    out = tmp_path_factory.mktemp("pivotal-sd") / "dog"
    train(tiny_model_dir, out, "--train_text_encoder_ti_frac", 0.5, "--checkpointing_steps", 1, "--save_merged")
    return out


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_dir, tmp_path_factory):
    """SDXL with adapters on both text encoders too, and the EMA."""
    out = tmp_path_factory.mktemp("pivotal-sdxl") / "dog"
    train(tiny_sdxl_dir, out, "--train_text_encoder_ti_frac", 1.0, "--train_text_encoder", "--use_ema",
          "--checkpointing_steps", 2)
    return out


def image_of(pipe, prompt: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=4, height=64, width=64, output_type="np", guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0)).images[0]
    return np.round(out * 255).astype(np.int16)


def sampled(model, run, tmp_path) -> np.ndarray:
    """`pipelines.sample`'s image of PROMPT, the abstraction as the user writes it."""
    assert sample_main(["--pretrained_model_name_or_path", str(model), "--adapter", str(run), "--prompt", PROMPT,
                        "--num_inference_steps", "4", "--height", "64", "--width", "64", "--device", "cpu",
                        "--output_dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == PROMPT and rows[0]["encoded_prompt"] == "a photo of <s0><s1> dog"
    return np.asarray(Image.open(tmp_path / "0000_0.png")).astype(np.int16)


def emb_file(run):
    return run / f"{run.name}_emb.safetensors"


def trained_rows(file) -> torch.Tensor:
    """The new rows in a checkpoint's weights of a text encoder (`text_model.` or not: transformers' layout)."""
    (rows,) = [v for k, v in load_file(file).items() if k.endswith(ROWS)]
    return rows


# --- the tokens and prompts ------------------------------------------------------------------------------------
def test_abstractions_become_numbered_tokens_as_whole_words():
    mapping = pivotal.token_map(pivotal.parse_abstractions("TOK, STY"), 2)
    assert mapping == {"TOK": ["<s0>", "<s1>"], "STY": ["<s2>", "<s3>"]}  # diffusers' numbering
    text = "TOK, a TOKEN of tok by STY. TOK_2 TOK"
    assert pivotal.replace_abstractions(text, mapping) == "<s0><s1>, a TOKEN of tok by <s2><s3>. TOK_2 <s0><s1>"


def test_new_rows_are_the_only_trainable_fp32_weights_on_a_bf16_matrix():
    matrix = torch.randn(10, 4).to(torch.bfloat16)
    rows = torch.randn(2, 4)
    embedding = pivotal.NewTokenEmbedding(pivotal.grown(torch.nn.Embedding.from_pretrained(matrix), [10, 11], rows),
                                          10, rows)
    ids = torch.tensor([[1, 10, 11, 3]])
    out = embedding(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out[0, 1:3], rows.to(torch.bfloat16))
    assert torch.equal(out[0, [0, 3]], matrix[[1, 3]])
    out.float().square().sum().backward()
    assert [n for n, p in embedding.named_parameters() if p.requires_grad] == ["new_token_rows"]
    assert embedding.new_token_rows.dtype == torch.float32 and embedding.new_token_rows.grad.abs().min() > 0


# --- SD 1.x: training, files, diffusers ------------------------------------------------------------------------
def test_only_the_new_rows_change_and_the_merged_model_carries_them(sd_run, tiny_model_dir):
    base = load_file(glob.glob(str(tiny_model_dir / "text_encoder" / "*.safetensors"))[0])
    merged = load_file(glob.glob(str(sd_run / "merged" / "text_encoder" / "*.safetensors"))[0])
    key = next(k for k in base if k.endswith("token_embedding.weight"))
    trained = load_file(emb_file(sd_run))["clip_l"]
    assert merged[key].shape == (VOCAB + 2, base[key].shape[1])
    assert torch.equal(merged[key][:VOCAB], base[key])  # every other row bit-identical
    assert torch.equal(merged[key][VOCAB:], trained) and trained.dtype == torch.float32
    assert {k for k in merged if k != key} == set(base) - {key}  # nothing else in the encoder, no extra key
    assert all(torch.equal(merged[k], base[k]) for k in base if k != key)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_run / "merged", subfolder="tokenizer")
    assert tokenizer.convert_tokens_to_ids(TOKENS) == [VOCAB, VOCAB + 1]


def test_ti_frac_stops_the_embeddings_after_its_step(sd_run):
    """frac 0.5 of 4 steps: the rows move at steps 1 and 2, then not a bit."""
    rows = [trained_rows(sd_run / f"checkpoint-{s}" / "text_encoder_trained_weights.safetensors") for s in (1, 2, 3, 4)]
    assert not torch.equal(rows[0], rows[1])
    assert torch.equal(rows[1], rows[2]) and torch.equal(rows[2], rows[3])
    assert torch.equal(rows[3], load_file(emb_file(sd_run))["clip_l"])
    record = json.loads((sd_run / "run.json").read_text())["pivotal"]
    assert record["trained_steps"] == 2 and record["token_abstraction"] == {"TOK": TOKENS}


def test_diffusers_load_textual_inversion_gives_the_image_of_pipelines_sample(sd_run, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    ours = sampled(tiny_model_dir, sd_run, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(sd_run, weight_name="pytorch_lora_weights.safetensors")
    first = trained_rows(sd_run / "checkpoint-1" / "text_encoder_trained_weights.safetensors")
    pipe.load_textual_inversion(first, token=TOKENS, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    after_one_step = image_of(pipe, "a photo of <s0><s1> dog")

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(sd_run, weight_name="pytorch_lora_weights.safetensors")
    state = load_file(emb_file(sd_run))
    assert set(state) == {"clip_l"}
    pipe.load_textual_inversion(state["clip_l"], token=TOKENS, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    theirs = image_of(pipe, "a photo of <s0><s1> dog")
    assert np.abs(ours - theirs).max() <= 2
    assert np.abs(theirs - after_one_step).max() > 0  # the trained rows, not the first step's, make the image


def test_the_app_loads_two_pivotal_runs_and_gives_the_tokenizer_back(sd_run, tiny_model_dir, tmp_path):
    """The app's Sample tab keeps one pipeline: a request loads its runs' embeddings (a second pivotal run's tokens
    renamed, each abstraction its own) and takes them out again, so the next request starts from the base."""
    from app_backend.safety import AppInputError
    from app_backend.sampling import adapters_attached
    from pipelines.diffusion.sample import AdapterSpec, load_pipeline

    style = tmp_path / "style"
    assert train_in_process(tiny_model_dir, style, "--instance_prompt", "a dog in STY style", "--token_abstraction",
                            "STY", *FAST[:2], "--train_text_encoder_ti", "--checkpointing_steps", 100) == 0
    pipe = load_pipeline(str(tiny_model_dir), "cpu")
    tokenizer, embedding = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    for _ in range(2):
        with adapters_attached(pipe, [AdapterSpec(sd_run), AdapterSpec(style)], str(tiny_model_dir)) as (_, applied):
            abstractions = pivotal.merged_abstractions(applied)
            assert abstractions == {"TOK": "<s0><s1>", "STY": "<adapter1.s0><adapter1.s1>"}
            ids = pipe.tokenizer(pivotal.replace_abstractions("TOK STY", abstractions)).input_ids
            assert ids[1:5] == [VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3]
            rows = pipe.text_encoder.get_input_embeddings().weight[VOCAB:]
            assert torch.equal(rows[:2], load_file(emb_file(sd_run))["clip_l"])
            assert torch.equal(rows[2:], load_file(emb_file(style))["clip_l"])
        assert pipe.tokenizer is tokenizer and len(tokenizer) == VOCAB
        assert pipe.text_encoder.get_input_embeddings() is embedding and pipe.text_encoder.config.vocab_size == VOCAB
    with pytest.raises(AppInputError, match="both trained the token abstraction 'TOK'"):
        with adapters_attached(pipe, [AdapterSpec(sd_run), AdapterSpec(sd_run)], str(tiny_model_dir)):
            pass
    assert len(pipe.tokenizer) == VOCAB


def test_kohya_file_bundles_the_embedding_and_comfyui_gets_its_own_file(sd_run):
    rows = load_file(emb_file(sd_run))["clip_l"]
    kohya = load_file(sd_run / "kohya_lora.safetensors")
    assert [k for k in kohya if k.startswith("bundle_emb.")] == ["bundle_emb.TOK.string_to_param.*"]
    assert torch.equal(kohya["bundle_emb.TOK.string_to_param.*"], rows)
    assert any(k.startswith("lora_unet_") for k in kohya)
    with safe_open(str(sd_run / "kohya_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"  # the header survived the rewrite
    separate = load_file(sd_run / "embeddings" / "TOK.safetensors")
    assert set(separate) == {"emb_params"} and torch.equal(separate["emb_params"], rows)
    files = json.loads((sd_run / "run.json").read_text())["pivotal"]["files"]
    assert files == {"diffusers": emb_file(sd_run).name, "a1111": "kohya_lora.safetensors",
                     "comfyui": ["embeddings/TOK.safetensors"]}


def test_comfyui_reads_the_embedding_files(sd_run, sdxl_run):
    """ComfyUI 0.3.75's own `load_embed` (as its CLIP tokenizers call it, per encoder key) reads our rows."""
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import comfy.cli_args; comfy.cli_args.args.cpu = True\n"
        "from comfy.sd1_clip import load_embed\n"
        "out = {}\n"
        "for folder, key, size in json.loads(sys.argv[2]):\n"
        "    out[f'{folder}:{key}'] = load_embed('TOK', folder, size, key).tolist()\n"
        "print(json.dumps(out))\n")
    sd_rows = load_file(emb_file(sd_run))["clip_l"]
    xl = load_file(emb_file(sdxl_run))
    jobs = [(str(sd_run / "embeddings"), "clip_l", sd_rows.shape[1]),
            (str(sdxl_run / "embeddings"), "clip_l", xl["clip_l"].shape[1]),
            (str(sdxl_run / "embeddings"), "clip_g", xl["clip_g"].shape[1])]
    proc = subprocess.run([sys.executable, "-c", script, str(comfyui_root()), json.dumps(jobs)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    read = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {f"{jobs[0][0]}:clip_l": sd_rows, f"{jobs[1][0]}:clip_l": xl["clip_l"],
                f"{jobs[2][0]}:clip_g": xl["clip_g"]}
    for key, rows in expected.items():
        assert torch.equal(torch.tensor(read[key]), rows), key


# --- SDXL with the text encoders' adapters, and the EMA ---------------------------------------------------------
def test_sdxl_two_load_textual_inversion_calls_give_the_image_of_pipelines_sample(sdxl_run, tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ours = sampled(tiny_sdxl_dir, sdxl_run, tmp_path)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(sdxl_run, weight_name="pytorch_lora_weights.safetensors")
    state = load_file(emb_file(sdxl_run))
    assert set(state) == {"clip_l", "clip_g"}
    pipe.load_textual_inversion(state["clip_l"], token=TOKENS, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKENS, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    theirs = image_of(pipe, "a photo of <s0><s1> dog")
    assert np.abs(ours - theirs).max() <= 2
    assert all(getattr(pipe, name).peft_config for name in ("text_encoder", "text_encoder_2"))


def test_sdxl_kohya_bundle_and_ema_of_the_new_rows_only(sdxl_run):
    state = load_file(emb_file(sdxl_run))
    kohya = load_file(sdxl_run / "kohya_lora.safetensors")
    assert sorted(k for k in kohya if k.startswith("bundle_emb.")) == ["bundle_emb.TOK.clip_g", "bundle_emb.TOK.clip_l"]
    assert all(torch.equal(kohya[f"bundle_emb.TOK.{key}"], state[key]) for key in ("clip_l", "clip_g"))
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    separate = load_file(sdxl_run / "embeddings" / "TOK.safetensors")
    assert set(separate) == {"clip_l", "clip_g"} and torch.equal(separate["clip_g"], state["clip_g"])
    # the rows trained beside the encoders' adapters (attaching those freezes the rest of the encoders)
    for encoder in ("text_encoder", "text_encoder_2"):
        rows = [trained_rows(sdxl_run / f"checkpoint-{s}" / f"{encoder}_trained_weights.safetensors") for s in (2, 4)]
        assert not torch.equal(*rows), encoder
    # the EMA averages the adapters and the new rows, never a whole embedding matrix
    shadow = load_file(sdxl_run / "checkpoint-4" / "ema.safetensors")
    averaged_rows = {k.split(".")[0]: v for k, v in shadow.items() if "token_embedding" in k}
    assert all(k.endswith(ROWS) for k in shadow if "token_embedding" in k)
    assert sorted(averaged_rows) == ["text_encoder", "text_encoder_2"]
    averaged = load_file(sdxl_run / "ema" / emb_file(sdxl_run).name)
    assert torch.equal(averaged["clip_l"], averaged_rows["text_encoder"])
    assert not torch.equal(averaged["clip_l"], state["clip_l"])


# --- exact resume ------------------------------------------------------------------------------------------------
def test_resume_is_exact_across_the_pivot(tiny_model_dir, tmp_path):
    """A run that stops after its checkpoint at step 2 and resumes (frac 0.75: the rows train at step 3, then stop)
    writes the uninterrupted run's rows, adapter and EMA bit for bit."""
    flags = ("--train_text_encoder_ti_frac", 0.75, "--checkpointing_steps", 2, "--use_ema")
    train(tiny_model_dir, tmp_path / "whole", *flags)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")  # as if killed after it
    train(tiny_model_dir, resumed, *flags, "--resume_from_checkpoint", "latest")
    for name in ("whole_emb.safetensors", "unet_adapter.safetensors", "ema/whole_emb.safetensors"):
        a = load_file(tmp_path / "whole" / name)
        b = load_file(resumed / name.replace("whole", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
def test_two_processes_train_the_rows_one_process_with_their_batch_trains(tiny_model_dir, tmp_path):
    """DDP all-reduces the rows' gradient like the adapters': two processes at batch 1 write the rows (and adapter)
    of one process at batch 2 (measured: 2e-7 on rows that move by ~8e-2, 7e-6 on the UNet's adapter)."""
    flags = ("--instance_prompt", PROMPT, *FAST, "--max_train_steps", 3, "--train_text_encoder_ti_frac", 1.0,
             "--checkpointing_steps", 100, "--no_kohya_format")
    cmd = [*launch_two(), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd(tiny_model_dir, tmp_path / "two", *flags)[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert train_in_process(tiny_model_dir, tmp_path / "one", *flags, "--train_batch_size", 2) == 0
    two, one = load_file(emb_file(tmp_path / "two"))["clip_l"], load_file(emb_file(tmp_path / "one"))["clip_l"]
    unet = [load_file(tmp_path / run / "unet_adapter.safetensors") for run in ("two", "one")]
    rows_difference = (two - one).abs().max().item()
    unet_difference = max((unet[0][k] - unet[1][k]).abs().max().item() for k in unet[0])
    print(f"rows: {rows_difference:.1e} (largest {two.abs().max().item():.1e}), unet adapter: {unet_difference:.1e}")
    assert rows_difference <= 1e-6 and unet_difference <= 1e-4


# --- bad input ---------------------------------------------------------------------------------------------------
def model_with_added_tokens(tiny_model_dir, tmp_path, tokens):
    """A model folder whose tokenizer already adds `tokens` (only what the flag checks read: no weights)."""
    from transformers import CLIPTokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "model_index.json", folder)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    tokenizer.add_tokens(tokens)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def flags(tmp_path, model, *extra, prompt=PROMPT, ti=True):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(INSTANCE_DIR),
            "--instance_prompt", prompt, "--output_dir", str(tmp_path / "out"),
            *(["--train_text_encoder_ti"] if ti else []), *map(str, extra)]


@pytest.mark.parametrize(("extra", "prompt", "message"), [
    (["--train_text_encoder_ti_frac", 0], PROMPT, "--train_text_encoder_ti_frac must be in (0, 1], got 0.0"),
    (["--train_text_encoder_ti_frac", 1.5], PROMPT, "--train_text_encoder_ti_frac must be in (0, 1], got 1.5"),
    ([], "a photo of sks dog", "--token_abstraction 'TOK' does not occur (as a word) in --instance_prompt"),
    ([], "a photo of TOKEN dog", "--token_abstraction 'TOK' does not occur (as a word) in --instance_prompt"),
    (["--token_abstraction", "TOK,<x>"], PROMPT, "--token_abstraction 'TOK,<x>': '<x>' is not a word"),
    (["--initializer_concept", " "], PROMPT, "--initializer_concept ' ' is no token for tokenizer"),
    (["--num_new_tokens_per_abstraction", 0], PROMPT, "--num_new_tokens_per_abstraction must be > 0"),
])
def test_bad_flags_are_refused_before_loading(tiny_model_dir, tmp_path, extra, prompt, message):
    with pytest.raises(ArgError) as e:
        parse_args(flags(tmp_path, tiny_model_dir, *extra, prompt=prompt))
    assert message in str(e.value)


def test_initializer_concept_needs_pivotal_tuning(tiny_model_dir, tmp_path):
    with pytest.raises(ArgError, match="--initializer_concept given without --train_text_encoder_ti"):
        parse_args(flags(tmp_path, tiny_model_dir, "--initializer_concept", "dog", ti=False))


@pytest.mark.parametrize(("abstraction", "added", "message"), [
    ("mytok", ["mytok"], "--token_abstraction 'mytok' is already a token of tokenizer ('mytok')"),
    ("TOK", ["<s1>"], "--token_abstraction 'TOK': its new token '<s1>' is already a token of tokenizer"),
])
def test_an_abstraction_or_new_token_the_tokenizer_has_is_refused(tiny_model_dir, tmp_path, abstraction, added,
                                                                  message):
    model = model_with_added_tokens(tiny_model_dir, tmp_path, added)
    with pytest.raises(ArgError) as e:
        parse_args(flags(tmp_path, model, "--token_abstraction", abstraction, prompt=f"a photo of {abstraction} dog"))
    assert message in str(e.value)


def test_concept_sets_the_token_count_and_captions_must_hold_the_abstraction(tiny_model_dir, tmp_path):
    args = parse_args(flags(tmp_path, tiny_model_dir, "--initializer_concept", "golden retriever puppy"))
    assert args.num_new_tokens_per_abstraction == 3  # one per token of the concept
    photos = tmp_path / "photos"
    shutil.copytree(INSTANCE_DIR, photos)
    for photo in sorted(photos.iterdir()):
        photo.with_suffix(".txt").write_text("a dog on grass")  # captions replace the instance prompt
    from pipelines.diffusion.data import read_examples

    examples = read_examples(photos, "--instance_data_dir", args.instance_prompt, 64, is_class=False)
    with pytest.raises(ArgError, match="--token_abstraction 'TOK' occurs in no prompt of the photos"):
        pivotal.rewrite_prompts(args, examples, str(photos))
