"""The README's and the docs' pages, and the commands and Python blocks they hold (read by
the tests that run them as written)."""

import re
import shlex
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
README = ROOT / "README.md"
# The README first: the docs' examples use the victim and runs that its commands make.
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]

# Hours at full scale (minutes for detection and audit), or work on the repository's results
# (records): their options must parse here; each runs at toy scale in its own tests.
PARSE_ONLY = {
    "bench",
    "tune",
    "tradeoff",
    "detection",
    "art-peer",
    "input-size",
    "gradient-alignment",
    "records",
    "audit",
}
# Commands that pass the options they do not know on to `megex bench`.
FORWARDS_TO_BENCH = {"input-size"}
# Commands whose progress bars --quiet turns off.
QUIET = {"attack", "train-victim", "demo"}


def blocks(language: str, page: Path = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def megex_lines(pages: list[Path]) -> list[str]:
    """The `megex ...` lines of the pages' bash blocks, in order; a repeated line once."""
    lines: list[str] = []
    for page in pages:
        for block in blocks("bash", page):
            for line in block.splitlines():
                line = line.strip()
                if line.startswith("megex ") and line not in lines:
                    lines.append(line)
    return lines


def command(line: str) -> str:
    return shlex.split(line)[1]


def runnable_lines() -> list[str]:
    return [line for line in megex_lines(PAGES) if command(line) not in PARSE_ONLY]


def parse_only_lines() -> list[str]:
    return [line for line in megex_lines(PAGES) if command(line) in PARSE_ONLY]


def python_blocks() -> list[tuple[str, str]]:
    """(where, code) of every python block in the pages; a repeated block once."""
    seen: list[str] = []
    found = []
    for page in PAGES:
        for index, block in enumerate(blocks("python", page)):
            if block not in seen:
                seen.append(block)
                found.append((f"{page.relative_to(ROOT)} python block {index}", block))
    return found
