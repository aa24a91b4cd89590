"""DreamBooth adapter training: `accelerate launch dreamlora/train.py --help`.

Reads top to bottom: flags → data → models → adapters → optimizer from the core's groups → the one loop
(`pipelines.trainer.loop`) → save. This file is the DreamBooth task: the loss of a batch, validation images
and the output files; the loop calls the core's hooks (param_groups, regularization_loss, on_optimizer_step)
and never asks which method it trains. Everything random in the loop (data order, crops, flips, noise, timesteps) is a
function of (seed, epoch, sample), so a resumed run retraces an uninterrupted one exactly, and one process
with batch 2k trains on the draws of k processes with batch 2.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch dreamlora/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import dreamlora
from dreamlora import AdapterConfig
from dreamlora.atomic import atomic_write_json
from dreamlora.errors import ArgError
from dreamlora.train_args import method_options, parse_args, resolve_init
from pipelines.diffusion import buckets, sdxl
from pipelines.diffusion import data as dbdata
from pipelines.diffusion.captions import CaptionAugment
from pipelines.diffusion.class_images import ensure_class_images
from pipelines.diffusion.encoders import LatentEncoder, PromptEncoder
from pipelines.diffusion.export import write_tool_files
from pipelines.diffusion.loss import denoising_loss, prediction_type
from pipelines.diffusion.models import (
    assemble_pipeline,
    base_prediction_type,
    check_model_path,
    is_sdxl_index,
    load_components,
    read_model_index,
    save_pipeline_fp32,
)
from pipelines.diffusion.pivotal import PivotalEmbeddings, rewrite_prompts
from pipelines.diffusion.validation_loss import ValidationLoss, split_held_out
from pipelines.trainer import checkpoints, launch, loop, order, outputs
from pipelines.trainer.ema import AdapterEMA, ema_weights, write_ema_output
from pipelines.trainer.loop import Plan, RunResult, every
from pipelines.trainer.method_options import check_optimizer, resolve_method_options
from pipelines.trainer.optimizers import make_optimizer, text_encoder_lr
from pipelines.trainer.state import steps_per_epoch

log = logging.getLogger("dreamlora.train")


def adapter_config(args, targets: list[str]) -> AdapterConfig:
    init = resolve_init(args.adapter, args.init_lora_weights, "gaussian")
    return AdapterConfig(method=args.adapter, rank=args.rank, alpha=args.alpha, target_modules=targets,
                         dropout=args.lora_dropout, use_rslora=args.use_rslora, init=init, options=method_options(args))


def sample_generators(seed: int, epoch: int, rows: list[tuple[int, int]]) -> list[torch.Generator]:
    """One generator per batch row, from (seed, epoch, stream, dataset index): a sample draws the same noise
    and timestep whatever its batch, process or resume point."""
    return [torch.Generator().manual_seed(order.stable_seed(seed, epoch, stream, index)) for stream, index in rows]


def trains_unread_layers(args) -> bool:
    """SDXL reads its first text encoder's penultimate hidden states: with --train_text_encoder the last layer's
    adapters get no gradient (and stay at their init), which DDP must be told about."""
    if not args.train_text_encoder:
        return False
    try:
        check_model_path(args.pretrained_model_name_or_path)
        return is_sdxl_index(read_model_index(args.pretrained_model_name_or_path, args.revision))
    except (ValueError, OSError):
        return False  # loading the model reports it


def load_frozen_models(args, accelerator):
    """The SD components, frozen, on the device, in the run's dtype (adapters added later stay fp32). SDXL's own VAE
    stays fp32: it overflows in fp16 (a VAE given by --pretrained_vae_model_name_or_path takes the run's dtype)."""
    try:
        sd = load_components(args.pretrained_model_name_or_path, args.revision, args.variant,
                             args.pretrained_vae_model_name_or_path)
    except ValueError as e:
        raise ArgError(str(e)) from None
    try:
        prediction_type(sd.noise_scheduler)
    except ValueError as e:
        raise ArgError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: {e}") from None
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae_dtype = torch.float32 if sd.is_sdxl and not args.pretrained_vae_model_name_or_path else weight_dtype
    for model in (sd.unet, sd.vae, *sd.text_encoders.values()):
        model.requires_grad_(False).to(accelerator.device, vae_dtype if model is sd.vae else weight_dtype)
    return sd, weight_dtype


def class_examples(args, sd, accelerator) -> list:
    """Prior preservation: top up the class images with the base model (main process), then read them."""
    if not args.with_prior_preservation:
        return []
    if accelerator.is_main_process:
        with sdxl.sampling_precision(sd, accelerator.device, sd.unet.dtype):
            ensure_class_images(args.class_data_dir, args.class_prompt, args.num_class_images,
                                lambda: inference_pipeline(args, sd), args.sample_batch_size, args.seed)
    accelerator.wait_for_everyone()
    return dbdata.read_examples(args.class_data_dir, "--class_data_dir", args.class_prompt, args.resolution,
                                is_class=True, use_captions=False)


def attach_adapters(args, sd) -> tuple[dict, list[dict]]:
    """Adapters on the UNet (and the text encoder, both of SDXL's): the only trainable weights. Returns them and the
    core's optimizer groups (each method's own grouping, e.g. LoRA+'s λ for B)."""
    encoders = sd.text_encoders if args.train_text_encoder else {}
    with launch.adapter_input():
        dreamlora.attach(sd.unet, adapter_config(args, args.target_modules))
        for encoder in encoders.values():
            dreamlora.attach(encoder, adapter_config(args, args.text_encoder_target_modules))
    trained = {"unet": sd.unet}
    groups = dreamlora.param_groups(sd.unet, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    for name, encoder in encoders.items():
        trained[name] = encoder
        groups += dreamlora.param_groups(encoder, lr=text_encoder_lr(args), weight_decay=args.adam_weight_decay)
    if args.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()
        for encoder in encoders.values():
            encoder.gradient_checkpointing_enable()
    return trained, groups


def build(args, accelerator, instances: list, resume_from: Path | None,
          held_out: list = (), placements: list | None = None) -> tuple[DreamBoothTask, Plan]:
    """Models, data and adapters for the loop: the frozen SD components, the class images, the seeded data
    order (with `placements`, each instance photo's aspect-ratio bucket: batches of one bucket each), the adapters
    with their run-dependent options (SingLoRA's ramp follows the run's length), and the optimizer and LR schedule
    built from the core's groups."""
    sd, weight_dtype = load_frozen_models(args, accelerator)
    # pivotal tuning's new tokens, before the class images: --class_prompt may hold them
    embeddings = PivotalEmbeddings(args, sd) if args.train_text_encoder_ti else None
    classes = class_examples(args, sd, accelerator)
    captions = CaptionAugment(args.seed, args.caption_dropout_rate, args.shuffle_caption, args.keep_tokens,
                              args.keep_tokens_separator)
    if placements is None:
        dataset = dbdata.DreamBoothDataset(instances, classes, args.resolution, args.center_crop, args.random_flip,
                                           args.seed, captions)
        sampler = order.EpochShuffle(len(dataset), args.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=dbdata.collate)
        batches_per_epoch, epoch_steps = steps_per_epoch(
            len(dataset), args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps)
    else:
        dataset = buckets.BucketDataset(instances, classes, placements, args.resolution, args.center_crop,
                                        args.random_flip, args.seed, captions)
        loader, sampler = buckets.bucketed_loader(dataset, args.train_batch_size, accelerator.num_processes, args.seed)
        batches_per_epoch = sampler.batches_per_process()
        epoch_steps = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * epoch_steps
    resolve_method_options(args, max_steps, resume_from and checkpoints.adapter_file(resume_from, "unet"))
    trained, groups = attach_adapters(args, sd)
    models = dict(trained)  # what the loop trains: the adapters' components, and the encoders of new tokens
    if embeddings is not None:
        embeddings.plan(max_steps)
        models.update(embeddings.encoders)
        groups += embeddings.param_groups(text_encoder_lr(args), args.adam_weight_decay)
    ema = AdapterEMA(models, args.ema_decay) if args.use_ema else None
    optimizer = make_optimizer(args, groups)
    check_optimizer(args, optimizer)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)

    def select_epoch(epoch: int) -> None:
        dataset.select_epoch(epoch)
        sampler.select_epoch(epoch)

    task = DreamBoothTask(args, accelerator, sd, weight_dtype, dataset, trained, ema, max_steps=max_steps,
                          validation=validation_loss(args, held_out, epoch_steps, max_steps, resume_from),
                          embeddings=embeddings)
    return task, Plan(models, optimizer, lr_scheduler, loader, select_epoch, batches_per_epoch, max_steps, ema,
                      step_hooks=[embeddings] if embeddings is not None else [])


class DreamBoothTask:
    """DreamBooth for the one loop (`pipelines.trainer.loop`): the denoising loss with prior preservation,
    validation images, and the adapter, tool and run.json files."""

    tracker_project = "dreamlora"
    checkpoint_at_end = True

    def __init__(self, args, accelerator, sd, weight_dtype, dataset, trained: dict, ema: AdapterEMA | None = None,
                 max_steps: int = 0, validation: ValidationLoss | None = None,
                 embeddings: PivotalEmbeddings | None = None):
        self.args, self.accelerator, self.sd, self.weight_dtype = args, accelerator, sd, weight_dtype
        self.embeddings = embeddings
        self.dataset, self.trained, self.ema = dataset, trained, ema
        self.max_steps, self.validation = max_steps, validation
        # two cadences, preview images and validation loss: the loop calls at their gcd, `evaluate` picks
        cadences = [args.validation_steps] if args.validation_prompt else []
        cadences += [validation.every] if validation else []
        self.evaluates, self.eval_every = bool(cadences), math.gcd(*cadences) if cadences else None

    def start(self, models: dict) -> None:
        self.latents = LatentEncoder(self.sd.vae, self.sd.vae.dtype, self.args.cache_latents)
        if self.args.cache_latents:
            self.latents.fill_cache(self.dataset)
        if self.sd.is_sdxl:
            self.prompts = sdxl.PromptEncoderXL(self.sd, models, self.weight_dtype)
        else:
            self.prompts = PromptEncoder(self.sd.tokenizer, models.get("text_encoder"), self.sd.text_encoder,
                                         cache=not self.args.shuffle_caption)
        if self.validation is not None:
            self.validation.start(self.accelerator, self.sd.noise_scheduler, self.latents.means)

    def loss(self, models: dict, batch, epoch: int, index: int):
        args = self.args
        generators = sample_generators(args.seed, epoch, batch["rows"])
        if self.sd.is_sdxl:  # context, pooled embedding and the views' time ids
            states, added = self.prompts(batch["prompts"], batch["time_ids"])
        else:
            states, added = self.prompts(batch["prompts"]).to(self.weight_dtype), None
        parts = denoising_loss(models["unet"], self.sd.noise_scheduler,
                               self.latents(batch, generators).to(self.weight_dtype), states, batch["is_class"],
                               generators, prior_loss_weight=args.prior_loss_weight, snr_gamma=args.snr_gamma,
                               noise_offset=args.noise_offset, mask=self.latents.masks(batch),
                               added_cond_kwargs=added)
        return parts["loss"], {k: v for k, v in parts.items() if k != "loss"}

    def evaluate(self, models: dict, step: int, train_time_s: float) -> None:
        if self.validation is not None and self.validation.due(step):  # every process: one all-reduce inside
            self.validation.run(self.trained["unet"], self.validation_prompts(), self.trained.values(), step)
        images_due = step == self.max_steps or every(step, self.args.validation_steps)
        if self.args.validation_prompt and images_due and self.accelerator.is_main_process:
            # the other processes go on to the next step and wait for it there
            with ema_weights(self.ema):  # with --use_ema the previews show the averaged weights
                run_validation(self.args, self.sd, self.accelerator, self.trained, self.weight_dtype, step)

    def validation_prompts(self):
        """(prompts, time ids) -> (context, SDXL's added conditioning or None), through the unwrapped encoders."""
        if self.sd.is_sdxl:
            return sdxl.PromptEncoderXL(self.sd, self.trained, self.weight_dtype)
        encoder = PromptEncoder(self.sd.tokenizer, self.trained.get("text_encoder"), self.sd.text_encoder)
        return lambda prompts, time_ids: (encoder(prompts), None)

    def write_outputs(self, result: RunResult) -> None:
        extra = {"validation_loss": self.validation.summary()} if self.validation is not None else {}
        if isinstance(self.dataset, buckets.BucketDataset):
            extra["buckets"] = self.dataset.summary()
        write_outputs(self.args, Path(self.args.output_dir), self.trained, result, self.sd, self.ema, extra,
                      self.embeddings)


def validation_loss(args, held_out: list, epoch_steps: int, max_steps: int, resume_from: Path | None):
    """The validation-loss hook (`pipelines.diffusion.validation_loss`) when photos are held out, else None;
    by default once per epoch, as kohya."""
    if not held_out:
        return None
    return ValidationLoss(held_out, seed=validation_seed(args), every=args.validate_every_n_steps or epoch_steps,
                          max_batches=args.max_validation_steps, batch_size=args.train_batch_size,
                          resolution=args.resolution, snr_gamma=args.snr_gamma, max_steps=max_steps,
                          progress_path=Path(args.output_dir) / args.progress_file, resume_from=resume_from)


def validation_seed(args) -> int:
    return args.seed if args.validation_seed is None else args.validation_seed


def mask_source(args) -> str | None:
    """Where the instance photos' loss masks come from (`pipelines.diffusion.data.MASK_SOURCES`)."""
    return "alpha" if args.alpha_mask else "masklabel" if args.masked_loss else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_requested = launch.install_stop_signal()  # first: a Stop during loading still ends cleanly
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # data first: bad input fails before anything is written
    bucketing = args.enable_bucket or args.use_aspect_ratio_buckets  # then buckets.plan warns of enlargements
    instances = dbdata.read_examples(args.instance_data_dir, "--instance_data_dir", args.instance_prompt,
                                     0 if bucketing else args.resolution, is_class=False,
                                     mask_source=mask_source(args))
    rewrite_prompts(args, instances, args.instance_data_dir)  # pivotal tuning: TOK -> <s0><s1> (captions too)
    instances, held_out = split_held_out(instances, args.validation_split, validation_seed(args),
                                         args.instance_data_dir)
    instances, placements = buckets.plan(args, instances)
    accelerator = launch.make_accelerator(args, find_unused_parameters=trains_unread_layers(args))
    from accelerate.utils import set_seed

    set_seed(args.seed)
    resume_from = checkpoints.resolve_resume(Path(args.output_dir), args.resume_from_checkpoint)
    task, plan = build(args, accelerator, instances, resume_from, held_out, placements)
    return loop.train(task, plan, args, accelerator, stop_requested, resume_from)


def inference_pipeline(args, sd, trained: dict | None = None):
    """A sampling pipeline (SD or SDXL, as the folder) around the components already loaded on the device (class
    images, validation, --save_merged), `trained` replacing the base components by name: only the model's
    inference scheduler is read from disk, so no second copy of the weights is made."""
    import diffusers

    path = args.pretrained_model_name_or_path
    _, name = diffusers.StableDiffusionPipeline.load_config(path, revision=args.revision)["scheduler"]
    scheduler = getattr(diffusers, name).from_pretrained(path, subfolder="scheduler", revision=args.revision)
    pipe = assemble_pipeline(sd, scheduler, trained)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_validation(args, sd, accelerator, trained, dtype, step: int) -> None:
    pipe = inference_pipeline(args, sd, trained)
    for model in trained.values():
        model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    with sdxl.sampling_precision(sd, accelerator.device, dtype):
        images = pipe([args.validation_prompt] * args.num_validation_images, generator=generator,
                      num_inference_steps=args.validation_inference_steps, height=args.resolution,
                      width=args.resolution).images
    for model in trained.values():
        model.train()
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(folder / f"step-{step:06d}-{k}.png")
    if args.report_to == "tensorboard":
        import numpy as np

        writer = accelerator.get_tracker("tensorboard").writer
        writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


def write_outputs(args, output_dir: Path, trained: dict, result: RunResult, sd=None, ema=None,
                  extra: dict | None = None, embeddings: PivotalEmbeddings | None = None) -> None:
    """The adapter files, the files for other tools, run.json (plus `extra`'s entries), with --use_ema the same files
    of the averaged weights under ema/, and with --save_merged (last: it folds the adapters into the loaded weights)
    the merged pipeline under merged/ (`sd`: the loaded components). `embeddings`: pivotal tuning's new tokens,
    written beside the adapters (`PivotalEmbeddings.write`) and folded into merged/'s text encoders."""
    unet, text_encoder = trained["unet"], trained.get("text_encoder")
    for component, model in trained.items():
        dreamlora.save(model, checkpoints.adapter_file(output_dir, component))
    outputs.prepare_exports(args, trained)
    tool_files = write_tool_files(output_dir, unet, text_encoder, kohya=not args.no_kohya_format,
                                  text_encoder_2=trained.get("text_encoder_2"),
                                  prediction_type=base_prediction_type(args.pretrained_model_name_or_path,
                                                                       args.revision))
    config = dataclasses.asdict(dreamlora.adapter_config(unet, "default"))
    run = {
        "args": vars(args), "method": args.adapter, "adapter_config": config,
        "trainable_params": sum(dreamlora.trainable_parameter_count(m) for m in trained.values())
        + (embeddings.parameter_count() if embeddings is not None else 0),
        "steps": result.steps, "finished": result.finished, "wall_time_s": result.wall_time_s,
        "final_loss": result.final_loss, "files_for_tools": tool_files, **result.environment,
        **outputs.method_figures(args, output_dir, trained), **(extra or {}),
    }
    if embeddings is not None:
        kohya_file = output_dir / tool_files["kohya"] if tool_files["kohya"] else None
        run["pivotal"] = embeddings.record(embeddings.write(output_dir, not args.no_kohya_format, kohya_file))
    if ema is not None:  # ema/ gets this writer's files (not merged/), of the averaged weights
        run["ema"] = write_ema_output(ema, output_dir, lambda folder: write_outputs(args, folder, trained, result,
                                                                                   embeddings=embeddings))
    if args.save_merged and sd is not None:
        if embeddings is not None:
            embeddings.bake()
        pipe = lambda: inference_pipeline(args, sd, trained)  # noqa: E731
        run["merged"] = str(outputs.save_merged(output_dir, trained, lambda folder: save_pipeline_fp32(pipe(), folder)))
    atomic_write_json(output_dir / "run.json", run)


def cli(argv: list[str] | None = None) -> int:
    return launch.run_cli(main, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
