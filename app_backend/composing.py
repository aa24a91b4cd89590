"""The Compose view's work: learn weights that mix the adapters of past runs for a new subject from a few photos
(LoRAHub-style, gradient-free), as a `python -m pipelines.compose` subprocess into its own run folder:

    RUNS/<name>/job.json        "kind": "compose", the settings (sources, prompt, rule, budget, seed), argv, pid
    RUNS/<name>/data/subject/   the photos (checked, copied)
    RUNS/<name>/compose.log     the command's stdout and stderr
    RUNS/<name>/exit.json       its return code
    RUNS/<name>/search.jsonl    one line per evaluation, appended by the command: what the progress reads
    RUNS/<name>/unet_adapter.safetensors, run.json ("weights"), search.png   written when it finishes

`JobManager` launches and follows it like a training (kind "compose"), so it is listed, can be stopped, holds the
one GPU slot, and once finished is an adapter run like a trained one: the Sample, Evaluate and Compare tabs take it.
Its token, class and resolution are kept as a training's are, for DreamBench and scoring. No gradio here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from app_backend.jobs import COMPOSE, SEARCH_FILE, JobManager, kind_of, read_json, read_progress_records, tail
from app_backend.safety import AppInputError, check_images, check_run_name, number
from app_backend.sampling import Sampler
from app_backend.settings import CLASS_NOUN, SUBJECT, TOKEN

RULES = {"updates": "the exact ΔW = Σ wᵢ·ΔWᵢ (any methods and ranks)",
         "factors": "LoRAHub's A = Σ wᵢAᵢ, B = Σ wᵢBᵢ (same layers and ranks)"}
MAX_BUDGET = 1000


@dataclass
class ComposeSettings:
    """What the Compose tab asks for; `validate` refuses bad values (and unusable sources) before anything is
    written, and takes the base model and resolution from the sources."""

    name: str
    sources: list[str]  # runs with an adapter
    token: str = "sks"
    class_noun: str = "toy"
    instance_prompt: str = ""  # default: "a photo of {token} {class_noun}"
    rule: str = "updates"
    budget: int = 20
    seed: int = 0
    base_model: str = ""  # the sources' (they must share one)
    resolution: int = 512  # the first source's training resolution
    method: str = ""  # what the Runs list shows: "compose:<rule>"

    def validate(self, jobs: JobManager) -> ComposeSettings:
        self.name = check_run_name(self.name)
        if not TOKEN.fullmatch(self.token or ""):
            raise AppInputError(f"Identifier {self.token!r}: 1-24 letters or digits, e.g. sks.")
        if not CLASS_NOUN.fullmatch(self.class_noun or ""):
            raise AppInputError(f"Class {self.class_noun!r}: a plain noun such as toy or backpack.")
        self.instance_prompt = (self.instance_prompt or "").strip() or f"a photo of {self.token} {self.class_noun}"
        if self.rule not in RULES:
            raise AppInputError(f"Rule {self.rule!r}: one of {', '.join(RULES)}.")
        self.sources = checked_sources(jobs, self.sources)
        # the search scores the base, the uniform mix and each source alone before it explores
        self.budget = number(self.budget, "Budget", len(self.sources) + 2, MAX_BUDGET)
        self.seed = number(self.seed, "Seed", 0, 2**32 - 1)
        self.base_model, self.resolution = shared_base(jobs, self.sources)
        self.method = f"compose:{self.rule}"
        check_composable(jobs, self.sources, self.rule)
        return self

    def argv(self, jobs: JobManager, run_dir: Path) -> list[str]:
        """The command's flags, as a user would type them."""
        args = ["--pretrained_model_name_or_path", self.base_model]
        for source in self.sources:
            args += ["--adapter", str(jobs.run_dir(source))]
        return args + ["--instance_data_dir", str(run_dir / "data" / SUBJECT), "--instance_prompt",
                       self.instance_prompt, "--resolution", str(self.resolution), "--rule", self.rule, "--budget",
                       str(self.budget), "--seed", str(self.seed), "--output_dir", str(run_dir), "--report_to", "none"]


def checked_sources(jobs: JobManager, sources: list[str] | None) -> list[str]:
    """Existing runs with an adapter, each once; at least one."""
    sources = [s.strip() for s in sources or [] if s and s.strip()]
    if not sources:
        raise AppInputError("Pick at least one past run whose adapter goes into the mix.")
    twice = sorted({s for s in sources if sources.count(s) > 1})
    if twice:
        raise AppInputError(f"Run {twice[0]!r} is picked twice: each source once.")
    for source in sources:
        jobs.existing(source)
        if not jobs.has_adapter(source):
            raise AppInputError(f"Run {source!r} has no adapter yet: it is written when a run finishes or stops.")
    return sources


def shared_base(jobs: JobManager, sources: list[str]) -> tuple[str, int]:
    """The base model all sources were trained on (a mix only fits that base), and the first one's resolution."""
    settings = [jobs.settings(s) for s in sources]
    bases = {s.get("base_model") for s in settings}
    if len(bases) > 1 or None in bases:
        found = ", ".join(f"{n}: {s.get('base_model')}" for n, s in zip(sources, settings, strict=True))
        raise AppInputError(f"The sources must share one base model to be mixed; they were trained on {found}.")
    return bases.pop(), int(settings[0].get("resolution", 512))


