"""Every figure quoted in the README and docs/ next to a `results/` file is in that file (issue 28).

A page cites the file a figure comes from with a link (or a path) to it in the same paragraph, table or list item.
For every paragraph that cites one or more `results/` files, each figure of the paragraph (a number with a decimal
point or thousands separators, or a whole number with a unit: `100 s`, `2x`, `55%`, `90 steps`, `38.8 GB`) must be
one of the numbers of the cited files as quoted: rounded to the quoted precision, a percentage as a fraction of the
file (55% of 0.553), minutes as its seconds (`10.8 min`), or a speed-up (`1.33x`) as the ratio of two of its
numbers. Settings and versions in code spans or after `Python` / `==` are not figures. So a figure that drifts from
the run it cites, or a rerun that changes a cited number, fails here: take the page's figures from the file.

Also here: the README shows what results/quickstart_cpu.json recorded of the quick start (its table, the Python
example's output), and every metric the docs name is one the quick start logs.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_CITE = re.compile(r"(?:\.\./)?(results/[\w.\-/]+\.(?:json|md|log|csv))")
_FIGURE = re.compile(r"(?<![\w.\-/=])(?P<sign>[-+−])?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|"
                     r"\d+(?=\s?(?:s|ms|x|%|GB|MB|min|steps|seconds|minutes)\b|x|%))(?P<unit>\s?(?:x|%|min)(?![\w]))?")
_NOT_FIGURES = re.compile(r"`[^`]*`|\]\([^)]*\)|Python \d[\d.]*\+?|==\S+|\bv\d[\w.]*|\bK ?= ?\d+|\b\d+-core\b|"
                          r"\b\d+(?:\.\d+)? ?[MB](?:-parameter)?\b(?: (?:parameters|params|Mistral))?|ZeRO-\d|"
                          r"\b(?:fp|bf|float|int)\d+")


def paragraphs(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each paragraph, table or list item; code blocks left out."""
    out, current, start, fenced = [], [], 0, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        new_item = bool(re.match(r"^\s*[-*] ", line)) or not line.strip()
        if fenced or new_item:
            if current:
                out.append((start, "\n".join(current)))
            current, start = ([line], number) if (not fenced and line.strip()) else ([], number + 1)
            continue
        if not current:
            start = number
        current.append(line)
    if current:
        out.append((start, "\n".join(current)))
    return out


def figures(text: str) -> list[str]:
    """The figures of a paragraph, as quoted (with `x` or `%` where it follows)."""
    text = _NOT_FIGURES.sub(" ", text)
    return [(m.group("sign") or "").replace("−", "-") + m.group("num") + (m.group("unit") or "").strip()
            for m in _FIGURE.finditer(text)]


