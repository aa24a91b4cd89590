"""`python app.py`: dreamlora in a browser. Train an adapter on your photos, watch it learn, stop and resume
it, try prompts, compare methods, and compose past adapters for a new subject, without typing an accelerate command.

    python app.py                       # http://127.0.0.1:7860, the embedded tiny model, runs in ./runs/app
    python app.py --base_model tiny-sdxl    # the embedded tiny SDXL model (tiny-sd2: SD 2.x); the page picks too
    python app.py --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 --runs_dir /data/runs --port 8080
    python app.py --host 0.0.0.0 --auth_file logins.txt   # beyond this machine: logins required

Shared (`--share`) or listening beyond this machine, the app asks for a login (`--auth USER:PASSWORD`, or
`--auth_file` with one USER:PASSWORD a line) and refuses to start without one unless `--no_auth` says so. It
serves only what the page shows (copies in RUNS/_served/), never the uploaded photos, logs or checkpoints, and
caps the disk each run and all runs may use (`--max_run_gb`, `--max_total_gb`).

UI only. The work is done by the `app_backend` package, without gradio, which calls the same commands and
functions a user would: `app_backend/jobs.py` (training subprocesses: start, follow, stop, resume, list),
`app_backend/composing.py` (the Compose tab: `python -m pipelines.compose` runs mixing past runs' adapters),
`app_backend/settings.py` (the Train form as trainer flags; the base model), `app_backend/safety.py` (run
names, uploads, paths, what is served), `app_backend/disk.py` (disk limits), `app_backend/sampling.py` and
`app_backend/scoring.py`.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from app_backend import composing  # noqa: E402
from app_backend.disk import GB, MIN_FREE_BYTES, DiskQuota  # noqa: E402
from app_backend.jobs import JobManager, format_seconds  # noqa: E402
from app_backend.safety import MAX_IMAGE_BYTES, MAX_IMAGES, SERVED, AppInputError, publish  # noqa: E402
from app_backend.sampling import Sampler  # noqa: E402
from app_backend.scoring import (  # noqa: E402
    SCORE_COLUMNS,
    SCORERS,
    EvalSettings,
    Evaluator,
    default_scorer,
    scorer_status,
)
from app_backend.settings import TINY_LABELS, TrainSettings, native_resolution  # noqa: E402
from dreamlora.methods import METHODS  # noqa: E402
from dreamlora.options import option_specs, unique_specs  # noqa: E402

ROOT = Path(__file__).resolve().parent
GPU = "gpu"  # the one concurrency id of every handler that uses the GPU
ADAPTER_SLOTS = 4
RUN_COLUMNS = ["run", "status", "method", "rank", "step", "last checkpoint", "resumable", "adapter"]
WEIGHT_COLUMNS = ["source run", "weight"]
INTRO = """# dreamlora
Teach a Stable Diffusion model your subject from a few photos, then try prompts and compare methods.

