"""The app as a real server for tests: `python app.py` in-process on a free port, a temporary runs folder and
the session's tiny model as the base."""

from __future__ import annotations

import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
# gradio 6.31's event analytics call pandas options that pandas 3 deprecates; not ours to fix
GRADIO_PANDAS_NOISE = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
                       pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "app"  # screenshots; git-ignored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(runs_dir: Path, base_model: Path, max_queue: int = 32, extra: list[str] | None = None):
    """Yields (url, demo); the server runs in this process's threads and is closed after. `extra`: more of
    app.py's flags (e.g. --auth)."""
    sys.path.insert(0, str(ROOT))
    import app

    port = free_port()
    args = app.parse_args(["--runs_dir", str(runs_dir), "--base_model", str(base_model), "--port", str(port),
                           "--max_queue", str(max_queue), *(extra or [])])
    demo, _ = app.launch(args, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()
        stop_leftover_trainers(runs_dir)


def stop_leftover_trainers(runs_dir: Path) -> None:
    """A failed test must not leave a 2000-step trainer running in its own session after pytest ends."""
    from app_backend.jobs import JobManager

    jobs = JobManager(runs_dir, stop_timeouts=(5, 2))
    for name in jobs.names():
        if jobs.is_running(name):
            jobs.stop(name)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def train_source_runs(runs_dir: Path, base_model: Path, subjects: tuple[str, ...] = ("dog", "backpack"),
                      steps: int = 10) -> Path:
    """Finished app runs named after `subjects` (their photos in tests/assets), trained one after the other through
    the app's JobManager on the tiny model: adapters to compose. Copy them into a test's runs folder with
    `copy_runs`."""
    from app_backend.jobs import JobManager
    from app_backend.settings import TrainSettings

    jobs = JobManager(runs_dir)
    for subject in subjects:
        photos = sorted(p for p in (ASSETS / subject).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        jobs.start(TrainSettings(name=subject, base_model=str(base_model), class_noun=subject, steps=steps,
                                 learning_rate=1e-3, resolution=64, checkpointing_steps=1000), photos[:3])
        wait_for(lambda s=subject: jobs.progress(s).status != "running", 300, f"the {subject} run to finish")
        assert jobs.progress(subject).status == "finished", jobs.progress(subject).log_tail
    return runs_dir


def copy_runs(template: Path, runs_dir: Path) -> list[str]:
    """The finished runs of `template` copied into `runs_dir` (a run's folder is all of its state)."""
    import shutil

    names = [p.name for p in Path(template).iterdir() if (p / "job.json").is_file()]
    for name in names:
        shutil.copytree(Path(template) / name, Path(runs_dir) / name)
    return names
