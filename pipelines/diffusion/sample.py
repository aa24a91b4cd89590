"""`python -m pipelines.sample`: images from a base model with one or several dreamlora adapters.

    python -m pipelines.sample --pretrained_model_name_or_path MODEL \
        --adapter runs/dog:1.0 --adapter style.safetensors:0.5 \
        --prompt "a photo of sks dog on the beach" --num_images_per_prompt 4 --output_dir samples/

`--adapter` takes a training output folder (its `unet_adapter.safetensors` and, if present,
`text_encoder_adapter.safetensors` and SDXL's `text_encoder_2_adapter.safetensors`) or one native adapter file for
the UNet, with an optional `:SCALE`. The model is an SD 1.x/2.x or an SDXL folder (read from its model_index.json).
A folder of a pivotal-tuning run (`--train_text_encoder_ti`) also brings its new tokens' embeddings: its token
abstraction ("TOK") in a prompt becomes the trained tokens (the metadata keeps the prompt as written and adds
`encoded_prompt`).
Output: PNGs named `<prompt index>_<k>.png` and `metadata.jsonl` (Hugging Face ImageFolder convention) with
the prompt, seed and adapters of each image. Image k of every prompt uses seed `--seed + k`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

import dreamlora
from dreamlora.atomic import atomic_write_text, save_png_atomic
from pipelines.diffusion import pivotal

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what an adapter can sit on (text_encoder_2: SDXL)


def pipeline_components(pipe) -> dict:
    """The pipeline's adaptable components by name (SDXL's second text encoder included)."""
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


@dataclass
class AdapterSpec:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """`PATH` or `PATH:SCALE` (the last colon splits only if what follows is a number)."""
        path, _, scale = text.rpartition(":")
        try:
            if path:
                return cls(Path(path), float(scale))
        except ValueError:
            pass
        return cls(Path(text), 1.0)

    def files(self) -> dict[str, Path]:
        """component -> native adapter file."""
        if self.path.is_dir():
            found = {c: self.path / f"{c}_adapter.safetensors" for c in COMPONENTS}
            found = {c: f for c, f in found.items() if f.is_file()}
            if "unet" not in found:
                raise FileNotFoundError(f"--adapter {str(self.path)!r}: no unet_adapter.safetensors in that folder")
            return found
        if not self.path.is_file():
            raise FileNotFoundError(f"--adapter {str(self.path)!r} does not exist")
        return {"unet": self.path}


def load_pipeline(model: str, device: str | None = None, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionPipeline

    from pipelines.diffusion.models import check_model_path, diffusers_dtype_kwargs, pipeline_class

    check_model_path(model)
    cls = pipeline_class(model)
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    pipe = cls.from_pretrained(model, **extra, **diffusers_dtype_kwargs(dtype))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def apply_adapters(pipe, specs: list[AdapterSpec], merge: bool = False) -> list[dict]:
    """Attach each adapter under its own name with its scale; `merge` folds them all into the weights. A pivotal run's
    embeddings are loaded too (`pivotal.load_embeddings`; `pivotal.unload_embeddings` takes them out again), and its
    row gets `token_abstraction`: {abstraction: tokens} for `pivotal.merged_abstractions`."""
    applied = []
    components = pipeline_components(pipe)
    for spec in specs:  # before anything loads
        for component in spec.files().keys() - components.keys():
            raise ValueError(f"--adapter {str(spec.path)!r} has a {component} adapter, which this model has not "
                             f"(an SDXL adapter on an SD 1.x/2.x model?)")
    for i, spec in enumerate(specs):
        name = f"adapter{i}"
        for component, file in spec.files().items():
            model = components[component]
            dreamlora.load(model, file, name=name)
            dreamlora.set_scale(model, name, spec.scale)
        config = dreamlora.adapter_config(pipe.unet, name)
        applied.append({"path": str(spec.path), "scale": spec.scale, "method": config.method, "rank": config.rank})
        embeddings = pivotal.embedding_file(spec.path) if spec.path.is_dir() else None
        if embeddings is not None:
            applied[-1]["token_abstraction"] = pivotal.load_embeddings(pipe, embeddings, name)
    pivotal.merged_abstractions(applied)  # one abstraction in two adapters: refused here
    if merge:
        for model in components.values():
            dreamlora.merge(model)
    return applied


def generate(pipe, prompts: list[str], output_dir: Path, *, negative_prompt: str | None = None, seed: int = 0,
             num_images_per_prompt: int = 1, num_inference_steps: int = 30, guidance_scale: float = 7.5,
             height: int | None = None, width: int | None = None, extra: dict | None = None,
             abstractions: dict[str, str] | None = None) -> list[dict]:
    """Write `<i>_<k>.png` for every prompt i and image k (seed + k), plus metadata.jsonl; returns the rows.
    `abstractions` ({"TOK": "<s0><s1>"}, from `pivotal.merged_abstractions`) are replaced in the prompts."""
    from tqdm.auto import tqdm

    output_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc="sampling", unit="prompt")):
        seeds = [seed + k for k in range(num_images_per_prompt)]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        encoded = pivotal.replace_abstractions(prompt, abstractions or {})
        images = pipe(encoded, negative_prompt=pivotal.replace_abstractions(negative_prompt, abstractions or {}),
                      num_images_per_prompt=num_images_per_prompt,
                      generator=generators, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=height, width=width).images
        for k, (image, s) in enumerate(zip(images, seeds, strict=True)):
            name = f"{i:04d}_{k}.png"
            save_png_atomic(image, output_dir / name)
            rows.append({"file_name": name, "prompt": prompt, "negative_prompt": negative_prompt, "seed": s,
                         "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                         "height": image.height, "width": image.width,
                         **({"encoded_prompt": encoded} if encoded != prompt else {}), **(extra or {})})
    atomic_write_text(output_dir / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                   help="training output folder or adapter file; repeatable")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts_file", help="one prompt per line")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--merge", action="store_true", help="fuse the adapters into the weights (zero overhead)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--output_dir", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        file = Path(args.prompts_file)
        if not file.is_file():
            print(f"error: --prompts_file {args.prompts_file!r} does not exist", file=sys.stderr)
            return 2
        prompts += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        print("error: give at least one --prompt or a --prompts_file", file=sys.stderr)
        return 2
    try:
        specs = [AdapterSpec.parse(a) for a in args.adapter]
        for spec in specs:
            spec.files()
        pipe = load_pipeline(args.pretrained_model_name_or_path, args.device)
        applied = apply_adapters(pipe, specs, merge=args.merge)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = generate(pipe, prompts, Path(args.output_dir), negative_prompt=args.negative_prompt, seed=args.seed,
                    num_images_per_prompt=args.num_images_per_prompt, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                    extra={"adapters": applied, "merged": args.merge},
                    abstractions=pivotal.merged_abstractions(applied))
    print(f"{len(rows)} images in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