def check_composable(jobs: JobManager, sources: list[str], rule: str) -> None:
    """The command's own library check (methods the rule takes, the same components under "factors"), run here
    so a mix it would refuse is refused in the page, before a run folder exists. It reads file headers only."""
    from dreamlora.errors import ArgError, DataError
    from pipelines.compose.library import resolve_all

    try:
        resolve_all([str(jobs.run_dir(s)) for s in sources], rule)
    except (ArgError, DataError) as e:
        folders = {str(jobs.run_dir(s)): s for s in sources}
        message = str(e)
        for folder, source in folders.items():  # name the runs, not the server's paths
            message = message.replace(folder, source)
        raise AppInputError(f"These runs cannot be composed by the {rule} rule: {message}") from None


def start(jobs: JobManager, settings: ComposeSettings, photos: list[Path], labels: list[str] | None = None) -> str:
    """Check everything, then launch the composition into RUNS/<name>/ (refused while another job runs)."""
    settings.validate(jobs)
    photos = check_images(photos, labels)
    jobs.create(settings.name, COMPOSE, dataclasses.asdict(settings), photos,
                lambda run_dir: settings.argv(jobs, run_dir))
    return (f"Started composing {settings.name!r} from {', '.join(settings.sources)} ({settings.rule} rule, "
            f"{settings.budget} evaluations).")


def compositions(jobs: JobManager) -> list[str]:
    """Composition runs, newest first."""
    return [name for name in jobs.names() if jobs.kind(name) == COMPOSE]


@dataclass
class CompositionProgress:
    """A composition as the Compose panel shows it, read from its folder."""

    name: str
    status: str
    budget: int
    sources: list[str]
    objectives: list[float] = field(default_factory=list)  # per evaluation, in order
    weights: dict[str, float] = field(default_factory=dict)  # source -> weight: of the best evaluation so far
    log_tail: str = ""

    @property
    def evaluations(self) -> int:
        return len(self.objectives)

    @property
    def best(self) -> float | None:
        finite = [o for o in self.objectives if math.isfinite(o)]
        return min(finite) if finite else None

    def best_so_far(self) -> list[float]:
        """The falling curve: the lowest objective after each evaluation."""
        out, low = [], math.inf
        for value in self.objectives:
            low = min(low, value) if math.isfinite(value) else low
            out.append(low)
        return out

    def summary(self) -> str:
        best = f" · best objective {self.best:.4f}" if self.best is not None else ""
        return f"{self.name}: {self.status} · evaluation {self.evaluations}/{self.budget}{best}"


def composition(jobs: JobManager, name: str) -> dict:
    """The job of a composition run; any other run is refused."""
    job = read_json(jobs.existing(name) / "job.json")
    if kind_of(job) != COMPOSE:
        raise AppInputError(f"Run {name!r} is a training run, not a composition.")
    return job


def progress(jobs: JobManager, name: str, log_lines: int = 6) -> CompositionProgress:
    job = composition(jobs, name)
    run_dir = jobs.run_dir(name)
    settings = job["settings"]
    evaluations = read_progress_records(run_dir / SEARCH_FILE)
    p = CompositionProgress(name, jobs.status(name, []), settings["budget"], settings["sources"],
                            [e["objective"] for e in evaluations])
    p.weights = found_weights(run_dir, settings["sources"], evaluations)
    p.log_tail = tail(run_dir / "compose.log", log_lines)
    return p


def found_weights(run_dir: Path, sources: list[str], evaluations: list[dict]) -> dict[str, float]:
    """Source run -> weight: the composed adapter's (run.json, keyed by the folders as given, in the sources'
    order) once written, else the best evaluation's so far."""
    written = read_json(run_dir / "run.json").get("weights")
    if written:
        return dict(zip(sources, written.values(), strict=True))
    finite = [e for e in evaluations if math.isfinite(e["objective"])]
    if not finite:
        return {}
    return dict(zip(sources, min(finite, key=lambda e: e["objective"])["weights"], strict=True))


def sample_beside_sources(jobs: JobManager, sampler: Sampler, name: str, prompt: str, seed: int = 0,
                          steps: int = 20) -> list[tuple[Path, str]]:
    """One image from the finished composition and one from each source alone (scale 1), with the same prompt
    and seed: (image, caption naming the run and its weight in the mix)."""
    p = progress(jobs, name, log_lines=0)
    if p.status != "finished":
        raise AppInputError(f"Composition {name!r} is {p.status}: its adapter is sampled once it has finished.")
    size = int(jobs.settings(name).get("resolution", 512))
    shown = []
    for run, caption in [(name, f"{name} (composed)"),
                         *[(s, f"{s} · weight {p.weights.get(s, 0.0):+.3f}") for s in p.sources]]:
        _, files = sampler.sample(jobs.settings(name)["base_model"], [(run, 1.0)], prompt, seed=seed, num_images=1,
                                  steps=steps, size=size)
        shown.append((files[0], caption))
    return shown
