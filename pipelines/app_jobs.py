"""Training jobs of the app: `dreamlora/train.py` subprocesses, one folder each under the runs folder.

All state lives on disk, so a reloaded page (or a restarted server) finds every run again:

    RUNS/<name>/job.json        settings, the trainer's argv, pid, launch count, whether Stop was asked
    RUNS/<name>/data/subject/   the instance photos (checked, copied)
    RUNS/<name>/train.log       the trainer's stdout and stderr, all launches appended
    RUNS/<name>/exit.json       the return code of the latest launch (when this server saw it end)
    RUNS/<name>/progress.jsonl  written by the trainer (`started`/`step`/`checkpoint`/`done`/`stopped` lines)

Stop sends SIGUSR1 (the trainer checkpoints at the next step and exits cleanly), then SIGTERM and SIGKILL to
the process group if it has not exited within the timeouts. Resume relaunches the saved argv with
`--resume_from_checkpoint latest`. No gradio here: the UI in app.py is a thin layer over this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dreamlora.io import atomic_write_text
from dreamlora.train_args import METHOD_CHOICES
from pipelines.app_safety import AppInputError, check_images, check_run_name, inside, number

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "dreamlora" / "train.py"
SUBJECT = "subject"  # the photos' folder under data/: also the reference folder name for scoring
TOKEN = re.compile(r"[A-Za-z0-9]{1,24}")
CLASS_NOUN = re.compile(r"[A-Za-z][A-Za-z0-9 _-]{0,39}")
STATUSES = ("running", "finished", "stopped", "failed")


@dataclass
class TrainSettings:
    """What the Train tab asks for; `validate` refuses bad values before anything is written."""

    name: str
    base_model: str
    token: str = "sks"
    class_noun: str = "dog"
    instance_prompt: str = ""  # default: "a photo of {token} {class_noun}"
    method: str = "lora"
    rank: int = 4
    steps: int = 400
    learning_rate: float = 1e-4
    prior_preservation: bool = False
    class_prompt: str = ""  # default: "a photo of {class_noun}"
    num_class_images: int = 50
    train_text_encoder: bool = False
    resolution: int = 512
    validation_prompt: str = ""  # empty: no validation images
    validation_steps: int = 100
    checkpointing_steps: int = 100
    seed: int = 0

    def validate(self) -> TrainSettings:
        self.name = check_run_name(self.name)
        self.base_model = (self.base_model or "").strip() or "tiny"
        if not TOKEN.fullmatch(self.token or ""):
            raise AppInputError(f"Identifier {self.token!r}: 1-24 letters or digits, e.g. sks.")
        if not CLASS_NOUN.fullmatch(self.class_noun or ""):
            raise AppInputError(f"Class {self.class_noun!r}: a plain noun such as dog or backpack.")
        self.instance_prompt = (self.instance_prompt or "").strip() or f"a photo of {self.token} {self.class_noun}"
        self.class_prompt = (self.class_prompt or "").strip() or f"a photo of {self.class_noun}"
        if self.method not in METHOD_CHOICES:
            raise AppInputError(f"Method {self.method!r}: one of {', '.join(METHOD_CHOICES)}.")
        limits = {"rank": (1, 256), "steps": (1, 100_000), "num_class_images": (1, 1000), "resolution": (64, 2048),
                  "validation_steps": (1, 100_000), "checkpointing_steps": (1, 100_000), "seed": (0, 2**32 - 1)}
        for key, (low, high) in limits.items():
            setattr(self, key, number(getattr(self, key), key.replace("_", " ").capitalize(), low, high))
        if self.resolution % 8:
            raise AppInputError(f"Resolution must be a multiple of 8, got {self.resolution}.")
        self.learning_rate = number(self.learning_rate, "Learning rate", 1e-8, 0.1, float)
        self.validation_prompt = (self.validation_prompt or "").strip()
        return self

    def argv(self, run_dir: Path) -> list[str]:
        """The trainer's flags, as a user would type them."""
        args = ["--pretrained_model_name_or_path", self.base_model, "--instance_data_dir", str(run_dir / "data" /
                SUBJECT), "--instance_prompt", self.instance_prompt, "--output_dir", str(run_dir),
                "--adapter", self.method, "--rank", str(self.rank), "--max_train_steps", str(self.steps),
                "--learning_rate", str(self.learning_rate), "--resolution", str(self.resolution), "--center_crop",
                "--checkpointing_steps", str(self.checkpointing_steps), "--checkpoints_total_limit", "2",
                "--seed", str(self.seed), "--report_to", "none"]
        if self.prior_preservation:
            args += ["--with_prior_preservation", "--class_data_dir", str(run_dir / "class_images"),
                     "--class_prompt", self.class_prompt, "--num_class_images", str(self.num_class_images)]
        if self.train_text_encoder:
            args.append("--train_text_encoder")
        if self.validation_prompt.strip():
            args += ["--validation_prompt", self.validation_prompt.strip(), "--validation_steps",
                     str(self.validation_steps), "--validation_inference_steps", "20", "--num_validation_images", "2"]
        return args


