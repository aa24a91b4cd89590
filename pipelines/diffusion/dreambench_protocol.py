"""The DreamBench protocol (DreamBooth paper §4.1): 30 subjects, 25 prompts each.

Objects get 20 recontextualisations and 5 property prompts; live subjects (cats and dogs) get 10
recontextualisations, 10 accessorisations and 5 property prompts. Prompts are the dataset's templates filled
with a unique token and the subject's class noun. The table and templates ship with the package
(`dreambench_data/prompts_and_classes.txt`, CC BY 4.0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "dreambench_data" / "prompts_and_classes.txt"
LIVE_CLASSES = {"cat", "dog"}
_TEMPLATE = re.compile(r"^'(?P<template>.*)'\.format\(unique_token, class_token\),?$")


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str

    @property
    def live(self) -> bool:
        return self.class_noun in LIVE_CLASSES


@dataclass(frozen=True)
class Protocol:
    subjects: dict[str, Subject]
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]

    def templates(self, subject: Subject) -> tuple[str, ...]:
        return self.live_templates if subject.live else self.object_templates

    def prompts(self, subject: Subject, token: str = "sks") -> list[str]:
        """The 25 generation prompts: the identifier token, then the class noun."""
        return [t.format(token, subject.class_noun) for t in self.templates(subject)]

    def clip_t_prompts(self, subject: Subject, token: str = "sks", keep_identifier: bool = False) -> list[str]:
        """The prompts CLIP-T compares each image with; by default without the identifier, which is not a
        word CLIP knows (the paper leaves this open, so the choice is recorded with the scores)."""
        if keep_identifier:
            return self.prompts(subject, token)
        return [" ".join(t.format("", subject.class_noun).split()) for t in self.templates(subject)]


def load_protocol(path: Path = DATA) -> Protocol:
    subjects: dict[str, Subject] = {}
    templates: dict[str, list[str]] = {"Object Prompts": [], "Live Subject Prompts": []}
    section = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line in ("Classes", "Prompts", *templates):
            section = line
        elif section == "Classes" and "," in line and line != "subject_name,class":
            name, noun = (part.strip() for part in line.split(",", 1))
            subjects[name] = Subject(name, noun)
        elif section in templates and (match := _TEMPLATE.match(line)):
            templates[section].append(match["template"])
    protocol = Protocol(subjects, tuple(templates["Object Prompts"]), tuple(templates["Live Subject Prompts"]))
    if not subjects or len(protocol.object_templates) != 25 or len(protocol.live_templates) != 25:
        raise ValueError(f"{path}: expected a class table and 25 object + 25 live templates")
    return protocol
