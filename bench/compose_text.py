"""LoRAHub-style composition on real text data: a library of MiniLM adapters (SST-2, MR, SUBJ: all binary, labels
0/1), each task the target once with the other two as the library, composed from a few labelled examples.

    python bench/compose_text.py                      # writes bench/results/compose_text/{report.md,results.json}
    python bench/compose_text.py --seeds 0 --targets mr   # one cell, for a quick look

For each target task:
1. the library tasks' training files lose every sentence that occurs in the target's dev set (normalised: lower
   case, letters and digits only; SST-2 and MR share most of their snippets), with the counts reported;
2. one LoRA adapter per library task (`dreamlora/train_text.py`, head trained in full, --library_steps steps);
3. per few-shot draw (--shots labelled examples from the target's training file, balanced, per --seeds), scored on
   the target's whole dev set: the base with a head trained on the few examples, each library adapter alone (its
   own head), the uniform average, the composition by both rules (`python -m pipelines.compose`), and a LoRA
   trained on the same few examples; with the wall time of the composition and of that LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text"
TASKS = {"sst2": "SST-2", "mr": "MR", "subj": "SUBJ"}
PY = sys.executable


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def read(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            label, _, text = line.partition(" ")
            rows.append((label, text.strip()))
    return rows


def write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{label} {text}\n" for label, text in rows), encoding="utf-8")
    return path


def few_shot(rows: list[tuple[str, str]], shots: int, seed: int) -> list[tuple[str, str]]:
    """`shots` examples, as many of each label as possible (balanced), drawn with `seed`."""
    rng = random.Random(seed)
    labels = sorted({label for label, _ in rows})
    picked = []
    for i, label in enumerate(labels):
        pool = [r for r in rows if r[0] == label]
        picked += rng.sample(pool, shots // len(labels) + (1 if i < shots % len(labels) else 0))
    rng.shuffle(picked)
    return picked


def run(command: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({code}); see {log}")
    return time.perf_counter() - start


def train_text(out: Path, train: Path, dev: Path, steps: int, lr: float, threads: int, seed: int = 0) -> dict:
    if not (out / "run.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        run([PY, str(ROOT / "dreamlora" / "train_text.py"), "--model_name_or_path", "minilm",
             "--train_file", str(train), "--validation_file", str(dev), "--output_dir", str(out),
             "--adapter", "lora", "--rank", "8",
             "--max_train_steps", str(steps), "--per_device_train_batch_size", "16", "--learning_rate", str(lr),
             "--seed", str(seed), "--report_to", "none"], out.with_suffix(".log"), threads)
    return json.loads((out / "run.json").read_text())


def compose(out: Path, library: list[Path], few: Path, dev: Path, threads: int, *flags: str) -> dict:
    if not (out / "run.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [PY, "-m", "pipelines.compose", "--model_name_or_path", "minilm", "--train_file", str(few),
                   "--validation_file", str(dev), "--output_dir", str(out), "--report_to", "none", *flags]
        for folder in library:
            command += ["--adapter", str(folder)]
        run(command, out.with_suffix(".log"), threads)
    return json.loads((out / "run.json").read_text())


def head_only(few: Path, dev: Path, steps: int, lr: float, seed: int) -> float:
    """The base MiniLM with only its classifier head (and any freshly initialised layer) trained on the few examples:
    full batch, AdamW, the LoRA baseline's steps and learning rate."""
    import torch

    sys.path.insert(0, str(ROOT))
    from eval.classification import classification_metrics
    from pipelines.text import models as text_models
    from pipelines.text.data import Columns, PadCollator, read_examples, tokenize

    torch.manual_seed(seed)
    train, labels = read_examples(few, "--train_file", None, Columns())
    validation, _ = read_examples(dev, "--validation_file", None, Columns(), labels)
    path = text_models.resolve_model_path("minilm")
    tokenizer = text_models.load_tokenizer(path)
    model, fresh = text_models.load_classifier(path, labels)
    model.requires_grad_(False)
    head = text_models.head_parameter_names(model, fresh)
    params = dict(model.named_parameters())
    for name in head:
        params[name].requires_grad_(True)
    optimizer = torch.optim.AdamW([params[n] for n in head], lr=lr)
    collator = PadCollator(tokenizer.pad_token_id, tokenizer.padding_side)
    batch = collator(tokenize(tokenizer, train, 128))
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    features = tokenize(tokenizer, validation, 128)
    predicted = text_models.predict(model, features, collator, 128, "cpu")
    return classification_metrics(predicted, [f["labels"] for f in features], len(labels))["accuracy"]


