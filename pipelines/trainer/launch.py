"""Starting and ending a run: the accelerator and its device, the Stop signal, and the exit codes."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from dreamlora.errors import ArgError, DataError


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stops without saving over its last good checkpoint."""


def run_cli(main, argv: list[str] | None) -> int:
    """A trainer's exit codes, chosen by exception type: 2 with one line for bad input (it names the flag or
    file), 1 if training diverged. Anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except (ArgError, DataError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


@contextmanager
def adapter_input():
    """Around building and attaching the user's adapter: the core's ValueError/TypeError there is bad input
    (it names the AdapterConfig field and the module), so it becomes an ArgError."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise ArgError(str(e)) from e


def install_stop_signal():
    """SIGUSR1 (the app's Stop) asks for a checkpoint at the next step and a clean exit."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, handler)
    return lambda: flag["stop"]


def stop_everywhere(accelerator, stop_requested) -> bool:
    """A Stop seen by any process stops every process at the same step: the checkpoint it takes needs all
    of them (a signal to one process, or to the group arriving between steps, would otherwise hang the rest)."""
    if accelerator.num_processes == 1:  # no collective (and no device sync) on the common path
        return stop_requested()
    flag = torch.tensor([1.0 if stop_requested() else 0.0], device=accelerator.device)
    return bool(accelerator.gather(flag).max().item())


def device_type() -> str:
    """Where a run trains: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def make_accelerator(args, find_unused_parameters: bool = False):
    """The run's accelerator from the shared flags (accumulation, precision, tracker, output folder).
    `find_unused_parameters`: some trained weights get no gradient by design (SDXL's first text encoder: its
    last layer's output is never read), which DDP otherwise refuses at the second step."""
    import accelerate
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(args.output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = accelerate.Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=project,
        cpu=device_type() == "cpu",  # without a GPU, `--multi_gpu` processes must still join over gloo
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters
        else None,
    )
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate installs no GradScaler on the CPU: fp16 there would train unscaled, half-precision weights
        raise ArgError("--mixed_precision fp16 needs a CUDA or Apple MPS device; on the CPU use bf16 or no")
    return accelerator


def check_distributed(distributed_type: str, components: list[str]) -> None:
    """What the run cannot do under accelerate's sharded back-ends, refused before `prepare` with what to do instead
    (`distributed_type`: accelerate's `DistributedType` value; `components`: the trained models' names).

    DeepSpeed: accelerate prepares one model per DeepSpeed plugin, so a run that trains the text encoder too has two.
    FSDP: it shards the frozen base across processes, and the adapter files, validation images and resume read the
    adapters' full tensors on one process; gathering them under FSDP is not built (a real model's adapters are a few
    MB and its base fits one GPU, so DDP or DeepSpeed ZeRO-2 are the tools for it)."""
    if distributed_type == "DEEPSPEED" and len(components) > 1:
        raise ArgError(f"DeepSpeed (your accelerate config) prepares one model per plugin, and this run trains "
                       f"{' and '.join(components)}: drop --train_text_encoder (and --train_text_encoder_ti), or "
                       f"launch with plain DDP (accelerate launch --multi_gpu)")
    if distributed_type == "FSDP":
        raise ArgError("FSDP (your accelerate config) is not supported by dreamlora's trainer: it shards the frozen "
                       "base, and writing or resuming the adapters would need their tensors gathered, which is not "
                       "built. Use DDP (accelerate launch --multi_gpu) or DeepSpeed ZeRO-2 "
                       "(pipelines/trainer/accelerate_configs/deepspeed_zero2.yaml)")