1. **Train**: add 3-20 photos, pick a method, press *Start training*, and watch the loss and the preview images.
2. **Sample**: pick trained runs (several at once, each with its own strength) and write a prompt.
3. **Evaluate / Compare**: score runs on the DreamBench prompts and see methods side by side.
4. **Compose**: mix the adapters of past runs for a new subject from a few photos (weights found by a gradient-free
   search, as LoRAHub does), then sample the mix beside its sources."""


def refused(fn):
    """Input the app refuses is shown to the user as a message, never as a traceback."""
    @functools.wraps(fn)  # keeps the parameter names, which name the API's parameters
    def wrapper(*args):
        try:
            return fn(*args)
        except AppInputError as e:
            raise gr.Error(str(e), title="Refused") from None
    return wrapper


class App:
    """The handlers; each is a thin call into the job, sampling or evaluation module."""

    def __init__(self, runs_dir: Path, base_model: str, allow_server_folders: bool, quota: DiskQuota | None = None):
        self.jobs = JobManager(runs_dir, quota=quota)
        self.quota = self.jobs.quota
        self.sampler, self.evaluator = Sampler(self.jobs), Evaluator(self.jobs)
        self.base_model, self.allow_server_folders = base_model, allow_server_folders
        self.scorer_status = scorer_status()  # which scorer works on this machine, checked once

    def check_base(self, base_model: str) -> str:
        """Shared or listening beyond this machine, the base model is the server's: a visitor cannot make it
        download a hub model or read a folder of its choosing."""
        base_model = (base_model or "").strip() or "tiny"
        if not self.allow_server_folders and base_model != self.base_model:
            raise AppInputError(f"The base model is fixed to {self.base_model!r} while the app is shared.")
        return base_model

    def free_gpu(self) -> None:
        self.sampler.release()
        self.evaluator.release()

    def refuse_while_training(self) -> None:
        busy = self.jobs.active()
        if busy:
            raise AppInputError(f"Run {busy!r} is {self.jobs.doing(busy)} and has the GPU (one GPU job at a time): "
                                "stop it or wait for it to finish.")

    # --- train ---------------------------------------------------------------------------------------------
    def photos(self, files: list | None, folder: str | None) -> tuple[list[Path], list[str]]:
        files = [Path(f) for f in files or []]
        folder = (folder or "").strip()
        if folder:
            if not self.allow_server_folders:
                raise AppInputError("Picking a folder on the server is off when the app is shared or listens beyond "
                                    "this machine; upload the photos instead.")
            from dreamlora.errors import DataError
            from pipelines.diffusion.data import list_images

            try:
                files += list_images(Path(folder).expanduser(), "The folder")
            except DataError as e:
                raise AppInputError(str(e)) from None
        return files, [f.name for f in files]

    def train(self, name, base_model, files, folder, token, class_noun, instance_prompt, method, rank, steps,
              learning_rate, prior, class_prompt, num_class_images, text_encoder, resolution, validation_prompt,
              validation_steps, checkpointing_steps, seed, *method_options):
        """Start a training run; returns a message and the run picker set to the new run. `method_options` are
        the method-option fields (`option_fields`), in the order of `unique_specs(METHODS.values())`."""
        self.refuse_while_training()
        photos, labels = self.photos(files, folder)
        settings = TrainSettings(name=name, base_model=self.check_base(base_model), token=token, class_noun=class_noun,
                                 instance_prompt=instance_prompt, method=method, rank=rank, steps=steps,
                                 learning_rate=learning_rate, prior_preservation=bool(prior), class_prompt=class_prompt,
                                 num_class_images=num_class_images, train_text_encoder=bool(text_encoder),
                                 resolution=resolution, validation_prompt=validation_prompt or "",
                                 validation_steps=validation_steps, checkpointing_steps=checkpointing_steps, seed=seed,
                                 method_options=dict(zip(option_flags(), method_options, strict=True)))
        settings.validate()
        self.free_gpu()
        message = self.jobs.start(settings, photos, labels)
        return message, gr.update(choices=self.jobs.names(), value=settings.name)

    def stop(self, name):
        """Ask the run to save a checkpoint and exit (SIGUSR1), escalating to SIGTERM and SIGKILL."""
        if not name:
            raise AppInputError("Pick a run to stop.")
        return self.jobs.stop(name)

    def resume(self, name):
        """Continue a stopped or failed run from its latest checkpoint, with its saved settings."""
        if not name:
            raise AppInputError("Pick a run to resume.")
        self.refuse_while_training()
        self.free_gpu()
        return self.jobs.resume(name)

    def progress(self, name):
        """Step/total, ETA, the loss curve, validation images and the log tail of a run."""
        if not name:
            hint = "Pick a run above to follow it." if self.jobs.names() else \
                "No run yet: set one up on the left and press *Start training*."
            return hint, loss_frame([]), [], "", gr.update(value=None, visible=False)
        p = self.jobs.progress(name)
        eta = f" · ETA {format_seconds(p.eta_s)}" if p.status == "running" and p.eta_s is not None else ""
        loss = f" · loss {p.losses[-1][1]:.4f}" if p.losses else ""
        ckpt = f" · last checkpoint: step {p.checkpoints[-1]}" if p.checkpoints else ""
        why = f" · {p.stop_reason}" if p.stop_reason else ""
        headline = f"**{name}** · {p.status} · step {p.step}/{p.total or '?'}{eta}{loss}{ckpt}{why}"
        gallery = [(str(self.served(f)), f.stem.replace("step-", "step ")) for f in p.validation[-8:]]
        # the rank per layer of a finished run whose method reports one (AdaLoRA's final ranks, ReLoRA's effective)
        ranks = gr.update(value=str(self.served(p.ranks_plot)), visible=True) if p.ranks_plot else \
            gr.update(value=None, visible=False)
        return headline, loss_frame(p.losses), gallery, p.log_tail, ranks

    def served(self, path: Path) -> Path:
        """The copy of a file the page shows, in the one folder the server serves."""
        return publish(self.jobs.runs_dir, path)

    def download(self, name):
        """The run's finished adapter files: dreamlora's own (`--adapter RUN_DIR`) and the exports for other tools."""
        if not name:
            raise AppInputError("Pick a run to download its adapter.")
        run_dir = self.jobs.existing(name)
        if not self.jobs.has_adapter(name):
            raise AppInputError(f"Run {name!r} has no adapter yet: it is written when the run finishes or stops.")
        return [str(self.served(f)) for f in sorted(run_dir.glob("*.safetensors"))]

    def runs(self):
        """Every run with its status (running / finished / stopped / failed) and whether it can be resumed."""
        return table_frame(self.jobs.table(), RUN_COLUMNS)

    def poll(self, name, seen):
        """The Timer: refresh the Running panel only when the run's files changed (cheap for idle pages)."""
        names = self.jobs.names()
        if name not in names:  # nothing picked yet, or a name typed by hand that is no run
            name = self.jobs.active() or None
        signature = self.signature(name)
        if signature == seen:
            return (gr.skip(),) * 8
        return (*self.progress(name), self.runs(), gr.update(choices=names, value=name), signature)

    def signature(self, name) -> tuple:
        if not name:
            return (None, tuple(self.jobs.names()))
        run_dir = self.jobs.runs_dir / name
        stats = [(run_dir / f).stat().st_mtime_ns if (run_dir / f).exists() else 0
                 for f in ("progress.jsonl", "job.json", "exit.json", "train.log", "ranks.png", "search.jsonl")]
        return (name, self.jobs.is_running(name), *stats, tuple(self.jobs.names()))

    def on_load(self):
        """A new or reloaded page: pick up the running run (or the newest) and fresh choices everywhere."""
        names = self.jobs.names()
        current = self.jobs.active() or (names[0] if names else None)
        adapters = self.adapter_runs()
        return (gr.update(choices=names, value=current), *self.progress(current), self.runs(),
                *[gr.update(choices=[""] + adapters) for _ in range(ADAPTER_SLOTS)],
                gr.update(choices=adapters), gr.update(choices=self.sampler.folders()), gr.update(choices=adapters),
                gr.update(choices=adapters), suggest_name(names), suggest_name(names, "mix"))

    def adapter_runs(self) -> list[str]:
        return [n for n in self.jobs.names() if self.jobs.has_adapter(n)]

    def refresh_choices(self):
        adapters = self.adapter_runs()
        return (*[gr.update(choices=[""] + adapters) for _ in range(ADAPTER_SLOTS)], gr.update(choices=adapters),
                gr.update(choices=self.sampler.folders()), gr.update(choices=adapters), gr.update(choices=adapters))

    # --- sample / evaluate / compare -------------------------------------------------------------------------
    def sample(self, base_model, adapter_1, scale_1, adapter_2, scale_2, adapter_3, scale_3, adapter_4, scale_4,
               prompt, negative_prompt, seed, num_images, steps, guidance, size):
        """Images from the base model plus up to four adapters (run, scale); returns the gallery and the files."""
        self.refuse_while_training()
        self.quota.check()
        adapters = [(adapter_1, scale_1), (adapter_2, scale_2), (adapter_3, scale_3), (adapter_4, scale_4)]
        out, files = self.sampler.sample(self.check_base(base_model), adapters, prompt, negative_prompt, seed,
                                         num_images, steps, guidance, size)
        caption = prompt if len(prompt) < 60 else prompt[:57] + "..."
        files = [self.served(f) for f in files]
        gallery = [(str(f), f"{caption} (seed {int(seed) + k})") for k, f in enumerate(files)]
        return gallery, [str(f) for f in files], f"{len(files)} images in {out.relative_to(self.jobs.runs_dir)}"

    def check_disk(self, runs) -> None:
        for name in runs or []:
            self.quota.check(self.jobs.run_dir(name))
        self.quota.check()

    def evaluate(self, runs, folders, max_prompts, images_per_prompt, steps, seed, scorer):
        """DreamBench generation for the runs, scoring (runs and sample folders), the table and the plot."""
        self.refuse_while_training()
        self.check_disk(runs)
        settings = EvalSettings(max_prompts, images_per_prompt, steps, seed, scorer)
        rows, plot = self.evaluator.evaluate(list(runs or []), list(folders or []), settings)
        return table_frame(rows, SCORE_COLUMNS), str(self.served(plot)), \
            f"Scored {len(rows)} with the {scorer!r} scorer."

    def compare(self, runs, max_prompts, images_per_prompt, steps, seed, scorer):
        """One subject, several methods: an image grid per prompt and the score/params/time/memory table."""
        self.refuse_while_training()
        self.check_disk(runs)
        settings = EvalSettings(max_prompts, images_per_prompt, steps, seed, scorer)
        grids, rows, plot = self.evaluator.compare(list(runs or []), settings)
        gallery = [(str(self.served(g)), p) for g, p in grids]
        return gallery, table_frame(rows, SCORE_COLUMNS), str(self.served(plot)), f"{len(runs)} runs side by side."


    # --- compose --------------------------------------------------------------------------------------------
    def compose(self, name, sources, files, folder, token, class_noun, prompt, rule, budget, seed):
        """Start a composition of past runs' adapters for a new subject; returns a message and the composition
        picker set to it."""
        self.refuse_while_training()
        photos, labels = self.photos(files, folder)
        settings = composing.ComposeSettings(name=name, sources=list(sources or []), token=token,
                                             class_noun=class_noun, instance_prompt=prompt, rule=rule, budget=budget,
                                             seed=seed).validate(self.jobs)
        self.free_gpu()
        message = composing.start(self.jobs, settings, photos, labels)
        return message, gr.update(choices=composing.compositions(self.jobs), value=settings.name)

    def compose_progress(self, name):
        """Evaluation i/budget and the best objective, the objective per evaluation, the weights, the log tail."""
        if not name:
            hint = "Pick a composition above to follow it." if composing.compositions(self.jobs) else \
                "No composition yet: pick past runs and photos on the left and press *Compose*."
            return hint, objective_frame([], []), gr.update(value=table_frame([], WEIGHT_COLUMNS)), ""
        p = composing.progress(self.jobs, name)
        best = f" · best objective {p.best:.4f}" if p.best is not None else ""
        headline = f"**{name}** · {p.status} · evaluation {p.evaluations}/{p.budget}{best}"
        rows = [{"source run": s, "weight": round(w, 4)} for s, w in p.weights.items()]
        label = "Weights found" if p.status == "finished" else "Weights of the best evaluation so far"
        return (headline, objective_frame(p.objectives, p.best_so_far()),
                gr.update(value=table_frame(rows, WEIGHT_COLUMNS), label=label), p.log_tail)

    def compose_poll(self, name, seen):
        """The Compose tab's Timer: as `poll`, for the picked (else the running, else the newest) composition."""
        names = composing.compositions(self.jobs)
        if name not in names:
            active = self.jobs.active()
            name = active if active in names else (names[0] if names else None)
        signature = self.compose_signature(name, names)
        if signature == seen:
            return (gr.skip(),) * 6
        return (*self.compose_progress(name), gr.update(choices=names, value=name), signature)

    def compose_signature(self, name, names) -> tuple:
        if not name:
            return (None, tuple(names))
        run_dir = self.jobs.runs_dir / name
        stats = [(run_dir / f).stat().st_mtime_ns if (run_dir / f).exists() else 0
                 for f in ("search.jsonl", "job.json", "exit.json", "compose.log", "run.json")]
        return (name, self.jobs.is_running(name), *stats, tuple(names))

    def compose_sample(self, name, prompt, seed):
        """One image from the composition and one from each source alone, the same prompt and seed, captioned
        with the run and its weight."""
        self.refuse_while_training()
        self.quota.check()
        if not name:
            raise AppInputError("Pick a composition to sample.")
        settings = composing.composition(self.jobs, name)["settings"]
        prompt = (prompt or "").strip() or settings["instance_prompt"]
        steps = 20 if settings["resolution"] <= 64 else 30
        shown = composing.sample_beside_sources(self.jobs, self.sampler, name, prompt, seed, steps)
        gallery = [(str(self.served(f)), caption) for f, caption in shown]
        return gallery, f"{len(shown)} images of {prompt!r} (seed {int(seed)}): the composition, then each source."


