"""docs/semantics.md is the rule book the code cites: every ``§N.N.N`` citation, every
"difference N" and every quirk label ``QN`` in the sources must name something it contains."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "semantics.md"
README = ROOT / "README.md"
SCANNED_DIRS = ("jaxhybrid", "tests", "benchmarks", "notebooks", "docs")
SUFFIXES = {".py", ".ipynb", ".md"}

_NUM = r"\d+(?:\.\d+)*"
_DASH = "[-\u2013]"  # a hyphen or an en dash
# "§5.4", "§ 5.4", and ranges "§5.9-5.10", "§2.4-§2.6", "§5.4.4-5" (also with an en dash).
_CITE = re.compile(rf"§\s?({_NUM})(?:{_DASH}§?({_NUM}))?")
_HEADING = re.compile(rf"^#{{2,6}}\s+({_NUM})\.?\s")
_DIFF_REF = re.compile(rf"\bdifferences?\s+(\d+(?:\s*(?:,|and|{_DASH})\s*\d+)*)", re.IGNORECASE)
_QUIRK_REF = re.compile(r"\bQ(\d+)\b")
_QUIRK_HEADING = re.compile(r"^#{2,6}\s+13\.\d+\s+Q(\d+)\b")


def _sources() -> list[Path]:
    """Every scanned source file (globbed: files may move), docs/semantics.md included."""
    files = [README]
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT).parts
            hidden = any(p.startswith(".") or p == "__pycache__" for p in rel)
            if path.is_file() and path.suffix in SUFFIXES and not hidden:
                files.append(path)
    return files


def _lines(path: Path):
    text = path.read_text(encoding="utf-8")
    for i, line in enumerate(text.splitlines(), 1):
        yield f"{path.relative_to(ROOT)}:{i}", line


def cited_sections(line: str) -> list[str]:
    """Section numbers cited in ``line``; both ends of a range. A shorter range end replaces the
    trailing components of the start: ``§5.4.4-5`` cites 5.4.4 and 5.4.5."""
    out = []
    for m in _CITE.finditer(line):
        start, end = m.group(1), m.group(2)
        out.append(start)
        if end:
            head, tail = start.split("."), end.split(".")
            out.append(".".join(head[: max(0, len(head) - len(tail))] + tail))
    return out


def cited_differences(line: str) -> list[int]:
    """Item numbers of "difference 5", "differences 1 and 13", "differences 10, 11", "6-13"."""
    out = []
    for m in _DIFF_REF.finditer(line):
        for part in re.split(r"\s*(?:,|and)\s*", m.group(1)):
            ends = [int(x) for x in re.split(rf"\s*{_DASH}\s*", part) if x]
            out.extend(range(ends[0], ends[-1] + 1) if len(ends) == 2 else ends)
    return out


def doc_sections(text: str) -> set[str]:
    return {m.group(1) for line in text.splitlines() if (m := _HEADING.match(line))}


def doc_differences(text: str) -> list[int]:
    """The item numbers of the "Deliberate differences" section's numbered list."""
    m = re.search(r"^## \d+\. Deliberate differences.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "docs/semantics.md has no '## N. Deliberate differences' section"
    return [int(n) for n in re.findall(r"^(\d+)\. ", m.group(1), re.M)]


def doc_quirks(text: str) -> set[str]:
    return {m.group(1) for line in text.splitlines() if (m := _QUIRK_HEADING.match(line))}


def dangling(lines, known, extract) -> list[str]:
    """``file:line: ref`` for every reference ``extract`` finds that is not in ``known``."""
    return [f"{where}: {ref}" for where, line in lines for ref in extract(line) if ref not in known]


def _all_lines(exclude: Path | None = None):
    """Lines of every source but this file (its examples cite unknown sections on purpose)."""
    skip = {exclude, Path(__file__).resolve()}
    return [x for path in _sources() if path.resolve() not in skip for x in _lines(path)]


def test_reference_parsers():
    # Given lines citing sections, ranges and differences
    # Then every number is extracted, and unknown ones are reported with their location
    assert cited_sections("see §5.4.4-5, §2.4-§2.6 and §5.9\u20135.10 (§14.1-2).") == [
        "5.4.4",
        "5.4.5",
        "2.4",
        "2.6",
        "5.9",
        "5.10",
        "14.1",
        "14.2",
    ]
    assert cited_sections("§1-§4, §4.1, §4.4.") == ["1", "4", "4.1", "4.4"]
    assert cited_differences("(differences 1 and 13), difference 5; Differences 6-8, 10") == [
        1,
        13,
        5,
        6,
        7,
        8,
        10,
    ]
    assert cited_differences("the difference of 128 and 1 new tokens") == []
    known = {"1", "2.4", "99"}
    lines = [("a.py:3", "# §2.4 and §99.9"), ("b.md:7", "§1")]
    assert dangling(lines, known, cited_sections) == ["a.py:3: 99.9"]


def test_docs_have_the_cited_structure():
    # Given docs/semantics.md
    text = DOC.read_text(encoding="utf-8")
    sections = doc_sections(text)
    # Then it keeps the reference numbering down to the numbered items the code cites, and has
    # the invariants and a consecutive list of differences
    for n in ("0", "1.4.10", "2.4.7", "5.7.8", "6.2.7", "9.3.6", "10.1.6", "12.2", "12.4", "14.1"):
        assert n in sections, f"docs/semantics.md lacks section {n}"
    assert re.search(r"^## \d+\. Invariants", text, re.M)
    items = doc_differences(text)
    assert items == list(range(1, len(items) + 1)) and len(items) >= 18, items
    assert {str(q) for q in range(1, 12)} <= doc_quirks(text)


def test_every_section_citation_exists():
    # Given every source file but docs/semantics.md itself
    sections = doc_sections(DOC.read_text(encoding="utf-8"))
    # Then every § it cites is a heading of docs/semantics.md
    bad = dangling(_all_lines(exclude=DOC.resolve()), sections, cited_sections)
    assert not bad, "citations of sections docs/semantics.md lacks:\n" + "\n".join(bad)


def test_every_difference_and_quirk_reference_exists():
    # Given every source file, docs/semantics.md included
    text = DOC.read_text(encoding="utf-8")
    items = set(doc_differences(text))
    quirks = doc_quirks(text)
    lines = _all_lines()
    # Then each "difference N" is an item of its list and each QN a quirk of §13
    bad = dangling(lines, items, cited_differences)
    bad += dangling(lines, quirks, lambda line: _QUIRK_REF.findall(line))
    assert not bad, "references docs/semantics.md lacks:\n" + "\n".join(bad)


def test_readme_points_to_the_docs():
    readme = README.read_text(encoding="utf-8")
    assert "](docs/semantics.md" in readme
    assert "spec/llama-memory-semantics.md" not in readme
