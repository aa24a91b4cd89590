"""GPU check: every registered method trains, moves, offloads and samples on the SD 1.5 architecture, beside PEFT.

    python bench/gpu_check.py          # CUDA: SD 1.5 UNet (random weights), 512 px (64×64 latents), < 5 min, H100
    python bench/gpu_check.py --tiny   # CPU smoke of the same code: tiny UNet config, 64 px (8×8 latents)
    bench/gpu_check.sh                 # on the GPU machine: the carried wheels, then the check (see that file)

One random-weight UNet is built once from its config and every configuration runs on a copy of it, in one process:
- training, per method of `dreamlora.METHODS` and for the reference: {fp16, bf16} × {gradient checkpointing off, on}
  with AdamW, plus bf16 with bitsandbytes' AdamW8bit; it/s and peak memory (CUDA max_memory_allocated above what
  was allocated before the configuration's copy of the UNet, so its own UNet, adapters, activations and optimizer).
  The step is train.py's: frozen base in the half dtype, autocast forward, fp32 loss, GradScaler for fp16, clip to
  1.0, the core's hooks. The reference ("peft-lora") is built as diffusers' train_dreambooth_lora.py builds it:
  `unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=...))`, LoRA weights
  cast to fp32 under fp16 only (`cast_training_params`), same rank, targets, lr, loop;
- moves, per method: attach on the CPU (fp32, adapter perturbed off its identity init), then `.to(device)`: output
  equal to the CPU's (TF32 off); `.to(device, bfloat16)`: adapter dtype kept, output close; accelerate's model
  offload (`cpu_offload_with_hook`, what `enable_model_cpu_offload` uses) and sequential offload (`cpu_offload`);
- sampling: a StableDiffusionPipeline (random SD VAE, prompt embeddings given) with each method's adapter, 4 steps,
  then the same with `enable_model_cpu_offload()` (CUDA only): the same image.

`--arch sdxl` instead trains the SDXL base UNet's architecture (2.57B parameters, random weights) at 1024 px (128²
latents), bf16, gradient checkpointing, rank 16, AdamW: LoRA and DoRA beside the reference built as diffusers'
train_dreambooth_lora_sdxl.py builds it (the same `add_adapter(LoraConfig(...))`; its LoRA weights stay bf16 under
bf16, as that script casts them to fp32 under fp16 only), with SDXL's conditioning (2048-wide context, pooled
embedding and six time ids). No move, offload or sampling checks: those are the architecture-independent SD 1.5 ones.

Writes `<output>.json` and `<output>.md` (default bench/results/gpu_check[_sdxl], or ..._cpu_smoke with --tiny) and
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/gpu_check.py` from a checkout without installing it

import dreamlora  # noqa: E402
from pipelines.diffusion.sd_configs import SDXL_UNET_CONFIG, TINY_SDXL_UNET_CONFIG  # noqa: E402
from pipelines.diffusion.tiny_model import SD15, SD_SCHEDULE, TINY  # noqa: E402

REFERENCE = "peft-lora"
REFERENCE_NOTE = {
    "sd15": " Reference as train_dreambooth_lora.py: its LoRA weights are fp32 under fp16, bf16 under bf16.",
    "sdxl": " Reference as train_dreambooth_lora_sdxl.py: its LoRA weights stay bf16 under bf16 (it casts them to fp32 "
            "under fp16 only); ours are fp32. Conditioning: context, pooled embedding, six time ids.",
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# --- set-up -------------------------------------------------------------------------------------------------------

def build_models(args, device: torch.device) -> dict:
    """The UNet (fp32, seeded) once, its half-precision copies, a CPU fp32 copy, and a random SD VAE. SDXL: the UNet
    and its bf16 copy only (the fp32 one is dropped: 10 GB)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if args.arch == "sdxl":
        unet_cfg, vae_cfg = (TINY_SDXL_UNET_CONFIG if args.tiny else SDXL_UNET_CONFIG), None
    else:
        unet_cfg, vae_cfg, _ = TINY if args.tiny else SD15
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):  # random init on the GPU: seconds, not the CPU's half minute
        unet = UNet2DConditionModel(**unet_cfg).requires_grad_(False)
        vae = AutoencoderKL(**vae_cfg).requires_grad_(False) if vae_cfg else None
    models = {"params": sum(p.numel() for p in unet.parameters()), "cross_dim": unet_cfg["cross_attention_dim"],
              "latent": args.resolution // 8, "added": added_dims(unet_cfg)}
    if args.arch == "sdxl":
        models["bf16"] = unet.to(torch.bfloat16)
    else:
        models.update({"fp32": unet, "cpu_fp32": copy.deepcopy(unet).to("cpu"), "vae": vae,
                       **{name: copy.deepcopy(unet).to(dtype) for name, dtype in DTYPES.items()}})
    models["build_s"] = time.perf_counter() - start
    return models


def added_dims(unet_cfg: dict) -> tuple[int, int] | None:
    """(pooled width, time-id width) of SDXL's micro-conditioning: the added embedding takes the pooled text embedding
    and six sinusoidal time ids; None for a UNet without it (SD 1.x/2.x)."""
    if unet_cfg.get("addition_embed_type") != "text_time":
        return None
    return unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"], 6


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def attach(unet, kind: str, rank: int, dtype: torch.dtype | None = None) -> list[dict]:
    """Attach `kind` (a dreamlora method, or the diffusers-script reference) and return its optimizer groups."""
    if kind == REFERENCE:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        if dtype == torch.float16:  # diffusers' cast_training_params: fp32 LoRA weights under fp16 only
            for p in params:
                p.data = p.data.float()
        return [{"params": params}]
    dreamlora.attach(unet, dreamlora.AdapterConfig(method=kind, rank=rank, target_modules=TARGETS))
    return dreamlora.param_groups(unet, lr=1e-4)


def make_optimizer(groups: list[dict], eight_bit: bool):
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=1e-4, weight_decay=1e-2)
    return torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-2)