def method_choices() -> list[tuple[str, str]]:
    """The method picker: each registered method with its one-line description."""
    return [(cls.description or name, name) for name, cls in METHODS.items()]


def option_flags() -> list[str]:
    return [spec.flag for spec in unique_specs(METHODS.values())]


def option_fields(picker: gr.Radio) -> list:
    """One text field per method option (generated from the methods' option dataclasses), shown only while
    its method is picked; empty means the method's default."""
    own = {spec.flag for spec in option_specs(METHODS[picker.value])}
    fields = [gr.Textbox("", label=spec.flag, info=spec.help, visible=spec.flag in own,
                         placeholder=f"default: {spec.trainer_default}") for spec in unique_specs(METHODS.values())]
    picker.change(show_options, picker, fields, api_visibility="private", queue=False, show_progress="hidden")
    return fields


def show_options(method: str) -> list:
    own = {spec.flag for spec in option_specs(METHODS[method])}
    return [gr.update(visible=flag in own) for flag in option_flags()]


def preview_prompts(token: str, class_noun: str):
    """The prompts' defaults follow the identifier and class as they are typed."""
    return (gr.update(placeholder=f"a photo of {token} {class_noun} (default)"),
            f"a photo of {token} {class_noun} on the beach")


def loss_frame(losses: list[tuple[int, float]], points: int = 500):
    """The loss curve; a long run is averaged into `points` bins (the page redraws it every second)."""
    import pandas as pd

    if len(losses) > points:
        width = -(-len(losses) // points)
        losses = [(chunk[-1][0], sum(v for _, v in chunk) / len(chunk))
                  for chunk in (losses[i:i + width] for i in range(0, len(losses), width))]
    frame = pd.DataFrame(losses or [], columns=["step", "loss"])
    return frame.astype({"step": "int64", "loss": "float64"})  # numbers, or the plot's axes turn categorical


def objective_frame(objectives: list[float], best_so_far: list[float]):
    """A composition's search: each evaluation's objective and the falling best so far, as two curves."""
    import pandas as pd

    curves = (("objective", objectives), ("best so far", best_so_far))
    # gradio 6.31 fixes a plot's series (its colour scale) when it first draws it and only swaps the data after:
    # each curve is named from the start by a row without a value, which the plot skips
    rows = [(1, math.nan, curve) for curve, _ in curves]
    rows += [(i, value, curve) for curve, values in curves for i, value in enumerate(values, 1) if math.isfinite(value)]
    frame = pd.DataFrame(rows, columns=["evaluation", "objective", "curve"])
    return frame.astype({"evaluation": "int64", "objective": "float64"})


def table_frame(rows: list[dict], columns: list[str] | None = None):
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def suggest_name(names: list[str], prefix: str = "run") -> str:
    n = len(names) + 1
    while f"{prefix}-{n}" in names:
        n += 1
    return f"{prefix}-{n}"


def build(runs_dir: Path, base_model: str = "tiny", allow_server_folders: bool = True,
          quota: DiskQuota | None = None) -> gr.Blocks:
    app = App(runs_dir, base_model, allow_server_folders, quota)
    with gr.Blocks(title="dreamlora") as demo:
        gr.Markdown(INTRO)
        base = gr.Dropdown(base_choices(base_model), value=base_model, label="Base model",
                           allow_custom_value=True, interactive=allow_server_folders,
                           info="an embedded tiny model (SD 1.x, SD 2.x or SDXL; random weights: to try the app in "
                                "seconds), or type a local diffusers folder or a hub id such as "
                                "stable-diffusion-v1-5/stable-diffusion-v1-5")
        with gr.Tab("Train"):
            train_tab(app, base)
        with gr.Tab("Sample"):
            sample_tab(app, base)
        with gr.Tab("Evaluate"):
            evaluate_tab(app)
        with gr.Tab("Compare"):
            compare_tab(app)
        with gr.Tab("Compose"):
            compose_tab(app)
        wire_load(app, demo)
    return demo


def base_choices(base_model: str) -> list[tuple[str, str]]:
    """The base-model picker's entries (label, value): the embedded tiny models, then the server's default when it is
    a folder or hub id."""
    choices = [(f"{label} ({name})", name) for name, label in TINY_LABELS.items()]
    return choices if base_model in TINY_LABELS else [(base_model, base_model), *choices]


def train_tab(app: App, base) -> None:
    """The Train tab: the setup form, the running run's panel, the runs table; its components are kept in
    `app.train_components` (the page's load handler fills them)."""
    c = app.train_components = {}
    with gr.Row():
        with gr.Column(scale=5):
            train_setup(app, base, c)
        with gr.Column(scale=6):
            train_panel(c)
    gr.Markdown("### Runs")
    c["runs"] = gr.Dataframe(table_frame([], RUN_COLUMNS), interactive=False, wrap=True)
    wire_train(app, base, c)


def train_setup(app: App, base, c: dict) -> None:
    """The training form: photos, subject, method and the main settings; the rest under "More settings"."""
    gr.Markdown("### Setup")
    c["name"] = gr.Textbox("run-1", label="Run name", info="letters, digits, . _ - (a folder in the runs dir)")
    c["files"] = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                         label=f"Photos of your subject (3-20 is typical; at most {MAX_IMAGES}, "
                               f"{MAX_IMAGE_BYTES // 2**20} MB each)")
    c["folder"] = gr.Textbox(label="…or a folder of photos on this machine",
                             placeholder="/path/to/photos", visible=app.allow_server_folders)
    with gr.Row():
        c["token"] = gr.Textbox("sks", label="Identifier", info="a rare word that will mean your subject")
        c["class_noun"] = gr.Textbox("dog", label="Class", info="what it is: dog, backpack, clock…")
    c["instance_prompt"] = gr.Textbox(label="Instance prompt", placeholder="a photo of sks dog (default)")
    c["method"] = gr.Radio(method_choices(), value="lora", label="Method")
    with gr.Row():
        c["rank"] = gr.Number(4, label="Rank", precision=0, minimum=1, maximum=256)
        c["steps"] = gr.Number(400, label="Steps", precision=0, minimum=1)
        c["lr"] = gr.Number(1e-4, label="Learning rate")
    with gr.Row():
        c["prior"] = gr.Checkbox(False, label="Prior preservation", info="also learn from class images")
        c["text_encoder"] = gr.Checkbox(False, label="Train the text encoder too")
    with gr.Accordion("More settings", open=False):
        more_train_settings(base, c)
    c["start"] = gr.Button("Start training", variant="primary")
    c["message"] = gr.Markdown()


