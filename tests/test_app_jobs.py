"""The app's plain-Python parts, without a server: input checks, run status, and Stop's escalation."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from app_server import ASSETS, wait_for
from PIL import Image

from app_backend.jobs import JobManager, live_group_members, tail
from app_backend.safety import MAX_IMAGES, AppInputError, check_images, check_run_name, inside, number
from app_backend.settings import TrainSettings, native_resolution, resolve_base_model

DOG = sorted(p for p in (ASSETS / "dog").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


@pytest.mark.parametrize("name", ["dog-lora", "Run_2", "a.b", "x" * 64, "7"])
def test_good_run_names(name):
    assert check_run_name(f"  {name} ") == name


@pytest.mark.parametrize("name", ["", "  ", "../x", "a/b", "a\\b", "..", "a..b", ".git", "_samples", "-rf",
                                  "x" * 65, "dog lora", "dög", "a\x00b", "~root", "$(id)"])
def test_bad_run_names_are_refused(name):
    with pytest.raises(AppInputError):
        check_run_name(name)


def test_inside_refuses_escapes_and_symlinks(tmp_path):
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)
    assert inside(root, "a") == (root / "a").resolve()
    for path in ("../x", "/etc/passwd", "link/secret", str(tmp_path / "other")):
        with pytest.raises(AppInputError, match="outside"):
            inside(root, path)


def test_uploads_are_decoded_not_trusted_by_name(tmp_path):
    assert check_images(DOG) == DOG
    fake = tmp_path / "cat.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # a PNG signature and nothing else
    truncated = tmp_path / "half.jpg"
    truncated.write_bytes(DOG[0].read_bytes()[:4000])
    tiny = tmp_path / "dot.png"
    Image.new("RGB", (8, 8)).save(tiny)
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (64, 64)).save(gif)
    for bad, message in [(fake, "not a readable image"), (truncated, "not a readable image"), (tiny, "too small"),
                         (gif, "GIF images are not accepted")]:
        with pytest.raises(AppInputError, match=message):
            check_images([DOG[0], bad])
    with pytest.raises(AppInputError, match="at least one photo"):
        check_images([])
    with pytest.raises(AppInputError, match=f"limit of {MAX_IMAGES}"):
        check_images(DOG * (MAX_IMAGES // len(DOG) + 1))


def test_oversized_upload_is_refused(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(DOG[0].read_bytes())
    with open(big, "ab") as f:
        f.truncate(21 * 2**20)
    with pytest.raises(AppInputError, match="over the 20 MB limit"):
        check_images([big])


def test_form_numbers_are_checked():
    assert number("12", "Steps", 1, 100) == 12 and number(0.5, "Scale", -4, 4, float) == 0.5
    for value in (None, "", "abc", 4.5, float("nan"), 1e400, 101, 0):
        with pytest.raises(AppInputError, match="Steps must be"):
            number(value, "Steps", 1, 100)


def test_settings_are_checked_and_become_trainer_flags(tmp_path):
    s = TrainSettings(name="r", base_model="tiny", method="dora", rank=8, steps=50, prior_preservation=True,
                      validation_prompt="a sks dog", train_text_encoder=True).validate()
    argv = s.argv(tmp_path)
    assert argv[argv.index("--adapter") + 1] == "dora" and argv[argv.index("--instance_prompt") + 1] == \
        "a photo of sks dog"
    assert {"--with_prior_preservation", "--train_text_encoder", "--validation_prompt"} <= set(argv)
    assert argv[argv.index("--class_prompt") + 1] == "a photo of dog"
    for bad in ({"method": "full"}, {"rank": 0}, {"steps": -1}, {"resolution": 100}, {"learning_rate": 5},
                {"token": "a b"}, {"class_noun": "../x"}):
        with pytest.raises(AppInputError):
            TrainSettings(name="r", base_model="tiny", **bad).validate()


def test_the_default_base_model_is_the_embedded_tiny_model_built_once(tmp_path):
    built = Path(resolve_base_model(tmp_path, "tiny"))
    assert built == tmp_path / "_models" / "tiny-sd" and (built / "model_index.json").is_file()
    stamp = (built / "model_index.json").stat().st_mtime_ns
    assert resolve_base_model(tmp_path, "") == str(built)
    assert (built / "model_index.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert resolve_base_model(tmp_path, " some/hub-id ") == "some/hub-id"


def test_native_resolution(tiny_model_dir):
    assert native_resolution("tiny") == 64 and native_resolution(str(tiny_model_dir)) == 64
    assert native_resolution("stable-diffusion-v1-5/stable-diffusion-v1-5") == 512


def test_log_tail_shows_a_progress_bar_once(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("loading\ntraining: 1/9\rtraining: 2/9\rtraining: 9/9\ndone\n")
    assert tail(log, 5) == "loading\ntraining: 9/9\ndone"


def fake_trainer(tmp_path: Path, ignore: str) -> str:
    """A stand-in for python that ignores the given signals: Stop must escalate past them."""
    script = tmp_path / "stubborn-python"
    script.write_text(f"#!/bin/bash\ntrap '' {ignore}\ntouch {tmp_path}/ready\nsleep 60 & wait\nsleep 60 & wait\n"
                      "sleep 60 & wait\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize("ignore, outcome", [("USR1", "terminated (SIGTERM)"), ("USR1 TERM", "killed (SIGKILL)")])
def test_stop_escalates_to_the_process_group(tmp_path, ignore, outcome):
    jobs = JobManager(tmp_path / "runs", python=fake_trainer(tmp_path, ignore), stop_timeouts=(1.0, 1.0))
    jobs.start(TrainSettings(name="stubborn", base_model=str(tmp_path / "model")), DOG[:1])
    wait_for(lambda: (tmp_path / "runs" / "stubborn" / "job.json").is_file(), 10, "job.json")
    pid = json.loads((tmp_path / "runs" / "stubborn" / "job.json").read_text())["pid"]
    assert jobs.is_running("stubborn") and os.getpgid(pid) == pid  # its own process group
    # a second manager (a restarted server) finds the run by its pid and stops it
    restarted = JobManager(tmp_path / "runs", stop_timeouts=(1.0, 1.0))
    wait_for(lambda: restarted.active() == "stubborn", 30, "the pid's command line (set at exec)")
    wait_for(lambda: (tmp_path / "ready").is_file(), 30, "the stand-in to ignore its signals")
    started = time.time()
    assert outcome in restarted.stop("stubborn")
    assert time.time() - started < 15
    assert live_group_members(pid) == []  # the whole group is gone: the sleeps too
    assert restarted.progress("stubborn").status == "stopped" and restarted.progress("stubborn").resumable


def test_stop_before_the_first_step_says_nothing_was_saved(tmp_path):
    script = tmp_path / "slow-start"
    script.write_text("#!/bin/bash\nsleep 60 & wait\n")  # SIGUSR1 ends it, as it ends a trainer still loading
    script.chmod(0o755)
    jobs = JobManager(tmp_path / "runs", python=str(script), stop_timeouts=(10.0, 1.0))
    jobs.start(TrainSettings(name="early", base_model=str(tmp_path)), DOG[:1])
    assert "nothing to save" in jobs.stop("early")
    assert jobs.progress("early").status == "stopped"


def test_stop_reports_the_checkpoint_it_really_has(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    log = run / "progress.jsonl"
    log.write_text('{"event": "started", "step": 0}\n{"event": "stopped", "step": 10}\n')
    assert JobManager._clean_stop_outcome(run) == "saved a checkpoint at step 10 and stopped"
    log.write_text('{"event": "started", "step": 0}\n{"event": "stopped", "step": 12}\n')
    assert "stopped at step 12 (adapter saved); its last checkpoint is step 10" in JobManager._clean_stop_outcome(run)


def test_a_crashed_run_is_failed_and_resumable(tmp_path):
    script = tmp_path / "crash"
    script.write_text("#!/bin/bash\necho boom >&2\nexit 3\n")
    script.chmod(0o755)
    jobs = JobManager(tmp_path / "runs", python=str(script))
    jobs.start(TrainSettings(name="crash", base_model=str(tmp_path)), DOG[:1])
    wait_for(lambda: (tmp_path / "runs" / "crash" / "exit.json").is_file(), 10, "the exit code")
    p = jobs.progress("crash")
    assert p.status == "failed" and p.resumable and "boom" in p.log_tail
    with pytest.raises(AppInputError, match="exists already"):
        jobs.start(TrainSettings(name="crash", base_model=str(tmp_path)), DOG[:1])


def test_only_what_the_page_shows_is_published(tmp_path):
    from app_backend.safety import SERVED, publish

    runs = tmp_path / "runs"
    for rel in ("dog/validation/step-000010-0.png", "dog/data/subject/photo-000.jpg", "dog/train.log",
                "dog/checkpoint-10/model.safetensors", "dog/unet_adapter.safetensors", "_samples/x/0_0.png",
                "_samples/x/run.json", "dog/job.json"):
        (runs / rel).parent.mkdir(parents=True, exist_ok=True)
        (runs / rel).write_bytes(rel.encode())
    preview = publish(runs, runs / "dog/validation/step-000010-0.png")
    assert preview == (runs / SERVED / "dog/validation/step-000010-0.png").resolve()
    assert preview.read_bytes() == b"dog/validation/step-000010-0.png"
    assert publish(runs, runs / "_samples/x/0_0.png").is_file() and publish(runs, runs / "dog/unet_adapter.safetensors")
    for rel in ("dog/data/subject/photo-000.jpg", "dog/train.log", "dog/checkpoint-10/model.safetensors",
                "_samples/x/run.json", "dog/job.json", "dog/validation/../data/subject/photo-000.jpg",
                "dog/checkpoint-10/../../dog/checkpoint-10/model.safetensors"):
        with pytest.raises(ValueError, match="not something the page shows"):
            publish(runs, runs / rel)
    with pytest.raises(ValueError):
        publish(runs, tmp_path / "elsewhere.png")
    # the trainer rewrites a preview (a resumed run passes the same step again): the served copy follows
    (runs / "dog/validation/step-000010-0.png").unlink()
    (runs / "dog/validation/step-000010-0.png").write_bytes(b"new preview")
    assert publish(runs, runs / "dog/validation/step-000010-0.png").read_bytes() == b"new preview"


def test_disk_limits_refuse_new_work(tmp_path):
    from app_backend.disk import DiskQuota, folder_bytes

    runs = tmp_path / "runs"
    photos = sum(p.stat().st_size for p in DOG[:3])
    jobs = JobManager(runs, quota=DiskQuota(runs, run_bytes=photos - 1, total_bytes=10**9))
    with pytest.raises(AppInputError, match=r"Disk full: run 'small' .* limit \(--max_run_gb\)"):
        jobs.start(TrainSettings(name="small", base_model=str(tmp_path / "model")), DOG[:3])
    assert not (runs / "small").exists()
    (runs / "_samples").mkdir()
    (runs / "_samples" / "big.bin").write_bytes(b"\0" * 5000)
    assert folder_bytes(runs) == 5000
    jobs.quota = DiskQuota(runs, run_bytes=10**9, total_bytes=5000 + photos - 1)
    with pytest.raises(AppInputError, match=r"runs folder holds .* limit \(--max_total_gb\)"):
        jobs.start(TrainSettings(name="small", base_model=str(tmp_path / "model")), DOG[:3])
    jobs.quota = DiskQuota(runs, min_free_bytes=10**18)  # more than any disk has free
    with pytest.raises(AppInputError, match="free, under the"):
        jobs.quota.check()


def test_a_run_past_its_disk_cap_is_stopped_and_says_why(tmp_path):
    """A stand-in trainer that writes 100 kB every 0.1 s into its run folder and exits on SIGUSR1 (as the
    trainer does, after its checkpoint): the watcher stops it past the cap, and the run says why."""
    from app_backend.disk import DiskQuota

    script = tmp_path / "filling-python"
    script.write_text("#!/bin/bash\nwhile [ $# -gt 0 ]; do [ \"$1\" = --output_dir ] && out=$2; shift; done\n"
                      "trap 'exit 0' USR1\ni=0\nwhile true; do head -c 100000 /dev/zero > $out/blob-$i; "
                      "i=$((i+1)); sleep 0.1; done\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    runs = tmp_path / "runs"
    photos = sum(p.stat().st_size for p in DOG[:1])
    jobs = JobManager(runs, python=str(script), stop_timeouts=(5.0, 1.0),
                      quota=DiskQuota(runs, run_bytes=photos + 1_000_000), disk_check_s=0.2)
    jobs.start(TrainSettings(name="filling", base_model=str(tmp_path / "model")), DOG[:1])
    wait_for(lambda: jobs.progress("filling").status == "stopped", 30, "the watcher to stop the run")
    p = jobs.progress("filling")
    assert "stopped by the app: run 'filling' holds" in p.stop_reason and "--max_run_gb" in p.stop_reason
    assert len(list((runs / "filling").glob("blob-*"))) < 20  # stopped soon after the cap, not let run on
    assert "stopped by the app" in (runs / "filling" / "train.log").read_text()
    with pytest.raises(AppInputError, match="Disk full"):  # still over: Resume is refused, not relaunched
        jobs.resume("filling")
