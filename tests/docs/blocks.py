"""The code blocks of the README and the docs pages, as a reader sees them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
SHELL = ("bash", "console", "sh", "shell")
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository: README.md, docs/x.md
    language: str
    text: str

    @property
    def commands(self) -> list[str]:
        """The commands a reader types: a console block's `$ ` lines (with their `\\`
        continuations), or every line of a bash block."""
        if self.language != "console":
            return [self.text]
        found: list[str] = []
        lines = iter(self.text.splitlines())
        for line in lines:
            if not line.startswith("$ "):
                continue
            command = line[2:]
            while command.endswith("\\"):
                command += "\n" + next(lines)
            found.append(command)
        return found

    @property
    def first_command(self) -> str:
        return self.commands[0].strip().splitlines()[0] if self.commands else ""


def blocks(language: tuple[str, ...] | str | None = None) -> list[Block]:
    wanted = (language,) if isinstance(language, str) else language
    found = []
    for page in PAGES:
        for match in _FENCE.finditer(page.read_text()):
            if wanted is None or match.group(1) in wanted:
                found.append(Block(str(page.relative_to(REPO)), match.group(1), match.group(2)))
    return found


def block(page: str, starting: str, containing: str = "") -> Block:
    """The one shell block of `page` whose first command starts with `starting` (and whose
    text contains `containing`)."""
    (found,) = [
        b
        for b in blocks(SHELL)
        if b.page == page and b.first_command.startswith(starting) and containing in b.text
    ]
    return found