def more_train_settings(base, c: dict) -> None:
    with gr.Row():
        c["class_prompt"] = gr.Textbox(label="Class prompt", placeholder="a photo of dog (default)")
        c["num_class_images"] = gr.Number(50, label="Class images", precision=0, minimum=1)
    with gr.Row():
        c["resolution"] = gr.Number(native_resolution(base.value), label="Resolution", precision=0)
        base.change(lambda value: gr.update(value=native_resolution(value)), base, c["resolution"],
                    show_progress="hidden")
        c["seed"] = gr.Number(0, label="Seed", precision=0)
    c["validation_prompt"] = gr.Textbox("a photo of sks dog on the beach", label="Preview prompt",
                                        info="drawn every 'preview every' steps; empty: no previews")
    with gr.Row():
        c["validation_steps"] = gr.Number(100, label="Preview every (steps)", precision=0, minimum=1)
        c["checkpointing_steps"] = gr.Number(100, label="Checkpoint every (steps)", precision=0, minimum=1)
    c["options"] = option_fields(c["method"])


def train_panel(c: dict) -> None:
    """The picked run: its controls, status line, loss curve, preview images, files and log."""
    gr.Markdown("### Running")
    with gr.Row():
        c["run"] = gr.Dropdown([], label="Run", allow_custom_value=True, scale=3)
        c["stop"] = gr.Button("Stop (save a checkpoint)", variant="stop", scale=1)
        c["resume"] = gr.Button("Resume", scale=1)
        c["download"] = gr.Button("Download adapter", scale=1)
    c["headline"] = gr.Markdown(elem_id="run-status")
    c["loss"] = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=240)
    c["validation"] = gr.Gallery(label="Preview images (validation prompt)", columns=4, height=220)
    c["ranks"] = gr.Image(label="Rank per layer (AdaLoRA: final rank; ReLoRA: effective rank of the merged update)",
                          type="filepath", height=320, visible=False)
    c["adapter_files"] = gr.File(label="Adapter files (load with --adapter, or dreamlora.load)",
                                 file_count="multiple", visible=True, height=90)
    c["log"] = gr.Textbox(label="Trainer log (last lines; all of it in RUNS/<run>/train.log)", lines=8,
                          max_lines=8, autoscroll=True)


