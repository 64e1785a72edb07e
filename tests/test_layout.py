"""The package's layout rules (docs/development.md): one home per job, no borrowing of private names across packages,
at most 9 top-level modules, and no import cycle between the packages."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nca_trl"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield path, parts[:-1] if parts[-1] == "__init__" else parts, path.name == "__init__.py"


def _imports(path, name, is_package):
    """(module imported, names imported) for every `from X import ...` of ours in a module, absolute or relative."""
    here = list(name) if is_package else list(name[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = here[: len(here) - node.level + 1]
            target = tuple(base + (node.module.split(".") if node.module else []))
        elif node.module and node.module.split(".")[0] == "nca_trl":
            target = tuple(node.module.split("."))
        else:
            continue
        yield target, [alias.name for alias in node.names]


def _package_of(module: tuple) -> tuple:
    """The package a module belongs to: ('nca_trl',) for top-level modules, ('nca_trl', 'data') for data/..."""
    path = PACKAGE.parent.joinpath(*module)
    return module if path.is_dir() else module[:-1]


def test_no_module_imports_another_packages_private_name():
    borrowed = []
    for path, name, is_package in _modules():
        own = _package_of(name)
        for target, names in _imports(path, name, is_package):
            if _package_of(target) == own:
                continue
            borrowed += [f"{path.relative_to(PACKAGE.parent)}: {'.'.join(target)}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__")]
    assert not borrowed, "private names imported across packages (make them public in one home):\n" + "\n".join(borrowed)


def test_the_private_name_check_can_fail(tmp_path, monkeypatch):
    # The check above reads real imports: a relative import of another package's private name is caught
    (tmp_path / "nca_trl" / "a").mkdir(parents=True)
    (tmp_path / "nca_trl" / "b").mkdir()
    for folder in ("nca_trl", "nca_trl/a", "nca_trl/b"):
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "nca_trl" / "b" / "m.py").write_text("def _private(): pass\n")
    (tmp_path / "nca_trl" / "a" / "m.py").write_text("from ..b.m import _private\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "nca_trl")
    try:
        test_no_module_imports_another_packages_private_name()
    except AssertionError as e:
        assert "nca_trl/a/m.py: nca_trl.b.m._private" in str(e)
    else:
        raise AssertionError("the check missed a borrowed private name")


def test_at_most_nine_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 9, top


def test_no_import_cycle_between_packages():
    edges: dict[tuple, set] = {}
    for path, name, is_package in _modules():
        own = _package_of(name)
        for target, _ in _imports(path, name, is_package):
            other = _package_of(target)
            if other != own and other != ("nca_trl",) and own != ("nca_trl",):
                edges.setdefault(own, set()).add(other)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in edges.get(start, ()))

    cycles = [(a, b) for a in edges for b in edges[a] if reaches(b, a)]
    assert not cycles, cycles


def test_runtime_imports_no_command_package():
    """Nor the data package (its docstring says so): `data` uses runtime's errors, and runtime data's column names
    would close a package cycle."""
    commands = {("nca_trl", name) for name in ("train", "generation", "scoring", "iterate", "data")}
    found = [f"{path.relative_to(PACKAGE.parent)} imports {'.'.join(target)}"
             for path, name, is_package in _modules() if name[:2] == ("nca_trl", "runtime")
             for target, _ in _imports(path, name, is_package) if target[:2] in commands]
    assert not found, found


def _module_edges(package=None) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (at the top or inside a function: a circle through a function-level
    import is still a circle), as dotted names; `from . import x` counts as importing the submodule `x`."""
    package = package or PACKAGE
    edges: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = parts[:-1] if is_package else parts
        here = list(name) if is_package else list(name[:-1])
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {tuple(a.name.split(".")) for a in node.names if a.name.split(".")[0] == package.name}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = tuple(here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else []))
                elif node.module and node.module.split(".")[0] == package.name:
                    base = tuple(node.module.split("."))
                else:
                    continue
                subs = [base + (a.name,) for a in node.names
                        if package.parent.joinpath(*base, a.name + ".py").exists()
                        or package.parent.joinpath(*base, a.name).is_dir()]
                targets |= set(subs) if subs else {base}
        edges[".".join(name)] = {".".join(t) for t in targets if t != name}
    return edges


def module_cycles(package=None) -> list[list[str]]:
    """Every import circle between modules (strongly connected components of more than one module), as sorted lists.
    A package `__init__` is a module like any other: `from . import x` in it and `from .. import y` in `x` close a
    circle."""
    edges = _module_edges(package)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_modules():
    """Before: `train/arguments.py` imported `LOSSES` from `train/help.py`, which imported `arguments` to render the
    help: a circle (the one `farm-studio look` showed). Now both take their shared names from `train/options.py`."""
    assert module_cycles() == []


def test_the_module_circle_check_can_fail(tmp_path):
    (tmp_path / "nca_trl" / "a").mkdir(parents=True)
    (tmp_path / "nca_trl" / "__init__.py").write_text("")
    (tmp_path / "nca_trl" / "a" / "__init__.py").write_text("")
    (tmp_path / "nca_trl" / "a" / "x.py").write_text("from .y import Y\nX = 1\n")
    (tmp_path / "nca_trl" / "a" / "y.py").write_text("Y = 1\n\ndef f():\n    from . import x\n    return x.X\n")
    (tmp_path / "nca_trl" / "b.py").write_text("import nca_trl.a.x\n")
    assert module_cycles(tmp_path / "nca_trl") == [["nca_trl.a.x", "nca_trl.a.y"]]


def test_modules_at_most_500_lines():
    """Before: `data/loading.py` (513) and `data/converters.py` (507) had grown past the rule; each was split by job
    (`datafiles`, `folders`, `loading`; `ultrafeedback`, `columns`, `converters`)."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def unmapped_modules(package: Path, page: str) -> list[str]:
    """The modules of `package` that the package map of docs/development.md (`page`, its first code block after
    "## Package layout") does not name: a top-level one as `nca_trl/NAME.py`, one of a subpackage as `NAME.py`
    between the line `nca_trl/SUB/` and the next `nca_trl/` line."""
    section = page[page.index("## Package layout"):]
    block = section.split("```")[1]
    sections, current = {}, None
    for line in block.splitlines():
        if line.startswith("nca_trl/"):
            current = line.split()[0]
            sections.setdefault(current, "")
        if current is not None:
            sections[current] += line + "\n"
    missing = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent)
        if path.name == "__init__.py" and len(relative.parts) > 2 or "__pycache__" in relative.parts:
            continue
        if len(relative.parts) == 2:
            if str(relative) not in sections:
                missing.append(str(relative))
        elif path.name not in sections.get(f"{relative.parts[0]}/{relative.parts[1]}/", "").split():
            missing.append(str(relative))
    return missing


def test_the_development_page_maps_every_module():
    """The package map is where a newcomer looks a module up: a module it leaves out (five did) is a module they
    cannot place."""
    page = (PACKAGE.parent / "docs" / "development.md").read_text()
    assert unmapped_modules(PACKAGE, page) == []


def test_the_module_map_check_can_fail(tmp_path):
    (tmp_path / "nca_trl" / "data").mkdir(parents=True)
    for name in ("__init__.py", "losses.py", "data/__init__.py", "data/formats.py", "data/new.py"):
        (tmp_path / "nca_trl" / name).write_text("")
    page = "## Package layout\n\n```\nnca_trl/__init__.py  api\nnca_trl/losses.py  math\n\nnca_trl/data/\n" \
           "  formats.py  formats\n```\n"
    assert unmapped_modules(tmp_path / "nca_trl", page) == ["nca_trl/data/new.py"]
