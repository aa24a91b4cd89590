"""Command-line flags of `dreamlora/train.py`, named as in diffusers' train_dreambooth_lora.py wherever the
concept is the same, plus `--config FILE` (YAML or JSON with the same keys; the command line wins).

The flags are typed dataclasses, one per group, a docstring under each field as its --help text and checks in
`__post_init__` (`dreamlora/flags.py` makes the parser). The groups both trainers share (adapter, checkpoints,
logs, output) are declared here once. Every check that can be made before loading a model is made here, so bad
input fails in a second with one line naming the flag.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dreamlora.config import SD_ATTENTION
from dreamlora.flags import ArgError, make_parser, parse, require_given, require_positive
from dreamlora.options import add_option_flags, comma_list, given_options

__all__ = ["SCHEDULERS", "ArgError", "build_parser", "method_options", "parse_args", "resolve_init", "validate"]

Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
SCHEDULERS = typing.get_args(Scheduler)
Precision = Literal["no", "fp16", "bf16"]


def method_choices() -> dict[str, str]:
    """The registered methods with their one-line descriptions (read when a parser is built: the registry
    imports torch and finds plugins)."""
    from dreamlora.methods import METHODS

    return {name: cls.description for name, cls in METHODS.items()}


def init_choices() -> list[str]:
    from dreamlora.methods import METHODS

    return sorted({name for cls in METHODS.values() for name in cls.inits})  # each method checks its own


# --- groups both trainers share ----------------------------------------------------------------------------
@dataclass
class AdapterArgs:
    title: ClassVar[str] = "adapter"

    adapter: str = field(default="lora", metadata={"choices": method_choices})
    """the adapter method"""
    rank: int = 4
    """rank r of the adapter factors"""
    alpha: float | None = None
    """scale numerator: the update is scaled by alpha/r (alpha/sqrt(r) with --use_rslora); default: --rank"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input"""
    use_rslora: bool = False
    """scale by alpha/sqrt(r) (rank-stabilised LoRA) instead of alpha/r"""
    init_lora_weights: str | None = field(default=None, metadata={"choices": init_choices})
    """init of the adapter factors; default: gaussian for the LoRA family, as diffusers' DreamBooth script; the
    method's own otherwise (SingLoRA: scaled)"""

    def __post_init__(self):
        require_positive(self, "rank")

    @classmethod
    def more_flags(cls, group) -> None:
        """Each method's options (`--loraplus_ratio`, ...), from the methods' own dataclasses."""
        from dreamlora.methods import METHODS

        add_option_flags(group, METHODS.values())


@dataclass
class CheckpointArgs:
    title: ClassVar[str] = "checkpoints"

    checkpointing_steps: int | None = 500
    """save a resumable checkpoint every N optimizer steps"""
    checkpoints_total_limit: int | None = None
    """keep only the newest N checkpoints"""
    resume_from_checkpoint: str | None = None
    """a checkpoint folder, or "latest\""""

    def __post_init__(self):
        require_positive(self, "checkpointing_steps", "checkpoints_total_limit")


@dataclass
class LogArgs:
    title: ClassVar[str] = "logs"

    report_to: Literal["tensorboard", "none"] | None = "tensorboard"
    """where the losses and learning rates are logged"""
    logging_dir: str = "logs"
    """relative to --output_dir"""
    progress_file: str = "progress.jsonl"
    """JSON lines of step/loss/lr/eta, relative to --output_dir (what a live view, such as the app, follows)"""

    def __post_init__(self):
        if self.report_to == "none":
            self.report_to = None


@dataclass
class OutputArgs:
    title: ClassVar[str] = "output"

    output_dir: str | None = None
    """folder of the adapter files, checkpoints, logs and run.json (required)"""
    export_rank: str | None = None
    """rank of the plain-LoRA files for other tools: exact, auto (the truncated SVD keeping 99% of the update's
    energy, at most 4x --rank) or a number; default: the method's own (exact; auto for relora, whose update has a
    rank above --rank). The relative error is in run.json"""
    save_merged: bool = False
    """also write the base model with the adapter merged in, in its library's format, under merged/"""

    def __post_init__(self):
        require_given(self, "output_dir")
        if self.export_rank is not None:
            from dreamlora.compress import parse_export_rank

            try:
                self.export_rank = parse_export_rank(self.export_rank)
            except ValueError as e:
                raise ArgError(str(e)) from None