def wire_train(app: App, base, c: dict) -> None:
    """The Train tab's events: the API endpoints (train, stop, resume, download, progress, runs), the prompt
    previews and the one-second poll of the picked run."""
    seen = gr.State(None)
    inputs = [c["name"], base] + [c[k] for k in (
        "files", "folder", "token", "class_noun", "instance_prompt", "method", "rank", "steps", "lr", "prior",
        "class_prompt", "num_class_images", "text_encoder", "resolution", "validation_prompt", "validation_steps",
        "checkpointing_steps", "seed")] + c["options"]
    for field in (c["token"], c["class_noun"]):
        field.input(preview_prompts, [c["token"], c["class_noun"]], [c["instance_prompt"], c["validation_prompt"]],
                    api_visibility="private", queue=False, show_progress="hidden")
    c["start"].click(refused(app.train), inputs, [c["message"], c["run"]], api_name="train", concurrency_id=GPU,
                     concurrency_limit=1)
    c["stop"].click(refused(app.stop), c["run"], c["message"], api_name="stop", concurrency_limit=4)
    c["resume"].click(refused(app.resume), c["run"], c["message"], api_name="resume", concurrency_id=GPU,
                      concurrency_limit=1)
    c["download"].click(refused(app.download), c["run"], c["adapter_files"], api_name="download",
                        concurrency_limit=4)
    panel = [c["headline"], c["loss"], c["validation"], c["log"], c["ranks"]]
    c["run"].input(refused(app.progress), c["run"], panel, api_name="progress", concurrency_limit=None)
    gr.Button("Refresh runs", size="sm").click(app.runs, None, c["runs"], api_name="runs", concurrency_limit=None)
    timer = gr.Timer(1.0)
    timer.tick(app.poll, [c["run"], seen], [*panel, c["runs"], c["run"], seen], api_visibility="private",
               show_progress="hidden", concurrency_limit=None)


