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
