"""Who gets in: a shared or non-loopback launch without logins refuses to start, logins are enforced, and a
logged-in visitor still cannot fetch photos, logs or checkpoints by URL (tests/test_app.py checks the latter
on its trained runs)."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

import pytest
from app_server import GRADIO_PANDAS_NOISE, ROOT, free_port, serve
from gradio_client import Client

sys.path.insert(0, str(ROOT))
import app  # noqa: E402

pytestmark = GRADIO_PANDAS_NOISE


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("where", [["--host", "0.0.0.0"], ["--host", "192.168.1.5"], ["--share"]])
def test_an_exposed_launch_without_logins_refuses_to_start(where, tmp_path, capsys):
    port, runs = free_port(), tmp_path / "runs"
    argv = [*where, "--runs_dir", str(runs), "--port", str(port)]
    assert app.main(argv) == 2
    err = capsys.readouterr().err
    assert "--auth USER:PASSWORD" in err and "--auth_file" in err and "--no_auth" in err
    with pytest.raises(app.LaunchError, match="lets anyone who reaches the app"):  # launch() itself refuses
        app.launch(app.parse_args(argv), prevent_thread_lock=True, quiet=True)
    assert not listening(port) and not runs.exists()  # nothing served, nothing written


def test_no_auth_must_be_explicit_and_bad_logins_name_their_flag(tmp_path, capsys, monkeypatch):
    launched = []
    monkeypatch.setattr(app, "launch", lambda args, **kw: launched.append(args))
    assert app.main(["--host", "0.0.0.0", "--no_auth"]) == 0 and len(launched) == 1
    assert "without logins (--no_auth)" in capsys.readouterr().err
    assert app.main(["--share", "--auth", "ann:pw"]) == 0 and len(launched) == 2
    logins = tmp_path / "logins.txt"
    logins.write_text("# who may use the app\nann:s3cret:with-colon\n\nbob\n")
    assert app.main(["--host", "0.0.0.0", "--auth_file", str(logins)]) == 2
    assert f"--auth_file {logins}:4: expected USER:PASSWORD" in capsys.readouterr().err
    logins.write_text("# who may use the app\nann:s3cret:with-colon\n")
    assert app.logins(app.parse_args(["--auth_file", str(logins), "--auth", "bob:pw"])) == \
        [("bob", "pw"), ("ann", "s3cret:with-colon")]
    assert app.main(["--host", "0.0.0.0", "--auth_file", str(tmp_path / "missing.txt")]) == 2
    assert "--auth_file" in capsys.readouterr().err and len(launched) == 2
    assert app.main(["--max_total_gb", "0"]) == 2 and "--max_total_gb must be a positive" in capsys.readouterr().err


def test_logins_are_enforced(tmp_path, tiny_model_dir):
    with serve(tmp_path / "runs", tiny_model_dir, extra=["--auth", "ann:s3cret"]) as (url, _):
        def status(path: str) -> int:
            try:
                return urllib.request.urlopen(url + path).status
            except urllib.error.HTTPError as e:
                return e.code

        assert status("config") == 401 and status("gradio_api/info") == 401
        with pytest.raises(Exception):  # noqa: B017 - gradio_client's error for a missing login varies
            Client(url, verbose=False)
        with pytest.raises(Exception):  # noqa: B017
            Client(url, auth=("ann", "wrong"), verbose=False)
        client = Client(url, auth=("ann", "s3cret"), verbose=False)
        assert "/train" in client.view_api(return_format="dict")["named_endpoints"]
        assert "No run yet" in client.predict("", api_name="/progress")[0]