def sample_tab(app: App, base) -> None:
    c = app.sample_components = {}
    gr.Markdown("Pick trained runs (empty slots are skipped) and how strongly each applies, then write a prompt.")
    slots = []
    with gr.Row():
        for i in range(ADAPTER_SLOTS):
            with gr.Column(min_width=160):
                slots.append(gr.Dropdown([""], value="", label=f"Adapter {i + 1}", elem_id=f"adapter-{i + 1}",
                                          allow_custom_value=True))
                slots.append(gr.Slider(-1, 2, value=1.0, step=0.05, label="Scale"))
    c["slots"] = slots
    prompt = gr.Textbox("a photo of sks dog on the beach", label="Prompt")
    negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0)
        num = gr.Slider(1, 8, value=2, step=1, label="Images")
        steps = gr.Slider(1, 150, value=20 if native_resolution(base.value) <= 64 else 30, step=1, label="Steps")
        guidance = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance")
        size = gr.Dropdown([64, 128, 256, 512, 768, 1024], value=native_resolution(base.value), label="Size")
        base.change(lambda value: gr.update(value=native_resolution(value)), base, size, show_progress="hidden")
    go = gr.Button("Generate", variant="primary")
    gallery = gr.Gallery(label="Images", columns=4, height=320, buttons=["download", "download_all", "fullscreen"],
                         elem_id="sample-gallery")
    files = gr.File(label="Downloads", file_count="multiple")
    message = gr.Markdown()
    go.click(refused(app.sample), [base, *slots, prompt, negative, seed, num, steps, guidance, size],
             [gallery, files, message], api_name="sample", concurrency_id=GPU, concurrency_limit=1)


def eval_settings(app: App):
    with gr.Row():
        prompts = gr.Slider(1, 25, value=4, step=1, label="DreamBench prompts", info="of 25; fewer is quicker")
        per = gr.Slider(1, 8, value=1, step=1, label="Images per prompt", info="the paper uses 4")
        steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps")
        seed = gr.Number(0, label="Seed", precision=0)
    status = app.scorer_status
    info = " · ".join(f"{key}: {'works here' if works else 'not available here'} ({why})"
                      for key, (works, why) in status.items())
    scorer = gr.Radio([(text, key) for key, text in SCORERS.items()], value=default_scorer(status), label="Scorer",
                      info=info)
    return [prompts, per, steps, seed, scorer]


def evaluate_tab(app: App) -> None:
    c = app.eval_components = {}
    gr.Markdown("Generate the DreamBench prompts with each run (reused if done before), score subject fidelity "
                "(DINO, CLIP-I) and prompt fidelity (CLIP-T) against the run's own photos, and tabulate.")
    with gr.Row():
        c["runs"] = gr.Dropdown([], multiselect=True, label="Runs", allow_custom_value=True)
        c["folders"] = gr.Dropdown([], multiselect=True, label="…and/or sample folders (from the Sample tab)",
                                   allow_custom_value=True)
    settings = eval_settings(app)
    go = gr.Button("Evaluate", variant="primary")
    message = gr.Markdown()
    table = gr.Dataframe(table_frame([], SCORE_COLUMNS), interactive=False, wrap=True, label="Scores")
    plot = gr.Image(label="Subject fidelity (DINO) against prompt fidelity (CLIP-T)", type="filepath", height=380)
    go.click(refused(app.evaluate), [c["runs"], c["folders"], *settings], [table, plot, message], api_name="evaluate",
             concurrency_id=GPU, concurrency_limit=1)