def numbers_of(path: Path) -> list[float]:
    """Every number written in a results file (JSON values and keys, log text), but those of its `earlier_runs`
    (scripts/time_quickstart.py keeps the runs it replaced there: a figure comes from the file's own run)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and '"earlier_runs"' in text:
        data = json.loads(text)
        data.pop("earlier_runs", None)
        text = json.dumps(data)
    return [float(m.group()) for m in re.finditer(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text.replace(",", ""))]


def _close(value: float, quoted: float, half_step: float) -> bool:
    return abs(value - quoted) <= half_step * (1 + 1e-9) + 1e-12


def quoted_from(figure: str, numbers: list[float]) -> bool:
    """Whether `figure` is one of `numbers` as quoted (rounded to its precision); a percentage may also be a fraction
    of the file times 100, minutes the file's seconds, and a speed-up (`1.33x`) the ratio of two of the file's
    numbers."""
    unit = "min" if figure.endswith("min") else figure[-1] if figure[-1] in "x%" else ""
    number = figure.removesuffix("min").rstrip("x%")
    quoted = float(number.replace(",", ""))
    decimals = len(number.split(".")[1]) if "." in number else 0
    half = 0.5 * 10 ** -decimals
    if any(_close(n, quoted, half) for n in numbers):
        return True
    if unit == "%":
        return any(_close(100 * n, quoted, half) for n in numbers)
    if unit == "min":  # seconds of the file, in minutes
        return any(_close(n / 60, quoted, half) for n in numbers)
    if unit == "x":
        distinct = sorted({abs(n) for n in numbers if n})
        return any(_close(a / b, abs(quoted), half) for a, b in itertools.permutations(distinct, 2))
    return False


def cited_figures():
    """(page, line, paragraph, the results files it cites): a file that does not exist yet is no citation (a page may
    name where a run will write; a broken link is tests/test_docs.py's to find)."""
    for page in PAGES:
        for line, text in paragraphs(page.read_text(encoding="utf-8")):
            cited = sorted(c for c in set(_CITE.findall(text)) if (REPO / c).is_file())
            if cited:
                yield page, line, text, cited


CASES = list(cited_figures())


@pytest.mark.parametrize("page, line, text, cited", CASES,
                         ids=[f"{p.relative_to(REPO)}:{n}" for p, n, _, _ in CASES])
def test_each_cited_figure_is_in_the_cited_file(page, line, text, cited):
    files = [REPO / c for c in cited]
    numbers = [n for f in files for n in numbers_of(f)]
    absent = [figure for figure in figures(text) if not quoted_from(figure, numbers)]
    assert not absent, f"{page.name}:{line}: {absent} are not in {cited}:\n{text}"


def test_the_figure_check_can_fail(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"wall_s": 99.9, "tokens": 11706.2, "mfu": 0.553, "a": 380, "b": 286}))
    numbers = numbers_of(tmp_path / "r.json")
    for quoted in ("100", "99.9", "11,706", "55%", "1.33x", "1.7min"):
        assert quoted_from(quoted, numbers), quoted
    for quoted in ("101", "99.7", "11,800", "0.96", "1.33", "54%"):  # a ratio only as a speed-up
        assert not quoted_from(quoted, numbers), quoted
    text = ("Ran 90 steps in 100 s at 55% MFU, 1.33x faster (`lr 3e-3`, Python 3.10+, K = 4, 2-core, a 51.7M Mistral, "
            "[x](results/r.json))")
    assert figures(text) == ["90", "100", "55%", "1.33x"]


# -------------------------------------------------------------------------------------- metric names in the docs
_METRIC = re.compile(r"`((?:eval_\w*?_?)?(?:rewards|logps|logits)/[\w*]+)`")
QUICKSTART = REPO / "results" / "quickstart_cpu.json"


def doc_metric_names() -> dict[str, list[str]]:
    """Metric name -> the pages that name it (in code spans: `rewards/margins`, `eval_heldout_rewards/...`)."""
    found: dict[str, list[str]] = {}
    for page in [*PAGES, *sorted((REPO / "recipes" / "tiny").glob("*.yaml"))]:
        for name in _METRIC.findall(page.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(str(page.relative_to(REPO)))
    return found


def test_every_metric_the_docs_name_is_logged_by_the_quick_start():
    """Before: the FAQ told users to watch `eval_rewards/ranking_accuracy`, which the quick start does not log (its
    evaluation sets log `eval_train_prompts_...` and `eval_heldout_...`). Checked against the names the quick start
    logged (`logged_metrics` of results/quickstart_cpu.json, written by scripts/time_quickstart.py)."""
    logged = json.loads(QUICKSTART.read_text())["logged_metrics"]
    names = doc_metric_names()
    assert "rewards/ranking_accuracy" in names  # the check reads the docs
    unknown = {name: pages for name, pages in names.items()
               if not any(m == name or (name.endswith("*") and m.startswith(name[:-1])) for m in logged)}
    assert not unknown, f"named in the docs but not logged by the quick start: {unknown}"


def _table_line_matches(shown: str, recorded: str, tolerance: float = 0.01) -> bool:
    numbers = re.compile(r"-?\d+\.\d+")
    if numbers.sub("#", shown) != numbers.sub("#", recorded):
        return False
    return all(abs(float(a) - float(b)) <= tolerance
               for a, b in zip(numbers.findall(shown), numbers.findall(recorded)))


def test_the_readme_shows_what_the_recorded_quick_start_printed():
    """The quick start's table and the Python example's output, as the README shows them, are those recorded in
    results/quickstart_cpu.json (the table to 0.01: its last digits differ between machines)."""
    record = json.loads(QUICKSTART.read_text())
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    for row in record["table"]:
        assert any(_table_line_matches(line, row) for line in lines), f"the README's table has no row {row!r}"
    for printed in record["python_example"]["printed"]:
        assert printed in lines, f"the README's Python example does not show {printed!r}"
    assert _table_line_matches("| loss | 1.386 | 1.370 |", "| loss | 1.386 | 1.373 |")
    assert not _table_line_matches("| loss | 1.386 | 1.370 |", "| loss | 1.386 | 1.390 |")
