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
class CaptionArgs:
    title: ClassVar[str] = "captions"

    caption_dropout_rate: float = 0.0
    """probability that an instance image's caption is replaced by the empty prompt at a step, drawn per (seed,
    epoch, image); class images always keep --class_prompt"""
    shuffle_caption: bool = False
    """shuffle the comma-separated tags of each instance caption at every step (kohya's flag)"""
    keep_tokens: int = 0
    """with --shuffle_caption: the first N tags of a caption stay in place"""
    keep_tokens_separator: str = ""
    """with --shuffle_caption: in a caption that contains it (e.g. "|||"), the tags before it stay in place, and those
    after a second one stay at the end; --keep_tokens is not used for that caption"""

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout_rate <= 1.0:
            raise ArgError(f"--caption_dropout_rate must be in [0, 1], got {self.caption_dropout_rate}")
        if self.keep_tokens < 0:
            raise ArgError(f"--keep_tokens must be >= 0, got {self.keep_tokens}")
        if (self.keep_tokens or self.keep_tokens_separator) and not self.shuffle_caption:
            raise ArgError("--keep_tokens/--keep_tokens_separator only apply with --shuffle_caption")
        if self.keep_tokens_separator and "," in self.keep_tokens_separator:
            raise ArgError(f"--keep_tokens_separator {self.keep_tokens_separator!r} must not contain the tag "
                           f"separator ','")


OPTIMIZERS = ("AdamW", "prodigy")  # diffusers' advanced scripts' spelling; any case is accepted


@dataclass
class OptimizerArgs:
    title: ClassVar[str] = "optimizer"

    optimizer: str = "AdamW"
    """AdamW or prodigy, any case (prodigy: pip install prodigyopt; its --learning_rate is a multiplier of the step
    size it estimates, usually 1.0, and the text encoder takes --learning_rate too)"""
    prodigy_beta3: float | None = None
    """Prodigy's beta3, the running-average coefficient of its step-size estimate (default: sqrt(--adam_beta2))"""
    prodigy_decouple: bool = True
    """Prodigy: AdamW-style decoupled weight decay"""
    prodigy_use_bias_correction: bool = True
    """Prodigy: Adam's bias correction"""
    prodigy_safeguard_warmup: bool = True
    """Prodigy: leave the lr out of the step-size estimate's denominator (safer with --lr_warmup_steps)"""

    def __post_init__(self):
        canonical = {name.lower(): name for name in OPTIMIZERS}
        if str(self.optimizer).lower() not in canonical:
            raise ArgError(f"--optimizer must be one of {list(OPTIMIZERS)} (any case), got {self.optimizer!r}")
        self.optimizer = canonical[str(self.optimizer).lower()]
        if self.prodigy_beta3 is not None and not 0.0 <= self.prodigy_beta3 < 1.0:
            raise ArgError(f"--prodigy_beta3 must be in [0, 1), got {self.prodigy_beta3}")


@dataclass
class EMAArgs:
    title: ClassVar[str] = "EMA"

    use_ema: bool = False
    """also keep an exponential moving average of the trained weights (fp32), written as its own output under ema/,
    used for the validation images, kept in every checkpoint; refused for methods whose weights cannot be averaged
    (relora, adalora)"""
    ema_decay: float = 0.999
    """the average's largest decay: update k decays by min(ema_decay, (1+s)/(10+s)), s = k-1 (diffusers' EMAModel
    schedule), so a run of a few hundred steps averages steps of mean age a tenth of the run whatever the value"""

    def __post_init__(self):
        if not 0.0 < self.ema_decay < 1.0:
            raise ArgError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")


@dataclass
class MaskedLossArgs:
    title: ClassVar[str] = "masked loss"

    masked_loss: bool = False
    """weight the loss per pixel by a mask beside each instance photo, <name>-masklabel.png (OneTrainer's naming:
    white trains, black is ignored, grey weighs in between; the photo's size); a photo without one counts fully"""
    alpha_mask: bool = False
    """take each instance photo's mask from its alpha channel instead (kohya's flag; implies --masked_loss); a photo
    without an alpha channel counts fully, with a warning"""


