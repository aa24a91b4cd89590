"""Training jobs of the app: `dreamlora/train.py` subprocesses, one folder each under the runs folder.

All state lives on disk, so a reloaded page (or a restarted server) finds every run again:

    RUNS/<name>/job.json        settings, the trainer's argv, pid, launch count, whether Stop was asked
    RUNS/<name>/data/subject/   the instance photos (checked, copied)
    RUNS/<name>/train.log       the trainer's stdout and stderr, all launches appended
    RUNS/<name>/exit.json       the return code of the latest launch (when this server saw it end)
    RUNS/<name>/progress.jsonl  written by the trainer (`started`/`step`/`checkpoint`/`done`/`stopped` lines)

A run's `kind` (job.json; "train" when absent) says which command it is: "train", or "compose" for a composition of
other runs' adapters (`app_backend/composing.py`: `python -m pipelines.compose`, log in compose.log, progress in
search.jsonl). Both are launched, listed, stopped and refused while another job runs the same way, and a finished one
of either kind is an adapter run.

Stop sends SIGUSR1 (the trainer checkpoints at the next step and exits cleanly), then SIGTERM and SIGKILL to
the process group if it has not exited within the timeouts. Resume relaunches the saved argv with
`--resume_from_checkpoint latest`. A run whose folder grows past its disk cap (or fills the runs folder) is
stopped the same way, and says why (`DiskQuota`, app_backend/disk.py). No gradio here: the UI in app.py is
a thin layer over this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from app_backend.disk import DiskQuota
from app_backend.safety import AppInputError, check_images, check_run_name, inside
from app_backend.settings import SUBJECT, TrainSettings, resolve_base_model
from dreamlora.atomic import atomic_write_text
from eval.image_files import FORMAT_SUFFIX
from pipelines.trainer.checkpoints import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "dreamlora" / "train.py"
TRAIN, COMPOSE = "train", "compose"
COMMAND = {TRAIN: [str(TRAIN_SCRIPT)], COMPOSE: ["-m", "pipelines.compose"]}  # after the python interpreter
LOG_FILE = {TRAIN: "train.log", COMPOSE: "compose.log"}
SEARCH_FILE = "search.jsonl"  # a composition's evaluations, one JSON line each (pipelines/compose/outputs.py)


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
    stop_reason: str | None = None  # set when the app, not the user, stopped it (a disk limit)
    ranks_plot: Path | None = None  # ranks.png of a finished run whose method reports ranks per layer
    kind: str = TRAIN

    @property
    def resumable(self) -> bool:
        return self.kind == TRAIN and self.status in ("stopped", "failed")  # a composition is started again instead

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


def kind_of(job: dict) -> str:
    return job.get("kind", TRAIN)  # runs from before compositions have no kind


def log_path(run_dir: Path, job: dict) -> Path:
    return run_dir / LOG_FILE[kind_of(job)]


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

    def __init__(self, runs_dir: Path, python: str = sys.executable, stop_timeouts: tuple[float, float] = (120, 20),
                 quota: DiskQuota | None = None, disk_check_s: float = 10.0):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.python, self.stop_timeouts = python, stop_timeouts
        self.quota = quota or DiskQuota(self.runs_dir)  # no limits unless given (the app gives them)
        self.disk_check_s = disk_check_s
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
        self.create(settings.name, TRAIN, dataclasses.asdict(settings), photos, settings.argv)
        return f"Started {settings.name!r}: {settings.method}, rank {settings.rank}, {settings.steps} steps."

    def create(self, name: str, kind: str, settings: dict, photos: list[Path],
               argv: Callable[[Path], list[str]]) -> Path:
        """A new run folder holding the (checked) photos in data/subject/, its command launched: `argv(run_dir)`
        are the flags of COMMAND[kind]. Refused while another job runs, for a name in use, or past a disk limit;
        a refused run leaves no folder."""
        with self._lock:
            self._refuse_if_busy()
            run_dir = self.run_dir(name)
            if run_dir.exists():
                raise AppInputError(f"A run called {name!r} exists already: pick another name, or "
                                    "resume it from the Runs list.")
            self.quota.check(run_dir, adding=sum(Path(p).stat().st_size for p in photos))
            data = run_dir / "data" / SUBJECT
            data.mkdir(parents=True)
            for i, photo in enumerate(photos):
                with Image.open(photo) as im:
                    suffix = FORMAT_SUFFIX[im.format]  # check_images accepted only these formats
                shutil.copyfile(photo, data / f"photo-{i:03d}{suffix}")
            job = {"name": name, "kind": kind, "created": time.time(), "settings": settings, "argv": argv(run_dir),
                   "launches": 0, "stop_requested": False}
            self._launch(run_dir, job, job["argv"])
        return run_dir

    def resume(self, name: str) -> str:
        with self._lock:
            run_dir = self.existing(name)
            if self.kind(name) == COMPOSE:
                raise AppInputError(f"{name!r} is a composition: it cannot be resumed; compose again under a new "
                                    "name.")
            status = self.progress(name).status
            if status == "running":
                raise AppInputError(f"{name!r} is running already.")
            if status == "finished":
                raise AppInputError(f"{name!r} finished all its steps; start a new run to train longer.")
            self._refuse_if_busy()
            self.quota.check(run_dir)
            job = read_json(run_dir / "job.json")
            job["stop_requested"], job["stop_reason"] = False, None
            self._launch(run_dir, job, [*job["argv"], "--resume_from_checkpoint", "latest"])
        return f"Resumed {name!r} from its latest checkpoint."

    def _refuse_if_busy(self) -> None:
        busy = self.active()
        if busy:
            raise AppInputError(f"Run {busy!r} is {self.doing(busy)}: one GPU job at a time. Stop it or wait for it to "
                                "finish.")

    def kind(self, name: str) -> str:
        return kind_of(read_json(self.runs_dir / name / "job.json"))

    def doing(self, name: str) -> str:
        """What a running run does, in words: "training" or "composing"."""
        return "composing" if self.kind(name) == COMPOSE else "training"

    def _launch(self, run_dir: Path, job: dict, argv: list[str]) -> None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        (run_dir / "exit.json").unlink(missing_ok=True)
        with open(log_path(run_dir, job), "a", encoding="utf-8") as log:
            log.write(f"\n=== launch {job['launches'] + 1} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
            log.flush()
            proc = subprocess.Popen([self.python, *COMMAND[kind_of(job)], *argv], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
                                    start_new_session=True)
        job.update(pid=proc.pid, launches=job["launches"] + 1, launched=time.time())
        atomic_write_text(run_dir / "job.json", json.dumps(job, indent=1))
        self._procs[job["name"]] = proc
        threading.Thread(target=self._reap, args=(run_dir, proc, job["launches"]), daemon=True).start()
        threading.Thread(target=self._watch_disk, args=(job["name"], proc), daemon=True).start()

    def _watch_disk(self, name: str, proc: subprocess.Popen) -> None:
        """Stop the run (with a checkpoint, as Stop does) once it passes a disk limit; the reason is kept."""
        run_dir = self.runs_dir / name
        while proc.poll() is None:
            reason = self.quota.over(run_dir)
            if reason:
                job = read_json(run_dir / "job.json")
                job["stop_reason"] = f"stopped by the app: {reason}"
                atomic_write_text(run_dir / "job.json", json.dumps(job, indent=1))
                with open(log_path(run_dir, job), "a", encoding="utf-8") as log:
                    log.write(f"\n=== {job['stop_reason']} ===\n")
                self.stop(name)
                return
            time.sleep(self.disk_check_s)

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
        exit_code = read_json(run_dir / "exit.json").get("returncode")
        if kind_of(job) == COMPOSE:  # the command writes its adapter last, just before it exits
            if exit_code == 0 and self.has_adapter(name):
                return "finished"
            return "stopped" if job.get("stop_requested") else "failed"
        ends = [r["event"] for r in records if r.get("event") in ("started", "done", "stopped")]
        last = ends[-1] if ends else None
        if last == "done" and exit_code in (None, 0):
            return "finished"
        if job.get("stop_requested"):
            return "stopped"
        if exit_code not in (None, 0):
            return "failed"
        return "stopped" if last == "stopped" else "failed"  # stopped: e.g. `kill -USR1` by hand

    def progress(self, name: str, log_lines: int = 6) -> Progress:
        run_dir = self.existing(name)
        job = read_json(run_dir / "job.json")
        if kind_of(job) == COMPOSE:
            return self._composition_progress(run_dir, job, log_lines)
        records = read_progress_records(run_dir / "progress.jsonl")
        losses: dict[int, float] = {}
        p = Progress(name, self.status(name, records))
        for r in records:
            if r.get("event") == "step":
                losses[r["step"]] = r["loss"]
                p.step, p.total, p.eta_s = r["step"], r.get("total"), r.get("eta_s")
            elif r.get("event") in ("started", "done", "stopped"):
                p.step, p.total = r.get("step", p.step), r.get("total", p.total)
        p.total = p.total or job.get("settings", {}).get("steps")
        p.losses = sorted(losses.items())
        p.validation = sorted((run_dir / "validation").glob("step-*.png"))
        p.ranks_plot = run_dir / "ranks.png" if (run_dir / "ranks.png").is_file() else None
        p.checkpoints = [step for step, _ in list_checkpoints(run_dir)]
        p.log_tail = tail(run_dir / "train.log", log_lines)
        p.stop_reason = job.get("stop_reason") if p.status == "stopped" else None
        return p

    def _composition_progress(self, run_dir: Path, job: dict, log_lines: int) -> Progress:
        """A composition in the Runs list and the Train panel: evaluations as steps, objectives as the loss."""
        evaluations = read_progress_records(run_dir / SEARCH_FILE)
        p = Progress(run_dir.name, self.status(run_dir.name, []), kind=COMPOSE, step=len(evaluations),
                     total=job.get("settings", {}).get("budget"))
        p.losses = [(e["index"] + 1, e["objective"]) for e in evaluations]
        p.log_tail = tail(log_path(run_dir, job), log_lines)
        p.stop_reason = job.get("stop_reason") if p.status == "stopped" else None
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
        """What SIGUSR1 did: a checkpoint and a clean exit; a clean exit whose last checkpoint is older (the
        trainer can miss the signal's checkpoint when it arrives during a preview); or, before the trainer's
        first step (while it loads models or makes class images), an exit with nothing to save."""
        if kind_of(read_json(run_dir / "job.json")) == COMPOSE:
            return "stopped (a composition keeps no checkpoint: compose again to search anew)"
        ends = [r for r in read_progress_records(run_dir / "progress.jsonl") if r.get("event") in
                ("started", "stopped", "done")]
        if not ends or ends[-1]["event"] != "stopped":
            return "stopped before its first step (nothing to save; Resume starts it again)"
        step = ends[-1]["step"]
        saved = [c.name.split("-", 1)[1] for c in run_dir.glob("checkpoint-*")]
        last = max((int(n) for n in saved if n.isdigit()), default=None)
        if last == step:
            return f"saved a checkpoint at step {step} and stopped"
        where = f"its last checkpoint is step {last}" if last else "it has no checkpoint yet"
        return f"stopped at step {step} (adapter saved); {where}, where Resume continues"

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
    kept = [line if len(line) <= 150 else line[:147] + "..." for line in shown if line.strip()]
    return "\n".join(kept[-lines:])