def prepare(out: Path, target: str, shots: int, seeds: list[int]) -> dict:
    dev_rows = read(DATA / target / "dev.txt")
    dev_keys = {normalise(text) for _, text in dev_rows}
    info = {"dev": str(DATA / target / "dev.txt"), "dev_examples": len(dev_rows), "library": {}, "few": {}}
    for task in TASKS:
        if task == target:
            continue
        rows = read(DATA / task / "train.txt")
        kept = [r for r in rows if normalise(r[1]) not in dev_keys]
        info["library"][task] = {"train": str(write(out / "data" / target / f"{task}_train.txt", kept)),
                                 "removed": len(rows) - len(kept), "kept": len(kept)}
    train_rows = [r for r in read(DATA / target / "train.txt") if normalise(r[1]) not in dev_keys]
    for seed in seeds:
        info["few"][seed] = str(write(out / "data" / target / f"few{shots}_seed{seed}.txt",
                                      few_shot(train_rows, shots, seed)))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "compose_text"))
    p.add_argument("--targets", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2", help="few-shot draws")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--library_steps", type=int, default=300)
    p.add_argument("--library_lr", type=float, default=3e-3)
    p.add_argument("--few_steps", type=int, default=100, help="steps of the few-shot LoRA and head baselines")
    p.add_argument("--few_lr", type=float, default=1e-3)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.output)
    targets, seeds = args.targets.split(","), [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    plan = {t: prepare(out, t, args.shots, seeds) for t in targets}

    library_runs = [(t, task) for t in targets for task in plan[t]["library"]]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda cell: train_text(
            out / "library" / cell[0] / cell[1], Path(plan[cell[0]]["library"][cell[1]]["train"]),
            DATA / cell[1] / "dev.txt", args.library_steps, args.library_lr, threads), library_runs))

    results = {}
    for target in targets:
        dev = Path(plan[target]["dev"])
        lib_tasks = list(plan[target]["library"])
        library = [out / "library" / target / task for task in lib_tasks]
        few0 = Path(plan[target]["few"][seeds[0]])
        fixed = {}
        for i, task in enumerate(lib_tasks):
            one_hot = ",".join("1" if j == i else "0" for j in range(len(lib_tasks)))
            fixed[f"{TASKS[task]} alone"] = compose(out / "cells" / target / f"alone_{task}", library, few0, dev,
                                                    threads * args.jobs, "--weights", one_hot)["eval_accuracy"]
        uniform = ",".join(str(1 / len(lib_tasks)) for _ in lib_tasks)
        fixed["uniform"] = compose(out / "cells" / target / "uniform", library, few0, dev, threads * args.jobs,
                                   "--weights", uniform)["eval_accuracy"]

        def per_seed(seed: int, target=target, dev=dev, library=library) -> dict:
            few = Path(plan[target]["few"][seed])
            row = {}
            for rule in ("updates", "factors"):
                run_ = compose(out / "cells" / target / f"compose_{rule}_seed{seed}", library, few, dev, threads,
                               "--rule", rule, "--seed", str(seed))
                row[f"composition ({rule})"] = run_["eval_accuracy"]
                row[f"weights ({rule})"] = run_["weights"]
                row[f"time ({rule})"] = run_["search_time_s"]
            lora = train_text(out / "cells" / target / f"lora_few_seed{seed}", few, dev, args.few_steps, args.few_lr,
                              threads, seed)
            row["LoRA on the few"] = lora["eval_accuracy"]
            row["time (LoRA on the few)"] = lora["wall_time_s"]
            row["train time (LoRA on the few)"] = lora["train_time_s"]
            row["head only"] = head_only(few, dev, args.few_steps, args.few_lr, seed)
            return row

        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(per_seed, seeds))
        results[target] = {"fixed": fixed, "per_seed": dict(zip(map(str, seeds), rows, strict=True)),
                           "library": plan[target]["library"], "dev_examples": plan[target]["dev_examples"],
                           "library_own_dev_accuracy": {
                               task: json.loads((out / "library" / target / task / "run.json").read_text())
                               ["eval_accuracy"] for task in lib_tasks}}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report(results, args))
    print((out / "report.md").read_text())
    return 0


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def report(results: dict, args) -> str:
    lines = [f"# Composition on text: MiniLM-L6, {args.shots} labelled examples per draw (draws {args.seeds}), "
             f"library adapters LoRA r=8 trained {args.library_steps} steps", "",
             "Accuracy (%) on the target's whole dev set; fixed-weight rows use each library adapter's own head.", "",
             "| target | library (sentences removed) | head only | each alone | uniform | composed (updates) | "
             "composed (factors) | LoRA on the few |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for target, r in results.items():
        seeds = list(r["per_seed"].values())
        lib = ", ".join(f"{TASKS[t]} (−{v['removed']})" for t, v in r["library"].items())
        alone = ", ".join(f"{k.split()[0]} {100 * v:.1f}" for k, v in r["fixed"].items() if k.endswith("alone"))
        lines.append(f"| {TASKS[target]} | {lib} | {_ms([s['head only'] for s in seeds])} | {alone} | "
                     f"{100 * r['fixed']['uniform']:.1f} | {_ms([s['composition (updates)'] for s in seeds])} | "
                     f"{_ms([s['composition (factors)'] for s in seeds])} | "
                     f"{_ms([s['LoRA on the few'] for s in seeds])} |")
    lines += ["", "Weights found (per draw) and wall times (s):", ""]
    for target, r in results.items():
        for seed, s in r["per_seed"].items():
            w = "; ".join(f"{rule}: " + ", ".join(f"{Path(k).name}={v:+.2f}" for k, v in s[f"weights ({rule})"].items())
                          for rule in ("updates", "factors"))
            lines.append(f"- {TASKS[target]}, draw {seed}: {w}; search {s['time (updates)']:.1f} s (updates), "
                         f"{s['time (factors)']:.1f} s (factors); LoRA on the few {s['time (LoRA on the few)']:.1f} s")
    lines += ["", "Library adapters on their own task's dev set: " + "; ".join(
        f"for {TASKS[t]}: " + ", ".join(f"{TASKS[k]} {100 * v:.1f}" for k, v in r["library_own_dev_accuracy"].items())
        for t, r in results.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
