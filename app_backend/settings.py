"""What the Train tab asks for, checked and turned into `dreamlora/train.py` flags; and the base model."""

from __future__ import annotations

import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from app_backend.safety import AppInputError, check_run_name, number
from dreamlora.methods import METHODS
from dreamlora.options import option_specs, parse_option

SUBJECT = "subject"  # the photos' folder under data/: also the reference folder name for scoring
TOKEN = re.compile(r"[A-Za-z0-9]{1,24}")
CLASS_NOUN = re.compile(r"[A-Za-z][A-Za-z0-9 _-]{0,39}")
_TINY_LOCK = threading.Lock()  # two first requests must not both build the tiny model
# The embedded tiny models the base-model picker offers by name -> (their `python -m dreamlora.tiny` preset, the folder
# under RUNS/_models they are built into on first use). Random weights: they try every path in seconds.
TINY_MODELS = {"tiny": ("tiny", "tiny-sd"), "tiny-sd2": ("sd2", "tiny-sd2"), "tiny-sdxl": ("sdxl", "tiny-sdxl")}
TINY_LABELS = {"tiny": "tiny SD 1.x", "tiny-sd2": "tiny SD 2.x (v-prediction)", "tiny-sdxl": "tiny SDXL"}


@dataclass
class TrainSettings:
    """What the Train tab asks for; `validate` refuses bad values before anything is written."""

    name: str
    base_model: str
    token: str = "sks"
    class_noun: str = "dog"
    instance_prompt: str = ""  # default: "a photo of {token} {class_noun}"
    method: str = "lora"
    rank: int = 4
    steps: int = 400
    learning_rate: float = 1e-4
    prior_preservation: bool = False
    class_prompt: str = ""  # default: "a photo of {class_noun}"
    num_class_images: int = 50
    train_text_encoder: bool = False
    resolution: int = 512
    validation_prompt: str = ""  # empty: no validation images
    validation_steps: int = 100
    checkpointing_steps: int = 100
    seed: int = 0
    method_options: dict = field(default_factory=dict)  # flag name -> value as typed ('' = the method's default)

    def validate(self) -> TrainSettings:
        self.name = check_run_name(self.name)
        self.base_model = (self.base_model or "").strip() or "tiny"
        if not TOKEN.fullmatch(self.token or ""):
            raise AppInputError(f"Identifier {self.token!r}: 1-24 letters or digits, e.g. sks.")
        if not CLASS_NOUN.fullmatch(self.class_noun or ""):
            raise AppInputError(f"Class {self.class_noun!r}: a plain noun such as dog or backpack.")
        self.instance_prompt = (self.instance_prompt or "").strip() or f"a photo of {self.token} {self.class_noun}"
        self.class_prompt = (self.class_prompt or "").strip() or f"a photo of {self.class_noun}"
        if self.method not in METHODS:
            raise AppInputError(f"Method {self.method!r}: one of {', '.join(METHODS)}.")
        limits = {"rank": (1, 256), "steps": (1, 100_000), "num_class_images": (1, 1000), "resolution": (64, 2048),
                  "validation_steps": (1, 100_000), "checkpointing_steps": (1, 100_000), "seed": (0, 2**32 - 1)}
        for key, (low, high) in limits.items():
            setattr(self, key, number(getattr(self, key), key.replace("_", " ").capitalize(), low, high))
        if self.resolution % 8:
            raise AppInputError(f"Resolution must be a multiple of 8, got {self.resolution}.")
        self.learning_rate = number(self.learning_rate, "Learning rate", 1e-8, 0.1, float)
        self.validation_prompt = (self.validation_prompt or "").strip()
        self.method_options = self.checked_options()
        return self

    def checked_options(self) -> dict:
        """The chosen method's options that were filled in, typed and checked by the method's own dataclass;
        the other methods' fields are ignored (the page hides them)."""
        cls, given = METHODS[self.method], {}
        try:
            for spec in option_specs(cls):
                value = parse_option(spec, (self.method_options or {}).get(spec.flag, ""))
                if value is not None:
                    given[spec.flag] = value
            cls.Options(**{s.field: given[s.flag] for s in option_specs(cls) if s.flag in given})
        except (TypeError, ValueError) as e:
            raise AppInputError(f"Method option {e}") from None
        return given

    def argv(self, run_dir: Path) -> list[str]:
        """The trainer's flags, as a user would type them."""
        args = ["--pretrained_model_name_or_path", self.base_model, "--instance_data_dir", str(run_dir / "data" /
                SUBJECT), "--instance_prompt", self.instance_prompt, "--output_dir", str(run_dir),
                "--adapter", self.method, "--rank", str(self.rank), "--max_train_steps", str(self.steps),
                "--learning_rate", str(self.learning_rate), "--resolution", str(self.resolution), "--center_crop",
                "--checkpointing_steps", str(self.checkpointing_steps), "--checkpoints_total_limit", "2",
                "--seed", str(self.seed), "--report_to", "none"]
        if self.prior_preservation:
            args += ["--with_prior_preservation", "--class_data_dir", str(run_dir / "class_images"),
                     "--class_prompt", self.class_prompt, "--num_class_images", str(self.num_class_images)]
        if self.train_text_encoder:
            args.append("--train_text_encoder")
        for flag, value in self.method_options.items():
            args += [f"--{flag}", str(value)]
        if self.validation_prompt.strip():
            args += ["--validation_prompt", self.validation_prompt.strip(), "--validation_steps",
                     str(self.validation_steps), "--validation_inference_steps", "20", "--num_validation_images", "2"]
        return args


def resolve_base_model(runs_dir: Path, value: str | None) -> str:
    """`tiny` (or empty), `tiny-sd2` and `tiny-sdxl` are the embedded tiny SD 1.x, SD 2.x and SDXL models, each built
    once into RUNS/_models/ (`TINY_MODELS`); anything else is a local diffusers folder or a hub id, passed on as
    given."""
    value = (value or "").strip() or "tiny"
    if value not in TINY_MODELS:
        return value
    preset, name = TINY_MODELS[value]
    folder = Path(runs_dir) / "_models" / name
    with _TINY_LOCK:
        if not (folder / "model_index.json").is_file():
            from pipelines.diffusion import tiny_model as tiny

            shutil.rmtree(folder, ignore_errors=True)
            tiny.write(folder, preset=preset)
    return str(folder)


def native_resolution(base_model: str) -> int:
    """The resolution a base model was trained at: its UNet's sample size × 8 (64 for the tiny models, 512 for
    SD 1.5, 768 for SD 2.1, 1024 for SDXL); 512 when it cannot be read (a hub id not on disk)."""
    if (base_model or "").strip() in ("", *TINY_MODELS):
        return 64
    try:
        config = json.loads((Path(base_model) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    size = config.get("sample_size")
    return int(size) * 8 if isinstance(size, int) else 512