def compare_tab(app: App) -> None:
    c = app.compare_components = {}
    gr.Markdown("Several methods on one subject: the same prompts and seeds, a row of images per prompt, and "
                "what each cost (trainable parameters, training time, peak memory) beside its scores.")
    c["runs"] = gr.Dropdown([], multiselect=True, label="Runs of one subject (two or more)",
                                allow_custom_value=True)
    settings = eval_settings(app)
    go = gr.Button("Compare", variant="primary")
    message = gr.Markdown()
    grids = gr.Gallery(label="One grid per prompt (columns: runs)", columns=2, height="auto", object_fit="contain",
                       elem_id="compare-grids")
    table = gr.Dataframe(table_frame([], SCORE_COLUMNS), interactive=False, wrap=True, label="Scores and costs")
    plot = gr.Image(label="DINO against CLIP-T", type="filepath", height=380)
    go.click(refused(app.compare), [c["runs"], *settings], [grids, table, plot, message], api_name="compare",
             concurrency_id=GPU, concurrency_limit=1)


def compose_tab(app: App) -> None:
    """The Compose tab: past runs and a few photos of a new subject in, a composition run out, followed like a
    training; its components are kept in `app.compose_components`."""
    c = app.compose_components = {}
    gr.Markdown("Mix the adapters of past runs for a new subject: a gradient-free search (nevergrad, as LoRAHub) "
                "finds the weights whose mix best denoises a few photos of it. The result is a run like any other: "
                "sample, evaluate and compare it.")
    with gr.Row():
        with gr.Column(scale=5):
            compose_setup(app, c)
        with gr.Column(scale=6):
            compose_panel(c)
    wire_compose(app, c)


def compose_setup(app: App, c: dict) -> None:
    c["name"] = gr.Textbox("mix-1", label="Composition name", info="letters, digits, . _ - (a folder in the runs dir)")
    c["sources"] = gr.Dropdown([], multiselect=True, label="Adapters to mix (past runs)", elem_id="compose-sources",
                               info="runs with an adapter, trained on the same base model")
    c["files"] = gr.File(file_count="multiple", file_types=["image"], type="filepath", elem_id="compose-files",
                         label=f"A few photos of the new subject (at most {MAX_IMAGES}, "
                               f"{MAX_IMAGE_BYTES // 2**20} MB each)")
    c["folder"] = gr.Textbox(label="…or a folder of photos on this machine", placeholder="/path/to/photos",
                             visible=app.allow_server_folders)
    with gr.Row():
        c["token"] = gr.Textbox("sks", label="Identifier", info="the word for the new subject in the prompt")
        c["class_noun"] = gr.Textbox("toy", label="Class", info="what it is: toy, dog, backpack…")
    c["prompt"] = gr.Textbox(label="Prompt of the photos", placeholder="a photo of sks toy (default)")
    c["rule"] = gr.Radio([(f"{rule}: {text}", rule) for rule, text in composing.RULES.items()], value="updates",
                         label="Rule")
    with gr.Row():
        c["budget"] = gr.Number(20, label="Budget (evaluations)", precision=0, minimum=3, maximum=composing.MAX_BUDGET,
                                info="the base, the even mix and each source alone count in it")
        c["seed"] = gr.Number(0, label="Seed", precision=0, minimum=0)
    c["start"] = gr.Button("Compose", variant="primary")
    c["message"] = gr.Markdown()


def compose_panel(c: dict) -> None:
    gr.Markdown("### Composition")
    c["run"] = gr.Dropdown([], label="Composition", allow_custom_value=True)
    c["headline"] = gr.Markdown(elem_id="compose-status")
    c["plot"] = gr.LinePlot(objective_frame([], []), x="evaluation", y="objective", color="curve", height=240,
                            title="Objective per evaluation (loss + L1 penalty)", elem_id="compose-plot")
    c["weights"] = gr.Dataframe(table_frame([], WEIGHT_COLUMNS), interactive=False, label="Weights found",
                                elem_id="compose-weights")
    c["log"] = gr.Textbox(label="Log (last lines; all of it in RUNS/<composition>/compose.log)", lines=5,
                          max_lines=5, autoscroll=True)
    c["sample_prompt"] = gr.Textbox(label="Sample prompt", placeholder="the composition's prompt (default)")
    c["sample"] = gr.Button("Sample the result beside its sources")
    c["gallery"] = gr.Gallery(label="The composition, then each source alone (same prompt and seed)", columns=4,
                              height=240, elem_id="compose-gallery")
    c["sample_message"] = gr.Markdown()


def wire_compose(app: App, c: dict) -> None:
    """The Compose tab's events: the API endpoints (compose, compose_progress, compose_sample) and its poll."""
    seen = gr.State(None)
    inputs = [c[k] for k in ("name", "sources", "files", "folder", "token", "class_noun", "prompt", "rule", "budget",
                             "seed")]
    c["start"].click(refused(app.compose), inputs, [c["message"], c["run"]], api_name="compose", concurrency_id=GPU,
                     concurrency_limit=1)
    panel = [c["headline"], c["plot"], c["weights"], c["log"]]
    c["run"].input(refused(app.compose_progress), c["run"], panel, api_name="compose_progress",
                   concurrency_limit=None)
    c["sample"].click(refused(app.compose_sample), [c["run"], c["sample_prompt"], c["seed"]],
                      [c["gallery"], c["sample_message"]], api_name="compose_sample", concurrency_id=GPU,
                      concurrency_limit=1)
    timer = gr.Timer(1.0)
    timer.tick(app.compose_poll, [c["run"], seen], [*panel, c["run"], seen], api_visibility="private",
               show_progress="hidden", concurrency_limit=None)