@dataclass
class Progress:
    """A run as the page shows it, read from its folder."""

    name: str
    status: str
    step: int = 0
    total: int | None = None
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss), last record per step wins
    validation: list[Path] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    log_tail: str = ""

    @property
    def resumable(self) -> bool:
        return self.status in ("stopped", "failed")

    def summary(self) -> str:
        total = f"/{self.total}" if self.total else ""
        eta = f", ETA {format_seconds(self.eta_s)}" if self.status == "running" and self.eta_s is not None else ""
        loss = f", loss {self.losses[-1][1]:.4f}" if self.losses else ""
        return f"{self.name}: {self.status}, step {self.step}{total}{eta}{loss}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_progress_records(path: Path) -> list[dict]:
    """The trainer's JSON lines; a half-written last line (the trainer is appending) is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def pid_runs(pid: int | None, run_dir: Path) -> bool:
    """Is `pid` alive and still our trainer for `run_dir` (a pid can be reused after a restart)?"""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and str(run_dir).encode() in cmdline


def resolve_base_model(runs_dir: Path, value: str | None) -> str:
    """`tiny` (or empty) is the embedded tiny model, built once into RUNS/_models/tiny-sd; anything else is a
    local diffusers folder or a hub id, passed on as given."""
    value = (value or "").strip()
    if value not in ("", "tiny"):
        return value
    folder = Path(runs_dir) / "_models" / "tiny-sd"
    with _TINY_LOCK:
        if not (folder / "model_index.json").is_file():
            from dreamlora import tiny

            shutil.rmtree(folder, ignore_errors=True)
            tiny.write(folder)
    return str(folder)


_TINY_LOCK = threading.Lock()


def native_resolution(base_model: str) -> int:
    """The resolution a base model was trained at: its UNet's sample size × 8 (64 for tiny, 512 for SD 1.5)."""
    if base_model in ("", "tiny"):
        return 64
    config = read_json(Path(base_model) / "unet" / "config.json")
    size = config.get("sample_size")
    return int(size) * 8 if isinstance(size, int) else 512


