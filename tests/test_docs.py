"""The README and docs/ stay true to the repository: links resolve, named recipes, scripts, modules and `nca-trl`
commands exist, the README stays short, and no page reports test-suite timings (they change every run).

Fast: reads Markdown files and runs `python -m nca_trl.cli --help` once; no network, no model.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

# Paths of other projects that the docs name on purpose: the alignment-handbook's training script (docs/pipelines.md)
FOREIGN_PATHS = {"scripts/dpo.py"}


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """The fenced code blocks and inline code spans of a Markdown text."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return blocks + re.findall(r"`([^`\n]+)`", prose)


@lru_cache(maxsize=1)
def _subcommands() -> frozenset[str]:
    """The commands `python -m nca_trl.cli --help` lists (its `commands:` section)."""
    command = [sys.executable, "-m", "nca_trl.cli", "--help"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=True).stdout
    section = out.split("commands:", 1)[1]
    names = frozenset(re.findall(r"^  ([a-z][\w-]*)\s", section, flags=re.M))
    assert {"train", "generate"} <= names, out
    return names


def test_pages_found():
    assert README.exists() and len(PAGES) > 2, PAGES


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    """Every `[text](target)` that is not a URL or a pure `#anchor` points at an existing file or folder."""
    missing = []
    for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _text(page)):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{_rel(page)}: links to nothing: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_recipes_exist(page):
    """`recipes/...` paths, and recipe files named relative to `recipes/` (`mistral-7b/nca.yaml`), exist."""
    text = _text(page)
    named = {m for m in re.findall(r"(?<![\w./-])recipes/[\w./*-]*[\w*]/?", text) if "..." not in m and "*" not in m}
    recipe_dirs = {p.name for p in (REPO / "recipes").iterdir() if p.is_dir()}
    for short in re.findall(r"`([\w.-]+/[\w.-]+\.ya?ml)`", text):
        if short.split("/", 1)[0] in recipe_dirs:
            named.add(f"recipes/{short}")
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{_rel(page)}: names recipes that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_commands_exist(page):
    """`nca-trl <command>` and `-m nca_trl.cli <command>` in code name commands of `nca-trl --help`."""
    used = set()
    for code in _code(_text(page)):
        used |= set(re.findall(r"(?<![\w-])nca-trl ([a-z][\w-]*)", code))
        used |= set(re.findall(r"-m nca_trl\.cli ([a-z][\w-]*)", code))
    unknown = sorted(used - _subcommands())
    assert not unknown, f"{_rel(page)}: names `nca-trl` commands that do not exist: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_scripts_exist(page):
    """`scripts/...` paths exist (files or folders)."""
    named = set(re.findall(r"(?<![\w./-])scripts/[\w./-]*[\w/]", _text(page))) - FOREIGN_PATHS
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{_rel(page)}: names scripts that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_modules_exist(page):
    """`python -m X` and `-m nca_trl.X` name importable modules."""
    text = _text(page)
    modules = set(re.findall(r"\bpython3? -m ([A-Za-z_][\w.]*)", text))
    modules |= set(re.findall(r"(?<![\w-])-m (nca_trl(?:\.\w+)*)", text))
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"{_rel(page)}: names modules that cannot be imported: {missing}"


def _package_paths(text: str) -> set[str]:
    """`nca_trl/...` paths named in a text, including the indented `name.py` lines under a `nca_trl/<dir>/` line of a
    code block (the layout map of docs/development.md)."""
    paths = set(re.findall(r"(?<![\w./-])nca_trl/(?:\w+/)*(?:\w+\.py)?", text))
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        folder = None
        for line in block.splitlines():
            if m := re.match(r"(nca_trl/(?:\w+/)+)(?:\s|$)", line):
                folder = m.group(1)
            elif folder and (m := re.match(r"  ((?:\w+\.py(?: +|$))+)", line)):
                paths |= {folder + name for name in m.group(1).split()}
            elif line and not line.startswith(" "):
                folder = None
    return paths