def inputs(models: dict, device: torch.device, batch: int, seed: int, side: int | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    side, cross = side or models["latent"], models["cross_dim"]
    data = {"latents": torch.randn(batch, 4, side, side, generator=gen).to(device),
            "noise": torch.randn(batch, 4, side, side, generator=gen).to(device),
            "timesteps": torch.randint(0, 1000, (batch,), generator=gen).to(device),
            "context": torch.randn(batch, 77, cross, generator=gen).to(device)}
    if models["added"]:  # SDXL: pooled embedding; (original h, w, crop top, left, target h, w) of a full-frame image
        pooled, _ = models["added"]
        size = side * 8
        data["added"] = {"text_embeds": torch.randn(batch, pooled, generator=gen).to(device),
                         "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32,
                                                  device=device)}
    return data


# --- training -----------------------------------------------------------------------------------------------------

def train_step(unet, optimizer, scaler, data: dict, schedule, dtype, params, ours: bool, total_steps: int) -> float:
    """train.py's step: autocast forward, fp32 MSE to the noise, (scaled) backward, clip 1.0, step, hooks."""
    noisy = schedule.add_noise(data["latents"], data["noise"], data["timesteps"])
    with torch.autocast(data["latents"].device.type, dtype=dtype):
        added = {k: v.to(dtype) for k, v in data["added"].items()} if "added" in data else None
        pred = unet(noisy.to(dtype), data["timesteps"], data["context"].to(dtype), added_cond_kwargs=added).sample
    loss = F.mse_loss(pred.float(), data["noise"].float())
    if ours:
        loss = loss + dreamlora.regularization_loss(unet)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if scaler:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skipped the step
    else:
        optimizer.step()
        stepped = True
    if ours and stepped:
        dreamlora.on_optimizer_step(unet, optimizer, total_steps=total_steps)  # AdaLoRA's budget schedule needs it
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_config(models: dict, kind: str, dtype_name: str, checkpointing: bool, eight_bit: bool, args,
                 device: torch.device) -> dict:
    """One training configuration on a fresh copy of the UNet: it/s, peak memory, and that it learned."""
    from diffusers import DDPMScheduler

    row = {"kind": kind, "dtype": dtype_name, "checkpointing": checkpointing,
           "optimizer": "AdamW8bit" if eight_bit else "AdamW"}
    dtype = DTYPES[dtype_name]
    free_memory(device)
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    unet = copy.deepcopy(models[dtype_name])
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    groups = attach(unet, kind, args.rank, dtype)
    params = [p for g in groups for p in g["params"]]
    initial = [p.detach().clone() for p in params]
    optimizer = make_optimizer(groups, eight_bit)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    schedule = DDPMScheduler.from_config(SD_SCHEDULE)
    data = inputs(models, device, args.batch, seed=1)
    losses = [train_step(unet, optimizer, scaler, data, schedule, dtype, params, kind != REFERENCE,
                          args.warmup + args.steps)
              for _ in range(args.warmup)]
    synchronize(device)
    start = time.perf_counter()
    losses += [train_step(unet, optimizer, scaler, data, schedule, dtype, params, kind != REFERENCE,
                          args.warmup + args.steps)
               for _ in range(args.steps)]
    synchronize(device)
    row["it_per_s"] = args.steps / (time.perf_counter() - start)
    if device.type == "cuda":
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    row["trainable_params"] = sum(p.numel() for p in params)
    row["adapter_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    row["last_loss"] = losses[-1]
    row["updated"] = any(not torch.equal(p.detach(), q) for p, q in zip(params, initial, strict=True))
    row["ok"] = all(math.isfinite(x) for x in losses) and row["updated"]
    return row


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def training_rows(models: dict, kinds: list[str], args, device: torch.device) -> list[dict]:
    configs = [(d, c, False) for d in DTYPES for c in (False, True)] + ([("bf16", False, True)] if args.eight_bit
                                                                      else [])
    if args.arch == "sdxl":  # the configuration people train SDXL adapters in
        configs = [("bf16", True, False)]
    rows = []
    for kind in kinds:
        for dtype_name, checkpointing, eight_bit in configs:
            rows.append(guarded({"kind": kind, "dtype": dtype_name, "checkpointing": checkpointing,
                                 "optimizer": "AdamW8bit" if eight_bit else "AdamW"},
                                train_config, models, kind, dtype_name, checkpointing, eight_bit, args, device))
            print(json.dumps(rows[-1]), flush=True)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """it/s and memory of each row over the reference's row of the same dtype, checkpointing and optimizer."""
    def key(r):
        return r["dtype"], r["checkpointing"], r["optimizer"]

    refs = {key(r): r for r in rows if r["kind"] == REFERENCE and r.get("ok")}
    for row in rows:
        ref = refs.get(key(row))
        if ref and row.get("ok"):
            row["x_ref_speed"] = row["it_per_s"] / ref["it_per_s"]
            if "peak_mib" in row:
                row["x_ref_memory"] = row["peak_mib"] / ref["peak_mib"]


def guarded(row: dict, fn, *args) -> dict:
    """Run one check; an exception becomes a failed row with its message, and the other checks still run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (a check that crashes is a result to report, not the end of the run)
        traceback.print_exc()
        return {**row, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}


# --- moves and offload ----------------------------------------------------------------------------------------------

def forward(unet, data: dict, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return unet(data["latents"].to(device, dtype), data["timesteps"].to(device),
                    data["context"].to(device, dtype)).sample.float().cpu()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def perturbed_on_cpu(models: dict, method: str, rank: int, scale: float = 0.3) -> torch.nn.Module:
    """A CPU fp32 copy with `method` attached and moved off its identity init, so the checks see the adapter. Seeded
    (the init too), so every call with the same arguments gives the same adapter: the sampling check compares two."""
    unet = copy.deepcopy(models["cpu_fp32"])
    torch.manual_seed(1)
    dreamlora.attach(unet, dreamlora.AdapterConfig(method=method, rank=rank, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in dreamlora.adapter_layers(unet, "default").values():
            for p in layer.parameters():
                p.add_(scale * p.abs().mean().clamp(min=0.2) * torch.randn(p.shape, generator=gen))
            layer.step = 10**6  # SingLoRA's ramp at 1: the adapter in full
    return unet


def visible_adapter(models: dict, method: str, rank: int, data: dict, base: torch.Tensor, target: float = 0.05):
    """`perturbed_on_cpu` with the perturbation doubled until the adapter changes the output by `target` (relative):
    a product of three factors (AdaLoRA's P·diag(E)·Q) barely moves under the scale that moves two. The scale is kept
    in `models` for the sampling check."""
    scale = 0.3
    for _ in range(6):
        unet = perturbed_on_cpu(models, method, rank, scale)
        ref = forward(unet, data, torch.device("cpu"))
        if relative_error(ref, base) >= target:
            break
        scale *= 2
    models[f"scale_{method}"] = scale
    return unet, ref


def move_checks(models: dict, method: str, args, device: torch.device) -> list[dict]:
    """attach on CPU → .to(device) equal; .to(device, bf16) keeps adapter dtype; model and sequential offload."""
    # 32² latents at most: the comparison needs no 512 px, and the CPU side runs the full UNet in fp32
    data = inputs(models, torch.device("cpu"), 1, seed=3, side=min(models["latent"], 32))
    if "base_out" not in models:
        models["base_out"] = forward(models["cpu_fp32"], data, torch.device("cpu"))
    cpu, ref = visible_adapter(models, method, args.rank, data, models["base_out"])
    effect = relative_error(ref, models["base_out"])
    rows = [{"check": "adapter changes the output (else the checks below prove nothing)", "method": method,
             "value": effect, "ok": effect > 100 * args.tol}]

    def moved(target_dtype):
        unet = copy.deepcopy(cpu).to(device, target_dtype) if target_dtype else copy.deepcopy(cpu).to(device)
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in adapter_params(unet)})
        err = relative_error(forward(unet, data, device, target_dtype or torch.float32), ref)
        return err, dtypes

    err, dtypes = moved(None)
    rows.append({"check": f"attach on CPU, .to({device.type}): output vs CPU", "method": method, "value": err,
                 "ok": err <= args.tol})
    err, dtypes = moved(torch.bfloat16)
    # bf16 rounding must stay well below the adapter's own effect, or a dropped adapter would pass unseen
    rows.append({"check": f".to({device.type}, bfloat16): adapter dtype {'/'.join(dtypes)}, output vs CPU fp32 "
                          f"(≤ {args.half_tol} and < half the adapter's effect)", "method": method, "value": err,
                 "ok": dtypes == ["float32"] and err <= min(args.half_tol, effect / 2)})
    rows.append(guarded({"check": "model offload (cpu_offload_with_hook)", "method": method}, offload_check,
                        cpu, data, ref, device, "model", args.tol, method))
    rows.append(guarded({"check": "sequential offload (cpu_offload)", "method": method}, offload_check,
                        cpu, data, ref, device, "sequential", args.tol, method))
    return rows


def adapter_params(unet) -> list[torch.nn.Parameter]:
    return [p for layer in dreamlora.adapter_layers(unet, "default").values() for p in layer.parameters()]


def offload_check(cpu_model, data: dict, ref: torch.Tensor, device: torch.device, how: str, tol: float,
                  method: str) -> dict:
    """Forward under accelerate's offload hooks, from a CPU model with the adapter attached: equal to the CPU's.
    A method whose forward reads the base weight may refuse sequential offload with a message; that passes."""
    from accelerate import cpu_offload, cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    unet = copy.deepcopy(cpu_model)
    row = {"check": f"{how} offload ({'cpu_offload_with_hook' if how == 'model' else 'cpu_offload'})",
           "method": method}
    if how == "model":
        unet, hook = cpu_offload_with_hook(unet, execution_device=device)
    else:
        cpu_offload(unet, execution_device=device)
    try:
        err = relative_error(forward(unet, data, device), ref)
        if how == "model":
            hook.offload()  # back to the CPU, then on again: the cycle enable_model_cpu_offload runs per call
            err = max(err, relative_error(forward(unet, data, device), ref))
    except Exception as e:  # noqa: BLE001
        if how == "sequential" and dreamlora.METHODS[method].reads_base_weight and "offload" in str(e).lower():
            return {**row, "value": None, "ok": True, "note": f"refused with a message: {str(e)[:200]}"}
        raise
    row.update(value=err, ok=err <= tol)
    try:  # what diffusers does when an offloaded pipeline is moved or its hooks are reset
        remove_hook_from_module(unet, recurse=True)
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=f"forward ok; removing the hooks failed: {type(e).__name__}: {str(e)[-120:]}")
    return row


# --- sampling ---------------------------------------------------------------------------------------------------------

def pipeline(models: dict, kind: str, args):
    """A StableDiffusionPipeline on CPU copies: the UNet with `kind` (ours perturbed), the random VAE, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if kind == REFERENCE:
        unet = copy.deepcopy(models["cpu_fp32"])
        attach(unet, REFERENCE, args.rank)
    else:
        unet = perturbed_on_cpu(models, kind, args.rank, models.get(f"scale_{kind}", 0.3))
    pipe = StableDiffusionPipeline(vae=copy.deepcopy(models["vae"]).to("cpu"), text_encoder=None, tokenizer=None,
                                   unet=unet, scheduler=DDIMScheduler.from_config(SD_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, models: dict, args, device: torch.device, dtype) -> tuple[torch.Tensor, float]:
    gen = torch.Generator().manual_seed(4)
    embeddings = torch.randn(1, 77, models["cross_dim"], generator=gen).to(device, dtype)
    synchronize(device)
    start = time.perf_counter()
    images = pipe(prompt_embeds=embeddings, negative_prompt_embeds=torch.zeros_like(embeddings),
                  num_inference_steps=args.sample_steps, height=args.resolution, width=args.resolution,
                  output_type="pt", generator=torch.Generator(device).manual_seed(0)).images
    synchronize(device)
    return images.float().cpu(), time.perf_counter() - start


def sample_check(models: dict, kind: str, args, device: torch.device) -> dict:
    """Sample with the adapter on the device (bf16 on CUDA: a random-weight SD VAE may overflow fp16), then with
    enable_model_cpu_offload: the same image."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = pipeline(models, kind, args).to(device, dtype)
    images, seconds = sample(pipe, models, args, device, dtype)
    size = (1, 3, args.resolution, args.resolution)
    row = {"check": f"sample {args.sample_steps} steps ({str(dtype).removeprefix('torch.')}, CFG)", "method": kind,
           "value": seconds, "ok": tuple(images.shape) == size and bool(torch.isfinite(images).all())}
    del pipe
    if device.type == "cuda":
        offloaded = pipeline(models, kind, args).to(dtype=dtype)
        offloaded.enable_model_cpu_offload(device=device)
        again, _ = sample(offloaded, models, args, device, dtype)
        row["offload_error"] = (again - images).abs().max().item()  # images in [0, 1]
        row["ok"] = row["ok"] and row["offload_error"] <= args.half_tol
        row["check"] += ", then enable_model_cpu_offload: same image"
    return row


# --- report -----------------------------------------------------------------------------------------------------------

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__, "dreamlora": dreamlora.__version__}
    for name in ("diffusers", "peft", "accelerate", "bitsandbytes", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def verdict(row: dict) -> str:
    """`yes`, or `NO` with the reason; a note (a documented refusal) beside either. One table cell: one line."""
    text = "yes" if row["ok"] else "NO"
    reason = row.get("error") or row.get("note") or ("" if row["ok"] else "not finite or not updated")
    return (text + (f": {reason}" if reason else "")).replace("\n", " ").replace("|", "/")


def markdown(meta: dict, train: list[dict], checks: list[dict]) -> str:
    a = meta["args"]
    arch = "SDXL base" if a["arch"] == "sdxl" else "SD 1.5"
    title = (f"# GPU check ({arch}) — CPU SMOKE (tiny UNet config, not GPU figures)\n\n" if a["tiny"] else
             f"# GPU check — {arch} architecture, random weights\n\n")
    head = (f"{title}Device: {meta['device']}. Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}."
            f"\n\nUNet {meta['params']:,} parameters, {a['resolution']} px ({a['resolution'] // 8}² latents), batch "
            f"{a['batch']}, rank {a['rank']} on {', '.join(TARGETS)}; {a['warmup']} warm-up + {a['steps']} timed steps "
            f"per configuration; whole check {meta['total_s']:.0f} s. Memory: CUDA max_memory_allocated above what was "
            "allocated before the configuration's own copy of the UNet. × ref: over peft-lora (diffusers' DreamBooth "
            f"script's adapter) with the same dtype, checkpointing and optimizer.{REFERENCE_NOTE[a['arch']]}\n\n")
    table = ("| method | dtype | grad ckpt | optimizer | it/s | × ref it/s | peak mem (MiB) | × ref mem | trainable | "
             "adapter dtype | ok |\n|---|---|---|---|---:|---:|---:|---:|---:|---|---|\n")
    table += "".join(
        f"| {r['kind']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | {r['optimizer']} | "
        f"{cell(r.get('it_per_s'), '.2f')} | {cell(r.get('x_ref_speed'), '.2f')} | {cell(r.get('peak_mib'), '.0f')} | "
        f"{cell(r.get('x_ref_memory'), '.2f')} | {cell(r.get('trainable_params'), ',')} | "
        f"{'/'.join(r.get('adapter_dtypes', []))} | {verdict(r)} |\n" for r in train)
    if not checks:
        return head + table
    checks_md = "\n| check | method | value | ok |\n|---|---|---:|---|\n" + "".join(
        f"| {r['check']} | {r['method']} | {cell(r.get('value'), '.3g')} | {verdict(r)} |\n" for r in checks)
    return head + table + checks_md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny UNet config at 64 px on the CPU: a smoke of the code")
    p.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15",
                   help="sd15: every check (default); sdxl: the SDXL training rows (1024 px, bf16, checkpointing)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--methods", default=None, help="comma-separated registered methods (default: all; sdxl: lora,dora)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512, sdxl 1024, or 64 with --tiny)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=None, help="default 4, sdxl 16")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10, --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, --tiny 1)")
    p.add_argument("--sample_steps", type=int, default=4)
    p.add_argument("--no_8bit", dest="eight_bit", action="store_false", help="skip the AdamW8bit configurations")
    p.add_argument("--tol", type=float, default=1e-4, help="fp32 CPU vs device, relative to the output's max")
    p.add_argument("--half_tol", type=float, default=0.1, help="bf16 vs fp32, relative (and offload sampling)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, or 1 with --tiny: on a "
                   "shared machine more threads wait on each other)")
    p.add_argument("--output", default=None, help="path stem (default bench/results/gpu_check[_cpu_smoke])")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    sdxl = args.arch == "sdxl"
    args.resolution = args.resolution or (64 if args.tiny else 1024 if sdxl else 512)
    args.rank = args.rank or (16 if sdxl else 4)
    args.methods = args.methods or ("lora,dora" if sdxl else ",".join(dreamlora.METHODS))
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    stem = "gpu_check" + ("_sdxl" if sdxl else "") + ("_cpu_smoke" if args.tiny else "")
    args.output = args.output or str(ROOT / "bench" / "results" / stem)
    unknown = sorted(set(args.methods.split(",")) - set(dreamlora.METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; registered: {sorted(dreamlora.METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (the full-size check needs one; --tiny runs the CPU smoke)")
    if args.resolution % 8:
        p.error(f"--resolution must be a multiple of 8, got {args.resolution}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, start = torch.device(args.device), time.perf_counter()
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    models = build_models(args, device)
    methods = args.methods.split(",")
    train = training_rows(models, [*methods, REFERENCE], args, device)
    checks = [] if args.arch == "sdxl" else architecture_checks(models, methods, args, device)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
            "versions": versions(), "params": models["params"], "build_s": models["build_s"],
            "total_s": time.perf_counter() - start, "args": vars(args)}
    from report import write_report  # bench/report.py

    write_report(args.output, {"meta": meta, "training": train, "checks": checks}, markdown(meta, train, checks))
    failed = [r for r in train + checks if not r["ok"]]
    print(f"{len(failed)} failed of {len(train) + len(checks)}; {meta['total_s']:.0f} s")
    return 1 if failed else 0


def architecture_checks(models: dict, methods: list[str], args, device: torch.device) -> list[dict]:
    """Moves, offloads and sampling, per method (SD 1.5 only: they do not depend on the architecture)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 compared with fp32
    checks = []
    for method in methods:
        rows = guarded({"check": "moves", "method": method}, move_checks, models, method, args, device)
        checks += rows if isinstance(rows, list) else [rows]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    checks += [guarded({"check": "sample", "method": k}, sample_check, models, k, args, device)
               for k in [*methods, REFERENCE]]
    return checks


if __name__ == "__main__":
    sys.exit(main())
