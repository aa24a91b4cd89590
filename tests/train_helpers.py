"""Running `dreamlora/train.py` from tests as a user would: a subprocess, on the tiny model and real photos."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
INSTANCE_DIR = Path(__file__).resolve().parent / "assets" / "dog"
PROMPT = "a photo of sks dog"
TRAIN = [sys.executable, str(ROOT / "dreamlora" / "train.py")]


def launch_two() -> list[str]:
    """`accelerate launch` of two CPU processes over gloo, on a free port of their own: test files run side by side
    (`make test` runs two workers), and two launches on accelerate's default port would meet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(port)]


def train_cmd(model_dir, output_dir, *extra, instance_dir=INSTANCE_DIR) -> list[str]:
    return [*TRAIN, "--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", PROMPT, "--output_dir", str(output_dir), "--resolution", "64",
            "--report_to", "none", "--center_crop", *map(str, extra)]


def run_train(model_dir, output_dir, *extra, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(train_cmd(model_dir, output_dir, *extra, **kw), capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def reset_accelerate() -> None:
    """Each run builds its own Accelerator; accelerate keeps process-wide state between them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_in_process(model_dir, output_dir, *extra, **kw) -> int:
    """`train.py`'s exit code, run in this process (`dreamlora.train.cli`): the same flags and files as
    `run_train` without a new interpreter's imports (seconds per run), for short runs and bad-input checks."""
    from dreamlora import train

    reset_accelerate()
    try:
        return train.cli(train_cmd(model_dir, output_dir, *extra, **kw)[2:])
    finally:
        reset_accelerate()


def instance_latents(pipe, resolution: int = 64, folder=INSTANCE_DIR) -> torch.Tensor:
    """VAE means of the photos in `folder` (the instance photos), center-cropped as training sees them."""
    from pipelines.diffusion.data import center_crops, read_examples

    pixels = center_crops(read_examples(folder, "--instance_data_dir", PROMPT, resolution, is_class=False),
                          resolution)
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


def prompt_states(pipe, prompt: str, n: int) -> torch.Tensor:
    from pipelines.diffusion.models import encode_prompts

    with torch.no_grad():
        return encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt] * n)


def kill_after_checkpoint(cmd: list[str], output_dir: Path, step: int, env: dict | None = None) -> None:
    """Start the train.py command `cmd` (writing to `output_dir`) and SIGKILL it as soon as its progress file reports
    the checkpoint of `step`: the crash an exact resume must recover from. Fails if that checkpoint never came."""
    import signal
    import time

    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress, mark = Path(output_dir) / "progress.jsonl", f'"event": "checkpoint", "step": {step}'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and mark in progress.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (Path(output_dir) / f"checkpoint-{step}").is_dir(), f"the run never wrote checkpoint-{step}"


# AdaLoRA's update starts at third order (E = 0): a short run needs a larger lr to change the image (test_train.py)
STRONG_LR = {"adalora": 5e-2}


def trained_on_first_use(model_dir, tmp_path_factory, label: str):
    """get(method, train_text_encoder) -> the folder of a short, strong run on `model_dir`, trained the first time a
    test asks for it (the architecture tests' module fixtures: each pair trains once, and only if some test runs)."""
    runs = {}

    def get(method: str, text_encoder: bool) -> Path:
        if (method, text_encoder) not in runs:
            out = tmp_path_factory.mktemp(f"{label}-{method}-{'te' if text_encoder else 'unet'}")
            lr = STRONG_LR.get(method, 5e-3)
            assert train_in_process(model_dir, out, "--adapter", method, "--rank", 4, "--max_train_steps", 6,
                                    "--learning_rate", lr, "--text_encoder_lr", lr, "--singlora_ramp_steps", 2,
                                    "--relora_steps", 3, "--checkpointing_steps", 100,
                                    *(["--train_text_encoder"] if text_encoder else [])) == 0
            runs[method, text_encoder] = out
        return runs[method, text_encoder]

    return get


def image_of(pipe):
    """The pipeline's 64-px image of PROMPT at seed 0, 4 steps, `pipelines.sample`'s guidance 7.5 (SDXL's own default
    is 5), as int16 levels 0..255 (differences then count levels)."""
    import numpy as np

    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=4, height=64, width=64, output_type="np", guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0)).images[0]
    return np.round(out * 255).astype(np.int16)
