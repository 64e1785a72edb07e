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
    commands = {("nca_trl", name) for name in ("train", "generation", "scoring", "iterate")}
    found = [f"{path.relative_to(PACKAGE.parent)} imports {'.'.join(target)}"
             for path, name, is_package in _modules() if name[:2] == ("nca_trl", "runtime")
             for target, _ in _imports(path, name, is_package) if target[:2] in commands]
    assert not found, found