@dataclass
class ValidationLossArgs:
    title: ClassVar[str] = "validation loss"

    validation_split: float = 0.0
    """fraction of the instance photos held out of training to measure the denoising loss on, on (image, timestep,
    noise) triples fixed for the run (at least one photo when > 0; logged as val/loss)"""
    validate_every_n_steps: int | None = None
    """compute the validation loss every N optimizer steps and at the last (default: once per epoch)"""
    max_validation_steps: int | None = None
    """at most N batches of --train_batch_size triples per validation (default: all)"""
    validation_seed: int | None = None
    """seed of the held-out photos and of the validation timesteps and noise (default: --seed)"""

    def __post_init__(self):
        if not 0 <= self.validation_split < 1:
            raise ArgError(f"--validation_split must be in [0, 1), got {self.validation_split}")
        require_positive(self, "validate_every_n_steps", "max_validation_steps")
        if not self.validation_split:
            given = [f"--{name}" for name in ("validate_every_n_steps", "max_validation_steps", "validation_seed")
                     if getattr(self, name) is not None]
            if given:
                raise ArgError(f"{', '.join(given)} given without --validation_split (no photo is held out)")


@dataclass
class PivotalArgs:
    title: ClassVar[str] = "pivotal tuning"

    train_text_encoder_ti: bool = False
    """pivotal tuning: train new tokens' embeddings (textual inversion) with the adapter; --token_abstraction in the
    prompts and captions becomes the new tokens (SDXL: in both text encoders); written as <output_dir>_emb.safetensors
    (diffusers' load_textual_inversion), bundled in the kohya file (A1111) and as embeddings/<abstraction>.safetensors
    (ComfyUI)"""
    train_text_encoder_ti_frac: float = 0.5
    """train the embeddings during this fraction of the optimizer steps (the first ceil(frac*steps)), then freeze
    them"""
    token_abstraction: str = "TOK"
    """the word that stands for the new tokens in --instance_prompt, captions and --validation_prompt (several:
    comma-separated); each becomes --num_new_tokens_per_abstraction tokens <s0><s1>..."""
    num_new_tokens_per_abstraction: int | None = None
    """new tokens per abstraction (default 2; with --initializer_concept: as many as the concept has tokens)"""
    initializer_concept: str | None = None
    """start the new tokens from this word's or phrase's embeddings (token j from its token j mod their count)
    instead of random ones with the vocabulary's std"""

    def __post_init__(self):
        if not 0.0 < self.train_text_encoder_ti_frac <= 1.0:
            raise ArgError(f"--train_text_encoder_ti_frac must be in (0, 1], got {self.train_text_encoder_ti_frac}")
        require_positive(self, "num_new_tokens_per_abstraction")
        if self.initializer_concept is not None and not self.train_text_encoder_ti:
            raise ArgError("--initializer_concept given without --train_text_encoder_ti")


@dataclass
class BucketArgs:
    title: ClassVar[str] = "aspect-ratio buckets"

    enable_bucket: bool = False
    """kohya's aspect-ratio buckets: each photo trains at the bucket nearest its aspect ratio (sides multiples of
    --bucket_reso_steps, area at most --resolution squared) instead of a square crop; every batch is one bucket"""
    min_bucket_reso: int | None = None
    """with --enable_bucket: the shortest bucket side (default 256, kohya's); at most --resolution"""
    max_bucket_reso: int | None = None
    """with --enable_bucket: the longest bucket side (default 1024, kohya's); at least --resolution"""
    bucket_reso_steps: int | None = None
    """bucket sides are multiples of this (default 64, kohya's); a multiple of the model's factor: 64 for SD 1.x/2.x,
    32 for SDXL"""
    bucket_no_upscale: bool = False
    """with --enable_bucket: never enlarge a photo; its bucket is its own size (shrunk to --resolution squared if
    larger) rounded down to --bucket_reso_steps; photos whose bucket falls under --min_bucket_reso are left out"""
    use_aspect_ratio_buckets: bool = False
    """diffusers' aspect-ratio buckets: with --aspect_ratio_buckets those; alone, per photo the nearest of diffusers'
    eleven aspect ratios at about min(--resolution, the photo's own size) squared pixels"""
    aspect_ratio_buckets: str | None = None
    """with --use_aspect_ratio_buckets: the buckets, 'height,width;height,width;...' (diffusers' form); each photo
    takes the nearest in aspect ratio, resized to cover it and cropped"""

    def __post_init__(self):
        require_positive(self, "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")
        kohya = [f"--{name}" for name in ("min_bucket_reso", "max_bucket_reso", "bucket_no_upscale")
                 if getattr(self, name)]
        if kohya and not self.enable_bucket:
            raise ArgError(f"{', '.join(kohya)} given without --enable_bucket")
        if self.enable_bucket and self.use_aspect_ratio_buckets:
            raise ArgError("--enable_bucket (kohya's buckets) and --use_aspect_ratio_buckets (diffusers') are two ways "
                           "to the same thing: give one")
        if self.aspect_ratio_buckets is not None:
            if not self.use_aspect_ratio_buckets:
                raise ArgError("--aspect_ratio_buckets needs --use_aspect_ratio_buckets (as in diffusers' scripts)")
            if self.bucket_reso_steps is not None:
                raise ArgError("--bucket_reso_steps has no effect with an explicit --aspect_ratio_buckets list")
            from pipelines.diffusion.buckets import parse_bucket_list

            try:
                parse_bucket_list(self.aspect_ratio_buckets)
            except ValueError as e:
                raise ArgError(str(e)) from None
        elif self.bucket_reso_steps is not None and not (self.enable_bucket or self.use_aspect_ratio_buckets):
            raise ArgError("--bucket_reso_steps given without --enable_bucket or --use_aspect_ratio_buckets")
        self.min_bucket_reso = self.min_bucket_reso or 256
        self.max_bucket_reso = self.max_bucket_reso or 1024
        self.bucket_reso_steps = self.bucket_reso_steps or 64
        if self.bucket_reso_steps % 8:
            raise ArgError(f"--bucket_reso_steps must be a multiple of 8 (the VAE's factor), got "
                           f"{self.bucket_reso_steps}")
        if self.enable_bucket:
            if self.min_bucket_reso > self.max_bucket_reso:
                raise ArgError(f"--min_bucket_reso {self.min_bucket_reso} is above --max_bucket_reso "
                               f"{self.max_bucket_reso}")
            for name in ("min_bucket_reso", "max_bucket_reso"):
                if getattr(self, name) % self.bucket_reso_steps:
                    raise ArgError(f"--{name} {getattr(self, name)} must be a multiple of --bucket_reso_steps "
                                   f"{self.bucket_reso_steps}")


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
          ValidationArgs, EMAArgs, LogArgs, KohyaOutputArgs, CaptionArgs, OptimizerArgs, MaskedLossArgs,
          ValidationLossArgs, PivotalArgs, BucketArgs)