def wire_load(app: App, demo: gr.Blocks) -> None:
    t = app.train_components
    choice_outputs = [*app.sample_components["slots"][0::2], app.eval_components["runs"],
                      app.eval_components["folders"], app.compare_components["runs"],
                      app.compose_components["sources"]]
    demo.load(app.on_load, None, [t["run"], t["headline"], t["loss"], t["validation"], t["log"], t["ranks"],
                                  t["runs"], *choice_outputs, t["name"], app.compose_components["name"]],
              api_visibility="private", show_progress="hidden")
    # new adapters appear in the pickers when a run ends; cheap, so on every status change (a training's or a
    # composition's: either may be the one that ended)
    for headline in (t["headline"], app.compose_components["headline"]):
        headline.change(app.refresh_choices, None, choice_outputs, api_visibility="private", show_progress="hidden")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class LaunchError(ValueError):
    """The command line asks for something unsafe or unreadable; the message names the flag."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD", help="a login (repeatable); "
                   "required with --share or a --host beyond this machine")
    p.add_argument("--auth_file", default=None, help="a file of USER:PASSWORD lines (# comments): logins that stay "
                   "off the command line")
    p.add_argument("--no_auth", action="store_true", help="serve a shared or non-loopback app WITHOUT logins: "
                   "anyone who reaches it can train, sample and download")
    p.add_argument("--runs_dir", default=str(ROOT / "runs" / "app"), help="where runs, samples and scores live; the "
                   "app serves only the copies of what the page shows, in RUNS/_served")
    p.add_argument("--base_model", default="tiny", help="default base model: an embedded tiny model (tiny: SD 1.x, "
                   "tiny-sd2, tiny-sdxl), a folder or a hub id")
    p.add_argument("--max_queue", type=int, default=32, help="requests waiting for the GPU beyond this are refused")
    p.add_argument("--max_run_gb", type=float, default=20.0, help="disk one run may use (photos, class images, "
                   "checkpoints, previews, evaluation images); a run that grows past it is stopped (default 20)")
    p.add_argument("--max_total_gb", type=float, default=200.0, help="disk all runs, samples and scores may use; "
                   f"new work is refused past it, or with under {MIN_FREE_BYTES // GB} GB free (default 200)")
    return p.parse_args(argv)


def logins(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--auth and --auth_file as (user, password) pairs; a bad line or file names the flag."""
    lines = [(f"--auth {value.split(':', 1)[0]}:…", value) for value in args.auth]
    if args.auth_file:
        try:
            text = Path(args.auth_file).read_text(encoding="utf-8")
        except OSError as e:
            raise LaunchError(f"--auth_file {args.auth_file!r} cannot be read: {e.strerror or e}") from None
        lines += [(f"--auth_file {args.auth_file}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.lstrip().startswith("#")]
    pairs = []
    for where, line in lines:
        user, sep, password = line.partition(":")
        if not (sep and user.strip() and password):
            raise LaunchError(f"{where}: expected USER:PASSWORD with both parts non-empty")
        pairs.append((user.strip(), password))
    return pairs


def check_access(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """The logins to require; shared or beyond this machine without any, refused unless --no_auth."""
    pairs = logins(args)
    exposed = args.share or not is_loopback(args.host)
    if exposed and not pairs and not args.no_auth:
        where = "--share" if args.share else f"--host {args.host}"
        raise LaunchError(f"{where} lets anyone who reaches the app train, sample and download: give logins with "
                          "--auth USER:PASSWORD or --auth_file FILE, or --no_auth to serve it without any")
    for flag in ("max_run_gb", "max_total_gb"):
        if not getattr(args, flag) > 0:
            raise LaunchError(f"--{flag} must be a positive number of GB, got {getattr(args, flag)}")
    return pairs or None


def launch(args: argparse.Namespace, **kwargs):
    auth = check_access(args)  # before anything listens or is written
    runs_dir = Path(args.runs_dir).resolve()
    local = is_loopback(args.host) and not args.share
    quota = DiskQuota(runs_dir, int(args.max_run_gb * GB), int(args.max_total_gb * GB), MIN_FREE_BYTES)
    demo = build(runs_dir, args.base_model, allow_server_folders=local, quota=quota)
    demo.queue(max_size=args.max_queue)
    served = runs_dir / SERVED
    served.mkdir(parents=True, exist_ok=True)
    return demo, demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                             allowed_paths=[str(served)], max_file_size=MAX_IMAGE_BYTES, footer_links=["api"],
                             **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = check_access(args)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.share or not is_loopback(args.host)) and not auth:
        print(f"warning: {'shared' if args.share else f'listening on {args.host}'} without logins (--no_auth): "
              "anyone who can reach the app can use it", file=sys.stderr)
    launch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