def _defines(source: Path, name: str) -> bool:
    """Whether a module's top level defines or imports `name` (or names it for a lazy module `__getattr__`)."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                return True
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets += [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    lazy = any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
               or isinstance(node, ast.Assign) and any(getattr(n, "id", None) == "__getattr__"
                                                       for t in node.targets for n in ast.walk(t))
               for node in tree.body)  # `def __getattr__` or `__getattr__, __dir__ = lazy_exports(...)`
    return lazy and any(isinstance(n, ast.Constant) and n.value == name for n in ast.walk(tree))


def _dotted_name_exists(dotted: str) -> bool:
    """`nca_trl.a.b` (or `nca_trl.a:b`) is a module of the package, or a name its module defines; read from the source
    files, nothing imported."""
    module, _, attribute = dotted.partition(":")
    parts = module.split(".")
    path, source = REPO / parts[0], REPO / parts[0] / "__init__.py"
    rest = parts[1:] + ([attribute] if attribute else [])
    while rest:
        part = rest[0]
        if source.name == "__init__.py" and (path / part / "__init__.py").exists():
            path, source = path / part, path / part / "__init__.py"
        elif source.name == "__init__.py" and (path / f"{part}.py").exists():
            source = path / f"{part}.py"
        else:
            return _defines(source, part)
        rest = rest[1:]
    return True


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_package_paths_and_names_exist(page):
    """`nca_trl/...` files and folders, and `nca_trl.x.y` modules and names, that a page names exist (the layout map
    of docs/development.md included)."""
    text = _text(page)
    missing = sorted(p for p in _package_paths(text) if not (REPO / p).exists())
    dotted = set(re.findall(r"(?<![\w.])nca_trl(?:\.\w+)+(?::\w+)?", text))
    missing += sorted(d for d in dotted if not _dotted_name_exists(d))
    assert not missing, f"{_rel(page)}: names package paths or names that do not exist: {missing}"


def test_readme_is_short():
    lines = _text(README).count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/ (at most {README_MAX_LINES})"


def test_readme_links_every_docs_page():
    linked = {(REPO / t.split("#", 1)[0]).resolve() for t in re.findall(r"\]\((docs/[^)\s]+)\)", _text(README))}
    unlinked = sorted(_rel(p) for p in PAGES[1:] if p.resolve() not in linked)
    assert not unlinked, f"README.md does not link these docs pages: {unlinked}"


# A count of tests ("444 tests", "~400 tests") or a test run's duration ("tests ... in 24 min", "pytest ... 3 min")
TEST_TIMING = [
    re.compile(r"\b\d[\d,]* (?:unit |fast |slow )?tests\b", re.I),
    re.compile(
        r"\b(?:tests?|test suite|pytest)\b.*?\b(?:in|under|takes?|took) (?:about |~)?\d+(?:\.\d+)? ?"
        r"(?:s|sec|seconds?|min|minutes?|h|hours?)\b",
        re.I,
    ),
]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_test_suite_timings(page):
    found = [
        f"{_rel(page)}:{number}: {line.strip()}"
        for number, line in enumerate(_text(page).splitlines(), 1)
        if any(pattern.search(line) for pattern in TEST_TIMING)
    ]
    assert not found, "test counts and timings change every run; keep them out of the docs:\n" + "\n".join(found)


def test_timing_check_catches_the_usual_forms():
    for line in (
        "runs the whole test suite (CPU only; 444 tests; 24 minutes on 2 cores",
        "python -m pytest tests -q -m 'not slow'  # ~400 tests, under 3 min on 2 cores",
        "the fast tests run in 95 s",
    ):
        assert any(p.search(line) for p in TEST_TIMING), line
    for line in (
        "python scripts/reproduce.py --out /tmp/smoke --quick       # smoke run (what tests/test_reproduce.py runs)",
        "`--quick` runs it in about 35 s.",
        "A test asserts every row above.",
    ):
        assert not any(p.search(line) for p in TEST_TIMING), line
