"""DreamBooth adapter training: `accelerate launch dreamlora/train.py --help`.

Reads top to bottom: flags → data → models → adapters → optimizer from the core's groups → loop → save.
The loop calls the core's hooks (param_groups, regularization_loss, on_optimizer_step) and never asks
which method it trains. Everything random in the loop (data order, crops, flips, noise, timesteps) is a
function of (seed, epoch, sample), so a resumed run retraces an uninterrupted one exactly, and one process
with batch 2k trains on the draws of k processes with batch 2.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch dreamlora/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import dreamlora
from dreamlora import AdapterConfig
from dreamlora.errors import ArgError
from dreamlora.train_args import method_options, parse_args, resolve_init
from pipelines import training
from pipelines.diffusion import data as dbdata
from pipelines.diffusion.export import write_tool_files
from pipelines.diffusion.loss import denoising_loss, draw_noise, prediction_type
from pipelines.diffusion.models import encode_prompts, load_components
from pipelines.trainer import order

log = logging.getLogger("dreamlora.train")


def adapter_config(args, targets: list[str]) -> AdapterConfig:
    init = resolve_init(args.adapter, args.init_lora_weights, "gaussian")
    return AdapterConfig(method=args.adapter, rank=args.rank, alpha=args.alpha, target_modules=targets,
                         dropout=args.lora_dropout, use_rslora=args.use_rslora, init=init, options=method_options(args))


def make_optimizer(args, param_groups):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ArgError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(param_groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def sample_generators(seed: int, epoch: int, rows: list[tuple[int, int]]) -> list[torch.Generator]:
    """One generator per batch row, from (seed, epoch, stream, dataset index): a sample draws the same noise
    and timestep whatever its batch, process or resume point."""
    return [torch.Generator().manual_seed(order.stable_seed(seed, epoch, stream, index)) for stream, index in rows]


class LatentEncoder:
    """Pixels -> scaled VAE latents; with --cache_latents each (image, flip) is encoded once and its latent
    distribution sampled per step."""

    def __init__(self, vae, dtype, cache: bool):
        self.vae, self.dtype, self.cache, self.stats = vae, dtype, cache, {}

    @torch.no_grad()
    def _dist(self, pixels: torch.Tensor):
        return self.vae.encode(pixels.to(self.vae.device, self.dtype)).latent_dist

    def fill_cache(self, dataset: dbdata.DreamBoothDataset) -> None:
        from tqdm.auto import tqdm

        for key, pixels in tqdm(list(dataset.all_views()), desc="caching latents", unit="img"):
            dist = self._dist(pixels[None])
            self.stats[key] = (dist.mean[0], dist.std[0])

    def __call__(self, batch: dict, generators: list[torch.Generator]) -> torch.Tensor:
        if self.cache:
            mean = torch.stack([self.stats[k][0] for k in batch["keys"]])
            std = torch.stack([self.stats[k][1] for k in batch["keys"]])
        else:
            dist = self._dist(batch["pixel_values"])
            mean, std = dist.mean, dist.std
        return (mean + std * draw_noise(mean.shape, generators).to(mean)) * self.vae.config.scaling_factor


def load_frozen_models(args, accelerator):
    """The SD components, frozen, on the device, in the run's dtype (adapters added later stay fp32)."""
    sd = load_components(args.pretrained_model_name_or_path, args.revision, args.variant)
    try:
        prediction_type(sd.noise_scheduler)
    except ValueError as e:
        raise ArgError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: {e}") from None
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (sd.unet, sd.vae, sd.text_encoder):
        model.requires_grad_(False).to(accelerator.device, weight_dtype)
    return sd, weight_dtype


def class_examples(args, sd, accelerator) -> list:
    """Prior preservation: top up the class images with the base model (main process), then read them."""
    if not args.with_prior_preservation:
        return []
    if accelerator.is_main_process:
        training.ensure_class_images(args.class_data_dir, args.class_prompt, args.num_class_images,
                                     lambda: inference_pipeline(args, sd, sd.unet, sd.text_encoder),
                                     args.sample_batch_size, args.seed)
    accelerator.wait_for_everyone()
    return dbdata.read_examples(args.class_data_dir, "--class_data_dir", args.class_prompt, args.resolution,
                                is_class=True, use_captions=False)


