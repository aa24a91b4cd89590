"""Every adapter method over a grid of learning rates × seeds on one text task, then the comparison report.

    python -m pipelines.text_sweep --output_dir runs/sst2 --methods lora,loraplus,dora,singlora \\
        --learning_rates 1e-3,3e-3,1e-2 --seeds 0,1 -- \\
        --model_name_or_path minilm --train_file sst2/train.txt --validation_file sst2/dev.txt \\
        --max_train_steps 200 --eval_steps 25

Flags after `--` go to every `dreamlora/train_text.py` run unchanged; `--method_flags "adalora=--rank 12
--adalora_target_r 8"` adds flags for one method's runs only (after the shared ones, so they win), e.g. to
compare AdaLoRA at LoRA's final parameter budget. Each run is its own process in
`OUTPUT_DIR/<method>_lr<lr>_s<seed>` with its log; finished runs are skipped, so an interrupted sweep
continues where it stopped. A failed run is reported and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dreamlora.methods import METHODS

TRAINER = Path(__file__).resolve().parents[2] / "dreamlora" / "train_text.py"
OWNED_FLAGS = ("--adapter", "--learning_rate", "--seed", "--output_dir")


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}_lr{lr:g}_s{seed}"


def is_finished(folder: Path) -> bool:
    summary = folder / "run.json"
    return summary.is_file() and json.loads(summary.read_text(encoding="utf-8")).get("finished", False)


def train_one(folder: Path, method: str, lr: float, seed: int, trainer_flags: list[str], threads: int) -> int:
    command = [sys.executable, str(TRAINER), *trainer_flags, "--adapter", method, "--learning_rate", str(lr),
               "--seed", str(seed), "--output_dir", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.log", "w", encoding="utf-8") as log_file:
        return subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env).returncode


def parse_args(argv: list[str] | None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, trainer_flags = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(prog="python -m pipelines.text_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--learning_rates", default="1e-3,3e-3,1e-2")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel; CPU threads are shared between them")
    p.add_argument("--report_only", action="store_true", help="only rebuild the table and plots")
    p.add_argument("--method_flags", action="append", default=[], metavar="METHOD=FLAGS",
                   help="trainer flags for one method's runs only, e.g. 'adalora=--rank 12 --adalora_target_r 8' "
                        "(repeatable)")
    args = p.parse_args(own)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    try:
        args.learning_rates = [float(v) for v in args.learning_rates.split(",")]
        args.seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError as e:
        p.error(f"--learning_rates/--seeds must be comma-separated numbers ({e})")
    args.method_flags = _method_flags(p, args.method_flags, args.methods)
    clash = [f for f in trainer_flags + [f for fs in args.method_flags.values() for f in fs]
             if f.split("=")[0] in OWNED_FLAGS]
    if clash:
        p.error(f"{clash} are set by the sweep itself; remove them after --")
    if not args.report_only and "--validation_file" not in " ".join(trainer_flags):
        p.error("the trainer flags after -- need --validation_file (the sweep compares dev accuracy)")
    return args, trainer_flags


def _method_flags(parser, values: list[str], methods: list[str]) -> dict[str, list[str]]:
    """`--method_flags METHOD=FLAGS` (repeatable) as {method: [flags]}."""
    out: dict[str, list[str]] = {}
    for value in values:
        method, sep, flags = value.partition("=")
        if not sep or method.strip() not in methods:
            parser.error(f"--method_flags {value!r}: METHOD=FLAGS with METHOD one of --methods ({', '.join(methods)})")
        out.setdefault(method.strip(), []).extend(shlex.split(flags))
    return out


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from eval.text_report import write_report

    args, trainer_flags = parse_args(argv)
    out = Path(args.output_dir)
    grid = [(m, lr, s) for m in args.methods for lr in args.learning_rates for s in args.seeds]
    failed = []
    if not args.report_only:
        todo = [g for g in grid if not is_finished(out / run_name(*g))]
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with tqdm(total=len(grid), initial=len(grid) - len(todo), desc="sweep", unit="run") as bar:
            def one(cell):
                flags = trainer_flags + args.method_flags.get(cell[0], [])
                code = train_one(out / run_name(*cell), *cell, flags, threads)
                bar.update(1)
                return cell, code

            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                for cell, code in pool.map(one, todo):
                    if code != 0:
                        failed.append(run_name(*cell))
                        bar.write(f"{run_name(*cell)} failed (exit {code}); see {out / run_name(*cell) / 'train.log'}")
    try:
        print(write_report(out))
    except FileNotFoundError as e:  # no run finished: say which runs failed, not only that none finished
        print(e, file=sys.stderr)
        failed = failed or ["(none finished)"]
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
