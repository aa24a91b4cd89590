"""The adapters to compose, as given by `--adapter`: a DreamBooth output folder (`unet_adapter.safetensors`, and
`text_encoder_adapter.safetensors` when the text encoder was trained, with SDXL's `text_encoder_2_adapter.safetensors`
beside it), one native UNet adapter file, or a
text-classifier output folder (`adapter.safetensors`, `head.safetensors`, `run.json` with its labels).

Each is checked before anything is computed or written, with one error naming the adapter: a file that is no
dreamlora adapter (never unpickled), a method composition does not take (or not by the rule asked), a base other
than the one given (the fingerprint in the file's metadata; a file written before fingerprints were recorded is
checked by its shapes only, with a warning), and for classifiers a label set other than the examples'.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import dreamlora
from dreamlora.compose import CompositionError, check_method
from dreamlora.errors import ArgError, DataError
from dreamlora.io import base_mismatch, read_metadata

log = logging.getLogger("dreamlora.compose")

IMAGE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ADAPTER, TEXT_HEAD = "adapter.safetensors", "head.safetensors"


@dataclass
class LibraryAdapter:
    label: str  # as given on the command line: run.json's weights are keyed by it
    task: str  # "image" or "text"
    files: dict[str, Path]  # component ("unet", "text_encoder", "model") -> native adapter file
    metadata: dict[str, dict] = field(default_factory=dict)
    head: Path | None = None
    labels: list[str] | None = None
    note: str | None = None

    @property
    def method(self) -> str:
        return next(iter(self.metadata.values()))["method"]

    def describe(self) -> dict:
        config = json.loads(next(iter(self.metadata.values()))["config"])
        return {"adapter": self.label, "method": self.method, "rank": config["rank"],
                "components": sorted(self.files), **({"note": self.note} if self.note else {})}


def resolve(label: str) -> LibraryAdapter:
    path = Path(label)
    if path.is_dir():
        image = {c: path / f"{c}_adapter.safetensors" for c in IMAGE_COMPONENTS}
        image = {c: f for c, f in image.items() if f.is_file()}
        if "unet" in image:
            adapter = LibraryAdapter(label, "image", image)
        elif (path / TEXT_ADAPTER).is_file() and (path / TEXT_HEAD).is_file() and (path / "run.json").is_file():
            run = _read_run(path / "run.json", label)
            adapter = LibraryAdapter(label, "text", {"model": path / TEXT_ADAPTER}, head=path / TEXT_HEAD,
                                     labels=[str(x) for x in run.get("labels", [])])
        else:
            raise DataError(f"--adapter {label!r}: neither a DreamBooth output (unet_adapter.safetensors) nor a "
                            f"text-classifier output ({TEXT_ADAPTER}, {TEXT_HEAD}, run.json)")
    elif path.is_file():
        adapter = LibraryAdapter(label, "image", {"unet": path})
    else:
        raise DataError(f"--adapter {label!r} does not exist")
    for component, file in adapter.files.items():
        try:
            meta = read_metadata(file)
        except ValueError as e:
            raise DataError(f"--adapter {label!r}: {e}") from None
        if meta.get("format") != "dreamlora" or "method" not in meta:
            raise DataError(f"--adapter {label!r}: {file.name} was not written by dreamlora (a diffusers or kohya "
                            "file holds no method or config to compose by): give the training output folder")
        adapter.metadata[component] = meta
    return adapter


def _read_run(path: Path, label: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"--adapter {label!r}: {path.name} is not valid JSON ({e})") from None


def resolve_all(labels: list[str], rule: str) -> list[LibraryAdapter]:
    if not labels:
        raise ArgError("--adapter: give at least one adapter to compose")
    if len(set(labels)) != len(labels):
        raise ArgError(f"--adapter: {sorted({x for x in labels if labels.count(x) > 1})} given more than once")
    library = [resolve(label) for label in labels]
    tasks = {a.task for a in library}
    if len(tasks) > 1:
        raise DataError("--adapter: image adapters (DreamBooth outputs) and classifier adapters cannot be composed "
                        f"together: {[(a.label, a.task) for a in library]}")
    for adapter in library:
        try:
            adapter.note = check_method(adapter.method, rule, f"--adapter {adapter.label!r}")
        except CompositionError as e:
            raise ArgError(str(e)) from None
    if rule == "factors":
        components = {a.label: sorted(a.files) for a in library}
        if len({tuple(c) for c in components.values()}) > 1:
            raise ArgError(f"--rule factors needs the same adapted components in every adapter, got {components}; "
                           "use --rule updates")
    return library


def check_labels(library: list[LibraryAdapter], labels: list[str], flag: str, path: str) -> None:
    for adapter in library:
        if sorted(adapter.labels or []) != sorted(labels):
            raise DataError(f"{flag} {path} has the labels {sorted(labels)} but --adapter {adapter.label!r} was "
                            f"trained on {sorted(adapter.labels or [])}: composition mixes classifier heads, so "
                            "every adapter and the examples need the same label set")


def attach(models: dict, library: list[LibraryAdapter], base: str) -> list[str]:
    """Load every adapter onto its component under its own name (`lib0`, `lib1`, ...); check each against the base's
    fingerprint. Returns the names."""
    for adapter in library:  # before any is loaded: an SDXL run's second encoder on an SD base
        for component in adapter.files:
            if component not in models:
                raise DataError(f"--adapter {adapter.label!r} has a {component} adapter and {base!r} has no "
                                f"{component}: it was trained on SDXL, which this base is not")
    names = []
    for i, adapter in enumerate(library):
        name = f"lib{i}"
        for component, file in adapter.files.items():
            model = models[component]
            try:
                dreamlora.load(model, file, name=name)
            except ValueError as e:
                raise DataError(f"--adapter {adapter.label!r} does not fit {base!r}: {e}") from None
            reason = base_mismatch(model, name, adapter.metadata[component])
            if reason is not None:
                raise DataError(f"--adapter {adapter.label!r} was trained on another base than {base!r}: {reason}")
            if "base_fingerprint" not in adapter.metadata[component]:
                log.warning("--adapter %r: %s records no base fingerprint (written before they were); only its "
                            "shapes were checked against %r", adapter.label, file.name, base)
        names.append(name)
    return names