def build_parser() -> argparse.ArgumentParser:
    return make_parser("accelerate launch dreamlora/train.py", "Train a DreamBooth adapter (LoRA, LoRA+, "
                             "DoRA, SingLoRA, ...) on a few photos.", GROUPS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse(build_parser(), GROUPS, argv, validate)


def validate(args: argparse.Namespace) -> None:
    """What spans groups; each group checked its own flags."""
    if args.cache_latents and not args.center_crop:
        raise ArgError("--cache_latents fixes each image's crop: add --center_crop (random crops cannot be cached)")
    check_optimizer_flags(args)
    if args.train_text_encoder_ti:  # reads the model's tokenizers (no weights): conflicts fail before loading
        from pipelines.diffusion.pivotal import resolve_flags

        resolve_flags(args)
    if args.enable_bucket and not args.min_bucket_reso <= args.resolution <= args.max_bucket_reso:
        raise ArgError(f"--enable_bucket: --resolution {args.resolution} must lie between --min_bucket_reso "
                       f"{args.min_bucket_reso} and --max_bucket_reso {args.max_bucket_reso} (as kohya's)")
    if args.use_ema:
        from dreamlora.methods import METHODS
        from pipelines.trainer.ema import refusal

        if refusal(METHODS[args.adapter]):
            raise ArgError(refusal(METHODS[args.adapter]))
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


def check_optimizer_flags(args: argparse.Namespace) -> None:
    """Prodigy: installed, not combined with --use_8bit_adam; warnings where diffusers' scripts warn."""
    if args.optimizer != "prodigy":
        return
    import importlib.util

    if args.use_8bit_adam:
        raise ArgError("--use_8bit_adam is bitsandbytes' 8-bit AdamW: it does not apply to --optimizer prodigy")
    if importlib.util.find_spec("prodigyopt") is None:
        raise ArgError("--optimizer prodigy needs prodigyopt: pip install prodigyopt (or pip install "
                       "'dreamlora[prodigy]')")
    if not 0.1 < args.learning_rate < 10.0:
        print(f"warning: --learning_rate {args.learning_rate} with --optimizer prodigy: Prodigy estimates the step "
              f"size itself and --learning_rate multiplies it; 1.0 is the usual value", file=sys.stderr)
    if args.train_text_encoder:
        print(f"warning: --optimizer prodigy trains the text encoder at --learning_rate ({args.learning_rate}) too, "
              f"as diffusers' scripts do; --text_encoder_lr ({args.text_encoder_lr}) is not used", file=sys.stderr)