def attach_adapters(args, sd) -> tuple[dict, list[dict]]:
    """Adapters on the UNet (and the text encoder): the only trainable weights. Returns them and the core's
    optimizer groups (each method's own grouping, e.g. LoRA+'s λ for B)."""
    with training.adapter_input():
        dreamlora.attach(sd.unet, adapter_config(args, args.target_modules))
        if args.train_text_encoder:
            dreamlora.attach(sd.text_encoder, adapter_config(args, args.text_encoder_target_modules))
    trained = {"unet": sd.unet}
    groups = dreamlora.param_groups(sd.unet, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    if args.train_text_encoder:
        trained["text_encoder"] = sd.text_encoder
        groups += dreamlora.param_groups(sd.text_encoder, lr=args.text_encoder_lr, weight_decay=args.adam_weight_decay)
    if args.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            sd.text_encoder.gradient_checkpointing_enable()
    return trained, groups


class PromptEncoder:
    """CLIP states for a batch's prompts: through the trained text encoder, or cached per prompt when frozen."""

    def __init__(self, tokenizer, trained_text_encoder, frozen_text_encoder):
        self.tokenizer, self.trained, self.frozen, self.cache = tokenizer, trained_text_encoder, frozen_text_encoder, {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.trained is not None:
            return encode_prompts(self.tokenizer, self.trained, prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                self.cache.update(zip(missing, encode_prompts(self.tokenizer, self.frozen, missing), strict=True))
        return torch.stack([self.cache[p] for p in prompts])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_requested = training.install_stop_signal()  # first: a Stop during loading still ends cleanly
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)

    # --- data first: bad input fails before anything is written -----------------------------------------
    instances = dbdata.read_examples(args.instance_data_dir, "--instance_data_dir", args.instance_prompt,
                                     args.resolution, is_class=False)
    accelerator = training.make_accelerator(args)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    resume_from = training.resolve_resume(output_dir, args.resume_from_checkpoint)

    sd, weight_dtype = load_frozen_models(args, accelerator)
    classes = class_examples(args, sd, accelerator)

    # --- data loader and schedule (its length sets run-dependent method options: SingLoRA's ramp) -----------
    dataset = dbdata.DreamBoothDataset(instances, classes, args.resolution, args.center_crop, args.random_flip,
                                       args.seed)
    sampler = order.EpochShuffle(len(dataset), args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                         collate_fn=dbdata.collate)
    batches_per_epoch, steps_per_epoch = training.steps_per_epoch(
        len(dataset), args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    training.resolve_method_options(args, max_steps, resume_from and training.adapter_file(resume_from, "unet"))
    trained, groups = attach_adapters(args, sd)
    optimizer = make_optimizer(args, groups)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    prepared = accelerator.prepare(*trained.values(), optimizer, loader, lr_scheduler)
    trained_models = dict(zip(trained, prepared[: len(trained)], strict=True))
    optimizer, loader, lr_scheduler = prepared[len(trained):]
    training.register_adapter_hooks(accelerator, trained)
    progress = training.restore_progress(accelerator, resume_from)

    encoder = LatentEncoder(sd.vae, weight_dtype, args.cache_latents)
    if args.cache_latents:
        encoder.fill_cache(dataset)
    prompt_embeddings = PromptEncoder(sd.tokenizer, trained_models.get("text_encoder"), sd.text_encoder)

    # --- the loop ----------------------------------------------------------------------------------------
    if accelerator.is_main_process:
        accelerator.init_trackers("dreamlora", config={k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool))})
    plog = training.ProgressLog(output_dir / args.progress_file if accelerator.is_main_process else None,
                                max_steps, progress.global_step)
    plog.write(event="started", step=progress.global_step, total=max_steps, resumed_from=str(resume_from or ""))
    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=progress.global_step, desc="training", unit="step",
               disable=not accelerator.is_main_process)
    started, last_loss, last_checkpoint = time.time(), float("nan"), resume_from
    params = [p for g in groups for p in g["params"]]
    for model in trained_models.values():
        model.train()
    def select_epoch(epoch: int) -> None:
        dataset.select_epoch(epoch)
        sampler.select_epoch(epoch)

    batches = training.resumable_batches(accelerator, loader, progress, batches_per_epoch, select_epoch)
    while progress.global_step < max_steps:
        epoch, index, batch = next(batches)
        with accelerator.accumulate(*trained_models.values()):
            generators = sample_generators(args.seed, epoch, batch["rows"])
            latents = encoder(batch, generators)
            parts = denoising_loss(trained_models["unet"], sd.noise_scheduler, latents,
                                   prompt_embeddings(batch["prompts"]).to(weight_dtype), batch["is_class"], generators,
                                   prior_loss_weight=args.prior_loss_weight, snr_gamma=args.snr_gamma,
                                   noise_offset=args.noise_offset)
            loss = parts["loss"] + sum(dreamlora.regularization_loss(m) for m in trained.values())
            accelerator.backward(loss)
            training.optimizer_step(accelerator, optimizer, lr_scheduler, params, args.max_grad_norm,
                                    trained.values())
        if not accelerator.sync_gradients:
            continue
        progress.global_step += 1
        last_loss = accelerator.gather(loss.detach()[None]).mean().item()
        if not math.isfinite(last_loss):
            bar.close()  # so the error is the last line the user sees
            raise training.TrainingDiverged(f"loss became {last_loss} at step {progress.global_step}; stopped without "
                                   f"saving. Last good checkpoint: {last_checkpoint or 'none'}")
        lr = lr_scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        accelerator.log({"train/loss": last_loss, "train/lr": lr,
                         **{f"train/{k}": v.item() for k, v in parts.items() if k != "loss"}},
                        step=progress.global_step)
        plog.step(progress.global_step, last_loss, lr)
        step = progress.global_step
        stop = training.stop_everywhere(accelerator, stop_requested)  # read once per step, on all processes
        if step % args.checkpointing_steps == 0 or step == max_steps or stop:
            last_checkpoint = training.save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit,
                                                       progress)
            plog.write(event="checkpoint", step=step, path=str(last_checkpoint))
        if args.validation_prompt and accelerator.is_main_process and (step % args.validation_steps == 0
                                                                       or step == max_steps):
            run_validation(args, sd, accelerator, trained, weight_dtype, step)
        if stop:  # checked after a full optimizer step, which has just been checkpointed
            break
    bar.close()

    # --- save ----------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    finished = progress.global_step >= max_steps
    if accelerator.is_main_process:
        write_outputs(args, output_dir, trained, sd, accelerator, progress, started, last_loss, resume_from,
                      finished)
        plog.write(event="done" if finished else "stopped", step=progress.global_step)
    accelerator.end_training()
    return 0


