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
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pipelines.dreambench_protocol import Protocol, Subject, load_protocol


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
    p.add_argument("--subject", action="append", required=True, help="DreamBench subject name; repeatable")
    p.add_argument("--class_noun", default=None, help="class noun for a subject outside the DreamBench table")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                   help="as in pipelines.sample; repeatable")
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


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from pipelines.sample import AdapterSpec, apply_adapters, load_pipeline

    args = build_parser().parse_args(argv)
    protocol = load_protocol()
    try:
        subjects = resolve_subjects(protocol, args.subject, args.class_noun)
        specs = [AdapterSpec.parse(a) for a in args.adapter]
        for spec in specs:
            spec.files()
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
    if todo:
        pipe = load_pipeline(args.pretrained_model_name_or_path, str(state.device))
        adapters = apply_adapters(pipe, specs)
        pipe.set_progress_bar_config(disable=True)
        for job in tqdm(todo, desc=f"dreambench [{state.process_index}]", unit="img"):
            image = pipe(job.prompt, generator=torch.Generator().manual_seed(job.seed),
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                         height=args.height, width=args.width).images[0]
            final = out / job.file_name
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, final)
    else:
        adapters = [{"path": str(s.path), "scale": s.scale} for s in specs]
    state.wait_for_everyone()
    if state.is_main_process:
        write_metadata(out, jobs, adapters, args, time.time() - started, state.num_processes, len(todo))
    return 0


def write_metadata(out: Path, jobs: list[Job], adapters: list[dict], args, wall: float, world: int,
                   generated_here: int) -> None:
    method = adapters[0].get("method") if adapters else "base"
    rank = adapters[0].get("rank") if adapters else None
    rows = [{"file_name": j.file_name, "subject": j.subject.name, "class": j.subject.class_noun,
             "prompt": j.prompt, "prompt_for_clip_t": j.clip_t_prompt, "seed": j.seed,
             "adapter": ",".join(a["path"] for a in adapters) or None, "method": method, "rank": rank}
            for j in jobs if (out / j.file_name).is_file()]
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / "metadata.jsonl")
    run = {"args": vars(args), "images": len(rows), "planned": len(jobs), "world_size": world,
           "generated_by_main_process": generated_here, "wall_time_s": round(wall, 2), "adapters": adapters,
           "identifier_in_clip_t": args.keep_identifier}
    (out / ".run.json.tmp").write_text(json.dumps(run, indent=2))
    os.replace(out / ".run.json.tmp", out / "run.json")


if __name__ == "__main__":
    sys.exit(main())
