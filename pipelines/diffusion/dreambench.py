"""`python -m pipelines.dreambench`: images for the DreamBench protocol, resumable and sharded.

    accelerate launch -m pipelines.dreambench --pretrained_model_name_or_path MODEL \
        --subject dog --adapter runs/dog --output_dir bench-out/dog-lora

Writes `OUT/<subject>/<prompt index>_<k>.png`, `OUT/metadata.jsonl` (Hugging Face ImageFolder convention:
file_name, subject, class, prompt, prompt_for_clip_t, seed, adapter, method, rank) and `OUT/run.json`.
Image k of every prompt uses seed `--seed + k`. Processes take every world_size-th image; a rerun skips
images that already exist, so an interrupted generation resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from dreamlora.atomic import atomic_write_text, save_png_atomic
from pipelines.diffusion.dreambench_protocol import Protocol, Subject, load_protocol


@dataclass(frozen=True)
class Job:
    subject: Subject
    prompt_index: int
    k: int
    prompt: str
    clip_t_prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.subject.name}/{self.prompt_index:02d}_{self.k}.png"


def plan(protocol: Protocol, subjects: list[Subject], token: str, images_per_prompt: int, seed: int,
         keep_identifier: bool, max_prompts: int | None = None) -> list[Job]:
    jobs = []
    for subject in subjects:
        prompts = protocol.prompts(subject, token)
        clip_t = protocol.clip_t_prompts(subject, token, keep_identifier)
        for i, (prompt, text) in enumerate(zip(prompts, clip_t, strict=True)):
            if max_prompts is not None and i >= max_prompts:
                break
            jobs.extend(Job(subject, i, k, prompt, text, seed + k) for k in range(images_per_prompt))
    return jobs


def resolve_subjects(protocol: Protocol, names: list[str], class_noun: str | None) -> list[Subject]:
    subjects = []
    for name in names:
        if name in protocol.subjects:
            subjects.append(protocol.subjects[name])
        elif class_noun:
            subjects.append(Subject(name, class_noun))
        else:
            raise ValueError(f"--subject {name!r} is not a DreamBench subject; give --class_noun for your own")
    return subjects


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.dreambench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--subject", action="append", default=[], help="DreamBench subject name; repeatable")
    p.add_argument("--subjects_dir", default=None,
                   help="a folder of subject folders (e.g. the DreamBench dataset): one subject per subfolder")
    p.add_argument("--class_noun", default=None, help="class noun for a subject outside the DreamBench table")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                   help="as in pipelines.diffusion.sample, for every subject; repeatable")
    p.add_argument("--adapter_root", default=None,
                   help="per-subject adapters: ADAPTER_ROOT/<subject> is that subject's training output")
    p.add_argument("--token", default="sks", help="the unique identifier the adapter was trained with")
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts (quick checks)")
    p.add_argument("--keep_identifier", action="store_true", help="keep the token in prompt_for_clip_t")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--output_dir", required=True)
    return p


def subject_specs(args, subject: Subject) -> list:
    from pipelines.diffusion.sample import AdapterSpec

    specs = [AdapterSpec.parse(a) for a in args.adapter]
    if args.adapter_root:
        specs.append(AdapterSpec(Path(args.adapter_root) / subject.name))
    return specs


def describe(specs: list) -> list[dict]:
    """What metadata records about the adapters, read from the files' headers (no model needed)."""
    from dreamlora.io import read_metadata

    described = []
    for spec in specs:
        config = json.loads(read_metadata(spec.files()["unet"])["config"])
        described.append({"path": str(spec.path), "scale": spec.scale, "method": config["method"],
                          "rank": config["rank"]})
    return described


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    import dreamlora
    from pipelines.diffusion import pivotal
    from pipelines.diffusion.sample import apply_adapters, load_pipeline, pipeline_components

    args = build_parser().parse_args(argv)
    protocol = load_protocol()
    names = list(args.subject)
    if args.subjects_dir:
        root = Path(args.subjects_dir)
        names += sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    try:
        if not names:
            raise ValueError("give --subject or a --subjects_dir with subject folders")
        subjects = resolve_subjects(protocol, names, args.class_noun)
        adapters = {s.name: describe(subject_specs(args, s)) for s in subjects}
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(args.output_dir)
    jobs = plan(protocol, subjects, args.token, args.num_images_per_prompt, args.seed, args.keep_identifier,
                args.max_prompts)
    mine = [j for i, j in enumerate(jobs) if i % state.num_processes == state.process_index]
    todo = [j for j in mine if not (out / j.file_name).is_file()]
    started = time.time()
    pipe = load_pipeline(args.pretrained_model_name_or_path, str(state.device)) if todo else None
    bar = tqdm(total=len(todo), desc=f"dreambench [{state.process_index}]", unit="img")
    for subject in subjects:
        work = [j for j in todo if j.subject == subject]
        if not work:
            continue
        applied = apply_adapters(pipe, subject_specs(args, subject))  # this subject's adapters, then off again
        abstractions = pivotal.merged_abstractions(applied)  # a pivotal run: --token "TOK" -> its trained tokens
        pipe.set_progress_bar_config(disable=True)
        for job in work:
            image = pipe(pivotal.replace_abstractions(job.prompt, abstractions),
                         generator=torch.Generator().manual_seed(job.seed),
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                         height=args.height, width=args.width).images[0]
            save_png_atomic(image, out / job.file_name)
            bar.update(1)
        for component in pipeline_components(pipe).values():
            for name in dreamlora.adapter_names(component):
                dreamlora.detach(component, name)
        pivotal.unload_embeddings(pipe)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_metadata(out, jobs, adapters, args, time.time() - started, state.num_processes, len(todo))
    return 0


def write_metadata(out: Path, jobs: list[Job], adapters: dict[str, list[dict]], args, wall: float, world: int,
                   generated_here: int) -> None:
    rows = []
    for j in jobs:
        if not (out / j.file_name).is_file():
            continue
        used = adapters[j.subject.name]
        rows.append({"file_name": j.file_name, "subject": j.subject.name, "class": j.subject.class_noun,
                     "prompt": j.prompt, "prompt_for_clip_t": j.clip_t_prompt, "seed": j.seed,
                     "adapter": ",".join(a["path"] for a in used) or None,
                     "method": used[-1]["method"] if used else "base", "rank": used[-1]["rank"] if used else None})
    atomic_write_text(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    run = {"args": vars(args), "images": len(rows), "planned": len(jobs), "world_size": world,
           "generated_by_main_process": generated_here, "wall_time_s": round(wall, 2),
           "adapters": next(iter(adapters.values())) if len(adapters) == 1 else adapters,
           "identifier_in_clip_t": args.keep_identifier}
    atomic_write_text(out / "run.json", json.dumps(run, indent=2))


if __name__ == "__main__":
    sys.exit(main())