# --- train.py's own groups ---------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    title: ClassVar[str] = "model"

    pretrained_model_name_or_path: str | None = None
    """diffusers SD 1.x/2.x or SDXL folder or hub id (required)"""
    revision: str | None = None
    """hub revision (branch, tag or commit) of the model"""
    variant: str | None = None
    """weights variant, e.g. fp16"""
    pretrained_vae_model_name_or_path: str | None = None
    """a VAE to use instead of the model's (a diffusers AutoencoderKL folder or hub id), e.g. an fp16-safe SDXL VAE
    (madebyollin/sdxl-vae-fp16-fix): it runs in the --mixed_precision dtype, where SDXL's own VAE is kept fp32"""

    def __post_init__(self):
        require_given(self, "pretrained_model_name_or_path")
        if self.pretrained_vae_model_name_or_path:
            from pipelines.diffusion.models import check_vae_path

            try:
                check_vae_path(self.pretrained_vae_model_name_or_path)
            except ValueError as e:
                raise ArgError(str(e)) from None


@dataclass
class DataArgs:
    title: ClassVar[str] = "data and prompts"

    instance_data_dir: str | None = None
    """folder of subject photos; captions from <image>.txt or metadata.jsonl override --instance_prompt per image
    (required)"""
    instance_prompt: str | None = None
    """e.g. "a photo of sks dog" (required)"""
    with_prior_preservation: bool = False
    """also train on class images (DreamBooth's prior-preservation loss)"""
    class_data_dir: str | None = None
    """class images; missing ones are generated by the base model"""
    class_prompt: str | None = None
    """e.g. "a photo of dog\""""
    num_class_images: int = 100
    """how many class images to use (and generate if missing)"""
    prior_loss_weight: float = 1.0
    """weight of the class-image loss"""
    sample_batch_size: int = 4
    """batch size of class-image generation"""

    def __post_init__(self):
        require_given(self, "instance_data_dir", "instance_prompt")
        require_positive(self, "sample_batch_size")
        if self.with_prior_preservation:
            if not self.class_data_dir or not self.class_prompt:
                raise ArgError("--with_prior_preservation needs --class_data_dir and --class_prompt")
        elif self.class_data_dir or self.class_prompt:
            raise ArgError("--class_data_dir/--class_prompt given without --with_prior_preservation")


@dataclass
class UNetAdapterArgs(AdapterArgs):
    target_modules: list[str] = field(default_factory=lambda: list(SD_ATTENTION))
    """comma-separated UNet module names"""
    train_text_encoder: bool = False
    """also adapt the text encoder"""
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """comma-separated text-encoder module names"""
    text_encoder_lr: float = 5e-6
    """learning rate of the text encoder's adapters"""

    def __post_init__(self):
        super().__post_init__()
        self.target_modules = comma_list(self.target_modules)
        self.text_encoder_target_modules = comma_list(self.text_encoder_target_modules)


@dataclass
class ImageArgs:
    title: ClassVar[str] = "images"

    resolution: int = 512
    """side of the square training images, a multiple of 8"""
    center_crop: bool = False
    """crop the centre of each image (default: a random crop)"""
    random_flip: bool = False
    """flip images left-right at random"""

    def __post_init__(self):
        require_positive(self, "resolution")
        if self.resolution % 8:
            raise ArgError(f"--resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")