def live_group_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are alive (zombies waiting for their parent do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


class JobManager:
    """Start, follow, stop and resume training runs under `runs_dir`; one training at a time."""

    def __init__(self, runs_dir: Path, python: str = sys.executable, stop_timeouts: tuple[float, float] = (120, 20)):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.python, self.stop_timeouts = python, stop_timeouts
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # --- folders ------------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return inside(self.runs_dir, check_run_name(name))

    def existing(self, name: str) -> Path:
        run_dir = self.run_dir(name)
        if not (run_dir / "job.json").is_file():
            raise AppInputError(f"There is no run called {name!r}.")
        return run_dir

    def names(self) -> list[str]:
        """Runs, newest first."""
        jobs = [(read_json(p / "job.json").get("created", 0), p.name) for p in self.runs_dir.iterdir()
                if p.is_dir() and not p.name.startswith(("_", ".")) and (p / "job.json").is_file()]
        return [name for _, name in sorted(jobs, reverse=True)]

    # --- start / resume -----------------------------------------------------------------------------------
    def start(self, settings: TrainSettings, photos: list[Path], labels: list[str] | None = None) -> str:
        settings.validate()
        settings.base_model = resolve_base_model(self.runs_dir, settings.base_model)
        photos = check_images(photos, labels)
        with self._lock:
            self._refuse_if_busy()
            run_dir = self.run_dir(settings.name)
            if run_dir.exists():
                raise AppInputError(f"A run called {settings.name!r} exists already: pick another name, or "
                                    "resume it from the Runs list.")
            data = run_dir / "data" / SUBJECT
            data.mkdir(parents=True)
            for i, photo in enumerate(photos):
                with Image.open(photo) as im:
                    suffix = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}.get(im.format, f".{im.format.lower()}")
                shutil.copyfile(photo, data / f"photo-{i:03d}{suffix}")
            job = {"name": settings.name, "created": time.time(), "settings": dataclasses.asdict(settings),
                   "argv": settings.argv(run_dir), "launches": 0, "stop_requested": False}
            self._launch(run_dir, job, job["argv"])
        return f"Started {settings.name!r}: {settings.method}, rank {settings.rank}, {settings.steps} steps."

    def resume(self, name: str) -> str:
        with self._lock:
            run_dir = self.existing(name)
            status = self.progress(name).status
            if status == "running":
                raise AppInputError(f"{name!r} is running already.")
            if status == "finished":
                raise AppInputError(f"{name!r} finished all its steps; start a new run to train longer.")
            self._refuse_if_busy()
            job = read_json(run_dir / "job.json")
            job["stop_requested"] = False
            self._launch(run_dir, job, [*job["argv"], "--resume_from_checkpoint", "latest"])
        return f"Resumed {name!r} from its latest checkpoint."

    def _refuse_if_busy(self) -> None:
        busy = self.active()
        if busy:
            raise AppInputError(f"Run {busy!r} is training: one GPU job at a time. Stop it or wait for it to finish.")

    def _launch(self, run_dir: Path, job: dict, argv: list[str]) -> None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        (run_dir / "exit.json").unlink(missing_ok=True)
        with open(run_dir / "train.log", "a", encoding="utf-8") as log:
            log.write(f"\n=== launch {job['launches'] + 1} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
            log.flush()
            proc = subprocess.Popen([self.python, str(TRAIN_SCRIPT), *argv], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, env=env, start_new_session=True)
        job.update(pid=proc.pid, launches=job["launches"] + 1, launched=time.time())
        atomic_write_text(run_dir / "job.json", json.dumps(job, indent=1))
        self._procs[job["name"]] = proc
        threading.Thread(target=self._reap, args=(run_dir, proc, job["launches"]), daemon=True).start()

    def _reap(self, run_dir: Path, proc: subprocess.Popen, launch: int) -> None:
        code = proc.wait()
        atomic_write_text(run_dir / "exit.json", json.dumps({"launch": launch, "returncode": code}))

    # --- state --------------------------------------------------------------------------------------------
    def is_running(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None:
            return proc.poll() is None
        run_dir = self.runs_dir / name
        return pid_runs(read_json(run_dir / "job.json").get("pid"), run_dir)

    def active(self) -> str | None:
        return next((name for name in self.names() if self.is_running(name)), None)

    def status(self, name: str, records: list[dict]) -> str:
        if self.is_running(name):
            return "running"
        run_dir = self.runs_dir / name
        job = read_json(run_dir / "job.json")
        ends = [r["event"] for r in records if r.get("event") in ("started", "done", "stopped")]
        exit_code = read_json(run_dir / "exit.json").get("returncode")
        last = ends[-1] if ends else None
        if last == "done" and exit_code in (None, 0):
            return "finished"
        if job.get("stop_requested"):
            return "stopped"
        if exit_code not in (None, 0):
            return "failed"
        return "stopped" if last == "stopped" else "failed"  # stopped: e.g. `kill -USR1` by hand

    def progress(self, name: str, log_lines: int = 12) -> Progress:
        run_dir = self.existing(name)
        records = read_progress_records(run_dir / "progress.jsonl")
        losses: dict[int, float] = {}
        p = Progress(name, self.status(name, records))
        for r in records:
            if r.get("event") == "step":
                losses[r["step"]] = r["loss"]
                p.step, p.total, p.eta_s = r["step"], r.get("total"), r.get("eta_s")
            elif r.get("event") in ("started", "done", "stopped"):
                p.step, p.total = r.get("step", p.step), r.get("total", p.total)
        p.total = p.total or read_json(run_dir / "job.json").get("settings", {}).get("steps")
        p.losses = sorted(losses.items())
        p.validation = sorted((run_dir / "validation").glob("step-*.png"))
        p.checkpoints = sorted(int(c.name.split("-")[1]) for c in run_dir.glob("checkpoint-*")
                               if c.name.split("-")[1].isdigit())
        p.log_tail = tail(run_dir / "train.log", log_lines)
        return p

    def table(self) -> list[dict]:
        """One row per run for the Runs list."""
        rows = []
        for name in self.names():
            p = self.progress(name, log_lines=0)
            settings = read_json(self.runs_dir / name / "job.json").get("settings", {})
            rows.append({"run": name, "status": p.status, "method": settings.get("method"),
                         "rank": settings.get("rank"), "step": f"{p.step}/{p.total or '?'}",
                         "last checkpoint": p.checkpoints[-1] if p.checkpoints else None,
                         "resumable": p.resumable, "adapter": self.has_adapter(name)})
        return rows

    def has_adapter(self, name: str) -> bool:
        return (self.runs_dir / name / "unet_adapter.safetensors").is_file()

    def settings(self, name: str) -> dict:
        return read_json(self.existing(name) / "job.json").get("settings", {})

    # --- stop ---------------------------------------------------------------------------------------------
    def stop(self, name: str) -> str:
        """SIGUSR1 (checkpoint and exit), then SIGTERM, then SIGKILL to the process group, each with a timeout."""
        run_dir = self.existing(name)
        job = read_json(run_dir / "job.json")
        if not self.is_running(name):
            return f"{name!r} is not running."
        job["stop_requested"] = True
        atomic_write_text(run_dir / "job.json", json.dumps(job, indent=1))
        pid = job["pid"]
        usr1_wait, term_wait = self.stop_timeouts
        steps = [(signal.SIGUSR1, usr1_wait, False, None),
                 (signal.SIGTERM, term_wait, True, "did not stop in time after SIGUSR1: terminated (SIGTERM)"),
                 (signal.SIGKILL, 10, True, "did not stop after SIGTERM: killed (SIGKILL)")]
        for sig, wait, whole_group, outcome in steps:
            try:
                os.killpg(pid, sig) if whole_group else os.kill(pid, sig)
            except ProcessLookupError:
                break
            if self._wait_exit(name, wait):
                self._kill_leftovers(pid)
                return f"{name!r} {outcome or self._clean_stop_outcome(run_dir)}."
        return f"{name!r} could not be stopped (pid {pid})."

    @staticmethod
    def _clean_stop_outcome(run_dir: Path) -> str:
        """What SIGUSR1 did: a checkpoint and a clean exit, or (before the trainer's first step, while it
        loads models or makes class images) an exit with nothing to save."""
        ends = [r for r in read_progress_records(run_dir / "progress.jsonl") if r.get("event") in
                ("started", "stopped", "done")]
        if ends and ends[-1]["event"] == "stopped":
            return f"saved a checkpoint at step {ends[-1]['step']} and stopped"
        return "stopped before its first step (nothing to save; Resume starts it again)"

    @staticmethod
    def _kill_leftovers(pgid: int) -> None:
        """The trainer is gone; anything it started (data workers, a launcher's children) goes with it."""
        deadline = time.time() + 5
        while live_group_members(pgid) and time.time() < deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def _wait_exit(self, name: str, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.is_running(name):
                return True
            time.sleep(0.1)
        return not self.is_running(name)


def tail(path: Path, lines: int) -> str:
    if lines <= 0 or not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 16_384))
        text = f.read().decode("utf-8", errors="replace")
    # a progress bar redraws itself with \r: keep what the terminal would show, its last state
    shown = [line.split("\r")[-1] or line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])
