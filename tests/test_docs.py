"""Every § citation of the method spec resolves to a heading of docs/method.md, and those headings are unique."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC_NAME = "docs/method.md"
SPEC = ROOT / SPEC_NAME
SCANNED_DIRS = ("epg", "tests", "configs", "benchmarks", "notebooks")
SCANNED_FILES = ("README.md", "Makefile")
SUFFIXES = {".py", ".yaml", ".md", ".ipynb"}
CITATION = re.compile(r"(?:METHOD|method)\.md §(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^(#+)\s+(.*?)\s*$")
NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?\s")


def scanned_files() -> list[Path]:
    """The files whose citations must resolve: sources, configs, notebooks, Makefiles and the README."""
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for folder in SCANNED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and (path.suffix in SUFFIXES or path.name == "Makefile"):
                files.append(path)
    return files


def citations() -> list[tuple[str, str]]:
    """(section number, "file:line") of every citation in the scanned files, a trailing dot stripped."""
    found = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), start=1):
            for match in CITATION.finditer(line):
                found.append((match.group(1).rstrip("."), f"{path.relative_to(ROOT)}:{lineno}"))
    return found


def headings() -> list[str]:
    """The text of every Markdown heading of the spec, outside fenced code blocks."""
    titles, fenced = [], False
    for line in SPEC.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = HEADING.match(line)
        if match and not fenced:
            titles.append(match.group(2))
    return titles


def section_numbers() -> list[str]:
    """Section numbers of the numbered headings ("## 3. Stage 1 ..." gives "3", "### 3.6 Losses" gives "3.6")."""
    return [m.group(1) for title in headings() if (m := NUMBERED.match(title + " "))]


def test_the_spec_exists_and_citations_are_found():
    assert SPEC.is_file(), f"{SPEC_NAME} is missing: code comments cite its sections"
    assert citations(), "no § citation of the method spec found in the tree: is the scanner looking in the right place?"


def test_every_citation_resolves_to_a_heading():
    numbers = set(section_numbers())
    unresolved = [(number, where) for number, where in citations() if number not in numbers]
    listing = "\n".join(f"  §{number} at {where}" for number, where in unresolved)
    assert not unresolved, (
        f"{len(unresolved)} citation(s) name no heading of {SPEC_NAME} "
        f"(add a heading '#+ N Title' or fix the citation):\n{listing}"
    )


def test_headings_are_unique():
    titles = Counter(headings())
    numbers = Counter(section_numbers())
    repeated = [f"heading {title!r} x{count}" for title, count in titles.items() if count > 1]
    repeated += [f"section number {number} x{count}" for number, count in numbers.items() if count > 1]
    assert not repeated, f"{SPEC_NAME} repeats headings: " + "; ".join(repeated)