def inference_pipeline(args, sd, unet, text_encoder):
    """A sampling pipeline around the components already loaded on the device (class images, validation):
    only the model's inference scheduler is read from disk, so no second copy of the weights is made."""
    import diffusers

    path = args.pretrained_model_name_or_path
    _, name = diffusers.StableDiffusionPipeline.load_config(path, revision=args.revision)["scheduler"]
    scheduler = getattr(diffusers, name).from_pretrained(path, subfolder="scheduler", revision=args.revision)
    pipe = diffusers.StableDiffusionPipeline(vae=sd.vae, text_encoder=text_encoder, tokenizer=sd.tokenizer,
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_validation(args, sd, accelerator, trained, dtype, step: int) -> None:
    pipe = inference_pipeline(args, sd, trained["unet"], trained.get("text_encoder", sd.text_encoder))
    for model in trained.values():
        model.eval()
    generator = torch.Generator().manual_seed(args.seed)
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


def write_outputs(args, output_dir: Path, trained, sd, accelerator, progress, started, last_loss, resume_from,
                  finished) -> None:
    unet, text_encoder = trained["unet"], trained.get("text_encoder")
    for component, model in trained.items():
        dreamlora.save(model, training.adapter_file(output_dir, component))
    tool_files = write_tool_files(output_dir, unet, text_encoder, kohya=not args.no_kohya_format)
    config = dataclasses.asdict(dreamlora.adapter_config(unet, "default"))
    training.write_json_atomic(output_dir / "run.json", {
        "args": vars(args), "method": args.adapter, "adapter_config": config,
        "trainable_params": sum(dreamlora.trainable_parameter_count(m) for m in trained.values()),
        "steps": progress.global_step, "finished": finished, "wall_time_s": round(time.time() - started, 2),
        "final_loss": last_loss, "files_for_tools": tool_files, **training.run_environment(accelerator, resume_from),
    })


def cli(argv: list[str] | None = None) -> int:
    return training.run_cli(main, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
