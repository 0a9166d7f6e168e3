"""The operator docs stay true to the code: commands parse, fields exist, files and links resolve."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from pydantic import BaseModel

from zenfed.cli import build_parser
from zenfed.spec import JobSpec, ProjectSpec, SitePolicy

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("architecture.md", "operator-guide.md", "threat-model.md")
_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
_LINK = re.compile(r"\]\(([^)#\s]+\.md)?(?:#([^)\s]+))?\)")


def _text(name: str) -> str:
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


def _commands(text: str) -> list[str]:
    lines = []
    for block in _FENCE.findall(text):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("zenfed "):
                lines.append(line)
    return lines


def _slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _field_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


@pytest.mark.parametrize("doc", DOCS)
def test_every_shown_command_parses(doc):
    # Prepare
    commands = _commands(_text(doc))

    # Execute / Assert: argparse exits on an unknown command or option.
    for line in commands:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert callable(args.handler), line
    if doc == "operator-guide.md":
        assert len(commands) >= 8


@pytest.mark.parametrize(
    ("model", "doc"),
    [(JobSpec, "operator-guide.md"), (SitePolicy, "operator-guide.md"), (ProjectSpec, "operator-guide.md")],
)
def test_every_spec_field_is_documented(model, doc):
    # Prepare
    text = _text(doc)

    # Execute
    missing = [path for path in _field_paths(model) if path.split(".")[-1] not in text]

    # Assert
    assert not missing, f"{doc} does not mention {missing}"


def test_files_named_in_the_docs_exist():
    # Prepare
    named = set()
    for doc in DOCS:
        named |= set(re.findall(r"`(src/zenfed/[\w/.-]*\w)", _text(doc)))

    # Execute
    missing = sorted(p for p in named if not (ROOT / p).exists())

    # Assert
    assert len(named) > 20
    assert not missing


@pytest.mark.parametrize("doc", DOCS)
def test_links_and_anchors_resolve(doc):
    # Prepare
    text = _text(doc)

    # Execute
    broken = []
    for target, anchor in _LINK.findall(text):
        path = ROOT / "docs" / target if target else ROOT / "docs" / doc
        if not path.is_file():
            broken.append(target)
        elif anchor and anchor not in _anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{target or doc}#{anchor}")

    # Assert
    assert not broken