@dataclass
class OptimisationArgs:
    title: ClassVar[str] = "optimisation"

    train_batch_size: int = 1
    """images per batch"""
    gradient_accumulation_steps: int = 1
    """batches per optimizer step"""
    max_train_steps: int | None = None
    """optimizer steps; overrides --num_train_epochs"""
    num_train_epochs: int = 1
    """passes over the images (unless --max_train_steps)"""
    learning_rate: float = 1e-4
    """learning rate of the UNet's adapters"""
    lr_scheduler: Scheduler = "constant"
    """learning-rate schedule"""
    lr_warmup_steps: int = 0
    """steps of linear warmup"""
    lr_num_cycles: int = 1
    """restarts of cosine_with_restarts"""
    lr_power: float = 1.0
    """power of the polynomial schedule"""
    snr_gamma: float | None = None
    """min-SNR weighting; 5.0 is the paper's value"""
    noise_offset: float = 0.0
    """noise offset (brighter and darker images)"""
    adam_beta1: float = 0.9
    """AdamW's beta1"""
    adam_beta2: float = 0.999
    """AdamW's beta2"""
    adam_weight_decay: float = 1e-2
    """AdamW's weight decay"""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    seed: int = 0
    """seed of the adapter init, the data order and the noise"""

    def __post_init__(self):
        require_positive(self, "train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                         "max_train_steps", "learning_rate")


@dataclass
class MemoryArgs:
    title: ClassVar[str] = "memory"

    cache_latents: bool = False
    """encode every image once with the VAE"""
    mixed_precision: Precision | None = None
    """frozen weights in this dtype, adapters in fp32 (default: accelerate's config)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, slower)"""
    use_8bit_adam: bool = False
    """needs bitsandbytes"""


@dataclass
class ValidationArgs:
    title: ClassVar[str] = "validation"

    validation_prompt: str | None = None
    """prompt of the preview images drawn during training (default: none)"""
    num_validation_images: int = 2
    """preview images per validation"""
    validation_steps: int = 100
    """draw previews every N steps"""
    validation_inference_steps: int = 25
    """sampling steps of a preview image"""

    def __post_init__(self):
        require_positive(self, "validation_steps", "num_validation_images")


@dataclass
class KohyaOutputArgs(OutputArgs):
    no_kohya_format: bool = False
    """skip kohya_lora.safetensors (kohya, LyCORIS, A1111, ComfyUI) and DoRA's comfyui_lora file"""
    output_kohya_format: bool = False
    """deprecated, no effect: the kohya file is written by default (--no_kohya_format skips it)"""

    def __post_init__(self):
        super().__post_init__()
        if self.output_kohya_format:  # accepted so that old configs still run
            print("warning: --output_kohya_format is deprecated and has no effect: the kohya file is written by "
                  "default", file=sys.stderr)


GROUPS = (ModelArgs, DataArgs, UNetAdapterArgs, ImageArgs, OptimisationArgs, MemoryArgs, CheckpointArgs,
          ValidationArgs, LogArgs, KohyaOutputArgs)


def build_parser() -> argparse.ArgumentParser:
    return make_parser("accelerate launch dreamlora/train.py", "Train a DreamBooth adapter (LoRA, LoRA+, "
                             "DoRA, SingLoRA, ...) on a few photos.", GROUPS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse(build_parser(), GROUPS, argv, validate)


def validate(args: argparse.Namespace) -> None:
    """What spans groups; each group checked its own flags."""
    if args.cache_latents and not args.center_crop:
        raise ArgError("--cache_latents fixes each image's crop: add --center_crop (random crops cannot be cached)")
    method_options(args)


def method_options(args: argparse.Namespace) -> dict:
    """The options of `--adapter`'s method given on the command line, by field name, checked by the method's
    own dataclass so a bad value fails before a model loads."""
    from dreamlora.methods import METHODS

    cls = METHODS[args.adapter]
    given = given_options(cls, vars(args))
    try:
        cls.Options(**given)
    except (TypeError, ValueError) as e:
        raise ArgError(f"--adapter {args.adapter}: {e}") from None
    return given


def resolve_init(method: str, flag: str | None, preferred: str | None = None) -> str | None:
    """The init a trainer passes to `AdapterConfig`: the user's flag if given; else the trainer's preferred
    init where the method takes it (diffusers' `gaussian` in train.py); else None, the method's own default."""
    from dreamlora.methods import METHODS

    if flag is not None:
        return flag
    return preferred if preferred in METHODS[method].inits else None
