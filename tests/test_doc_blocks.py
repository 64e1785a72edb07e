"""Every code block of the README and docs/ runs as written, so an example that drifts from the code fails here.

Which blocks run: the fenced blocks whose info string is `bash`, `sh`, `shell`, `console` or `python` (`py`). Other
blocks (`yaml`, `text`, `bibtex`, output tables without an info string) are data and are not run. A directive, an HTML
comment on the line(s) right before the opening fence (invisible on the rendered page), changes what happens:

    <!-- doc-test: skip: REASON -->       not run; the reason is required (it needs a GPU, several GPUs, a model from the
                                          Hub, hours, or it runs the test suite itself)
    <!-- doc-test: output -->             the block shows output, not commands: not run
    <!-- doc-test: printed -->            the block shows what the runnable block before it prints: each of its lines
                                          is checked against that block's output, in order (the text as shown, each
                                          number within 0.05 or 10%), and that block may print no warning
    <!-- doc-test: scale-down: ARGS -->   the block runs with ARGS appended to each of its `nca-trl train`, `generate`
                                          and `iterate` commands (also `-m nca_trl.cli train ...`), e.g. `--max_steps 4`;
                                          the only change a block may get

How a page's blocks run: in order, in one temporary folder per page that links the repository's `data/`, `recipes/`,
`examples/`, `scripts/` and `tests/` (relative paths resolve as in a fresh clone; `outputs/` is the page's own). A
shell block runs with `bash -e -o pipefail`, without its `pip install ...` commands (the package is installed: the
tests run in the README's install); a `console` block runs its `$ ` lines. A `python` block runs with `python -c` in the
same folder, in an interpreter of its own. Commands find `nca-trl` and `python` of the interpreter running the tests.

Fast: every block of every page is classified and every directive well-formed; the command rewriting; a broken block
fails. Slow: one test per page runs the page's blocks. `python tests/test_doc_blocks.py` lists every block with what
happens to it (the skipped ones with their reasons).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
RUNNABLE = SHELL | {"python", "py"}
# What a page's folder links, so that the docs' relative paths resolve as in a fresh clone
LINKED = ("data", "recipes", "examples", "scripts", "tests")
BLOCK_TIMEOUT = 1200  # seconds; a hang is a failure

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`{]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")
_PIP = re.compile(r"^\s*(?:python3? -m )?pip3? install\b")
_SCALED = re.compile(r"(?:^|\s)(?:nca-trl|-m nca_trl\.cli) (?:train|generate|iterate)(?:\s|$)")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    info: str
    code: str
    directives: list[tuple[int, str, str]] = field(default_factory=list)  # (line, kind, argument)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def directive(self, kind: str) -> str | None:
        return next((argument for _, k, argument in self.directives if k == kind), None)

    @property
    def action(self) -> str:
        """`run`, `skip`, `output`, `printed` or `data`."""
        if self.directive("skip") is not None:
            return "skip"
        if self.directive("output") is not None:
            return "output"
        if self.directive("printed") is not None:
            return "printed"
        return "run" if self.info in RUNNABLE else "data"


def parse_page(text: str, page: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown text with their directives, and the problems found (a directive that is not
    right before a block, an unclosed fence)."""
    blocks, problems, pending = [], [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        fence = _FENCE.match(line)
        if directive:
            kind, _, argument = directive.group("body").partition(":")
            pending.append((i + 1, kind.strip(), argument.strip()))
        elif fence:
            indent, marker = len(fence.group("indent")), fence.group("fence")
            body, j = [], i + 1
            while j < len(lines) and not re.match(rf"^ *{re.escape(marker[0])}{{{len(marker)},}}\s*$", lines[j]):
                body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
                j += 1
            if j == len(lines):
                problems.append(f"{page.name}:{i + 1}: a code block that is never closed")
            blocks.append(Block(page, i + 1, fence.group("info").lower(), "\n".join(body) + "\n", pending))
            pending, i = [], j
        elif pending:
            problems += [f"{page.name}:{n}: `doc-test: {k}` is not on the line right before a code block"
                         for n, k, _ in pending]
            pending = []
        i += 1
    problems += [f"{page.name}:{n}: `doc-test: {k}` is not on the line right before a code block"
                 for n, k, _ in pending]
    return blocks, problems


def directive_problems(block: Block) -> list[str]:
    """What is wrong with a block's directives: an unknown kind, a skip without its reason, a scale-down without
    flags or with nothing to scale, skip and output together."""
    problems = []
    for line, kind, argument in block.directives:
        where = f"{block.page.name}:{line}"
        if kind not in ("skip", "output", "printed", "scale-down"):
            problems.append(f"{where}: unknown directive `doc-test: {kind}` (skip: REASON, output, printed, "
                            "scale-down: ARGS)")
        elif kind == "skip" and not argument:
            problems.append(f"{where}: `doc-test: skip` needs its reason: `<!-- doc-test: skip: REASON -->`")
        elif kind in ("output", "printed") and argument:
            problems.append(f"{where}: `doc-test: {kind}` takes no argument, got {argument!r}")
        elif kind == "scale-down":
            try:
                flags = shlex.split(argument)
            except ValueError as e:
                flags, _ = [], problems.append(f"{where}: scale-down flags do not parse: {e}")
            if not flags or not flags[0].startswith("--"):
                problems.append(f"{where}: `doc-test: scale-down` needs the flags it appends, e.g. `--max_steps 4`")
            if block.info not in SHELL or not any(_SCALED.search(c) for c in shell_commands(block)):
                problems.append(f"{where}: `doc-test: scale-down` on a block without an `nca-trl train`, `generate` "
                                "or `iterate` command to append it to")
    kinds = [kind for _, kind, _ in block.directives]
    if len(kinds) != len(set(kinds)):
        problems.append(f"{block.id}: a directive given twice: {kinds}")
    if "skip" in kinds and ("output" in kinds or "scale-down" in kinds):
        problems.append(f"{block.id}: `skip` with `output` or `scale-down`: a skipped block is not run at all")
    if "printed" in kinds and len(kinds) > 1:
        problems.append(f"{block.id}: `printed` with another directive: it marks what a block before it printed")
    return problems


def printed_after_runnable(blocks: list[Block]) -> list[str]:
    """A `printed` block must come right after a block that runs (what it shows is that block's output)."""
    return [f"{b.id}: `doc-test: printed` must come right after a block that runs"
            for previous, b in zip([None, *blocks], blocks) if b.action == "printed"
            and (previous is None or previous.action != "run")]


# ------------------------------------------------------------------------------------------ printed output
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _line_matches(shown: str, printed: str) -> bool:
    """The same text, and each number within 0.05 or 10% of the shown one (a run on another machine or thread count
    differs in the last digits)."""
    if _NUMBER.sub("#", shown.strip()) != _NUMBER.sub("#", printed.strip()):
        return False
    pairs = zip(map(float, _NUMBER.findall(shown)), map(float, _NUMBER.findall(printed)))
    return all(abs(a - b) <= max(0.05, 0.1 * abs(a)) for a, b in pairs)


def printed_problems(shown: str, printed: str) -> list[str]:
    """What of `shown` (a `printed` block) the run did not print: each shown line must match a printed line, in
    order (other printed lines, e.g. progress, may come between)."""
    lines = printed.splitlines()
    problems, at = [], 0
    for line in (s for s in shown.splitlines() if s.strip()):
        found = next((k for k in range(at, len(lines)) if _line_matches(line, lines[k])), None)
        if found is None:
            problems.append(f"shown but not printed: {line!r}")
        else:
            at = found + 1
    return problems


_WARNING = re.compile(r"warn", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ rewriting shell blocks
def _split_comment(line: str) -> tuple[str, str]:
    """(command, trailing `# comment`) of a shell line: `#` outside quotes, at the start or after whitespace."""
    quote = None
    for k, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip(), line[k:]
    return line, ""


def _split_and(command: str) -> list[str]:
    """The commands of `a && b && c` (`&&` outside quotes)."""
    parts, quote, start = [], None, 0
    k = 0
    while k < len(command):
        char = command[k]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif command.startswith("&&", k):
            parts.append(command[start:k])
            start = k + 2
            k += 1
        k += 1
    return [p.strip() for p in parts + [command[start:]]]


def _logical_lines(code: str) -> list[str]:
    """Lines with their `\\` continuations joined."""
    lines, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1].rstrip() + " "
            continue
        lines.append(current + line.strip() if current else line)
        current = ""
    if current:
        lines.append(current.rstrip())
    return lines


def _console_code(code: str) -> str:
    """The commands of a console block: its `$ ` lines and their continuations; the rest is output."""
    commands, continued = [], False
    for line in code.splitlines():
        if line.startswith("$ ") or continued:
            commands.append(line[2:] if line.startswith("$ ") and not continued else line)
            continued = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


def shell_commands(block: Block) -> list[str]:
    """The block's commands, one per logical line, comments left out."""
    code = _console_code(block.code) if block.info == "console" else block.code
    return [c for line in _logical_lines(code) for c in _split_and(_split_comment(line)[0]) if c]


def rewrite_shell(code: str, scale_down: str | None = None) -> str:
    """The script a shell block runs: `pip install ...` commands dropped, `scale_down` appended to every
    `nca-trl train|generate|iterate` command (before a trailing comment)."""
    out = []
    for line in _logical_lines(code):
        command, comment = _split_comment(line)
        if not command.strip():
            out.append(line)
            continue
        parts = [p for p in _split_and(command) if not _PIP.match(p)]
        if not parts:
            continue
        if scale_down:
            parts = [f"{p} {scale_down}" if _SCALED.search(p) else p for p in parts]
        out.append(" && ".join(parts) + (f"  {comment}" if comment else ""))
    return "\n".join(out) + "\n"


def script(block: Block) -> str:
    """What runs for a runnable block: the rewritten shell script, or the Python code as written."""
    if block.info in SHELL:
        code = _console_code(block.code) if block.info == "console" else block.code
        return rewrite_shell(code, block.directive("scale-down"))
    return block.code


# ---------------------------------------------------------------------------------------------------- running
def page_folder(root: Path) -> Path:
    """A fresh folder laid out like a clone of the repository for the docs' relative paths."""
    root.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = root / name
        if not link.exists():
            link.symlink_to(REPO / name, target_is_directory=True)
    return root


def block_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    return env


def run_block(block: Block, cwd: Path, timeout: float = BLOCK_TIMEOUT) -> subprocess.CompletedProcess:
    """Run one block in `cwd`, returning what it printed; an `AssertionError` naming the block, what ran and the end of
    its output if it fails."""
    code = script(block)
    command = ["bash", "-e", "-o", "pipefail", "-c", code] if block.info in SHELL else [sys.executable, "-c", code]
    try:
        proc = subprocess.run(command, cwd=cwd, env=block_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{block.id}: still running after {timeout} s:\n{code}") from e
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{block.id} failed (exit {proc.returncode}); it ran, in {cwd}:\n{code}\n"
                             f"--- the end of its output ---\n{output}")
    return proc


def all_blocks() -> dict[Path, list[Block]]:
    return {page: parse_page(page.read_text(encoding="utf-8"), page)[0] for page in PAGES}


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


RUN_PAGES = [page for page, blocks in all_blocks().items() if any(b.action == "run" for b in blocks)]


# ------------------------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_block_is_classified(page):
    """Every fenced block runs, or is data (not a shell or Python block), or has a well-formed directive; a skip
    says why; no directive floats away from its block."""
    blocks, problems = parse_page(page.read_text(encoding="utf-8"), page)
    problems += printed_after_runnable(blocks)
    for block in blocks:
        problems += directive_problems(block)
        assert block.action in ("run", "skip", "output", "printed", "data"), block
    assert not problems, "\n".join(problems)
    skipped = [f"{b.id}: {b.directive('skip')}" for b in blocks if b.action == "skip"]
    if skipped:
        print("not run:\n  " + "\n  ".join(skipped))


def test_pages_have_runnable_blocks():
    """The examples a user starts from are run, not skipped: the README's quick start and Python example, and the
    generate -> score -> train chain."""
    blocks = all_blocks()
    readme = {b.info: b for b in blocks[REPO / "README.md"] if b.action == "run"}
    assert "python" in readme and "bash" in readme, [b.id for b in blocks[REPO / "README.md"]]
    chain = "\n".join(script(b) for b in blocks[REPO / "docs" / "generate-score-iterate.md"] if b.action == "run")
    for command in ("nca-trl generate", "nca-trl score", "nca-trl train", "nca-trl iterate"):
        assert command in chain, command


def test_parse_directives():
    text = ("intro\n\n<!-- doc-test: skip: needs 8 GPUs -->\n```bash\naccelerate launch x\n```\n\n"
            "<!-- doc-test: scale-down: --max_steps 2 -->\n```bash\nnca-trl train --config r.yaml\n```\n"
            "```\n| a | b |\n```\n<!-- doc-test: output -->\n```console\nstep 1/2\n```\n<!-- doc-test: skip -->\n\ntext\n")
    blocks, problems = parse_page(text, REPO / "README.md")
    assert [b.action for b in blocks] == ["skip", "run", "data", "output"]
    assert blocks[0].directive("skip") == "needs 8 GPUs" and blocks[1].directive("scale-down") == "--max_steps 2"
    assert problems == ["README.md:19: `doc-test: skip` is not on the line right before a code block"]
    bad = Block(REPO / "README.md", 3, "python", "x = 1\n", [(1, "skip", ""), (2, "scale-down", "--max_steps 2"),
                                                           (2, "sikp", "x")])
    found = "\n".join(directive_problems(bad))
    assert "needs its reason" in found and "without an `nca-trl train`" in found and "unknown directive" in found


def test_printed_output_is_checked_line_by_line():
    printed = "step 10/30  loss 1.402\nreward margin (best - others): 0.00 -> 0.21\nranking accuracy: 0.00 -> 0.77\n"
    shown = "reward margin (best - others): 0.00 -> 0.20\nranking accuracy: 0.00 -> 0.79\n"
    assert printed_problems(shown, printed) == []
    assert printed_problems("ranking accuracy: 0.00 -> 0.79\n", printed.replace("0.77", "0.41")) == [
        "shown but not printed: 'ranking accuracy: 0.00 -> 0.79'"]  # not learning any more
    assert printed_problems("ranking accuracy: 0.00 -> 0.79\nreward margin (best - others): 0.00 -> 0.20\n",
                            printed) == ["shown but not printed: 'reward margin (best - others): 0.00 -> 0.20'"]
    assert printed_problems("ranking accuracy (pairs): 0.00 -> 0.79\n", printed) != []  # the text counts too
    shown = "<!-- doc-test: printed -->\n```text\n1\n```\n"
    blocks, _ = parse_page("```python\nprint(1)\n```\n" + shown + shown, REPO / "README.md")
    assert [b.action for b in blocks] == ["run", "printed", "printed"]
    assert printed_after_runnable(blocks) == ["README.md:9: `doc-test: printed` must come right after a block that "
                                              "runs"]


def test_rewrite_drops_pip_and_scales_down():
    code = ('pip install torch==2.13.0 && pip install -e ".[dev]" && nca-trl make-tiny-model outputs/m && '
            "nca-trl train --config recipes/tiny/nca.yaml\n"
            "pip install -e .\n"
            "nca-trl iterate --config r.yaml --rounds 4       # one more round\n"
            "nca-trl generate --model_name_or_path m --dataset_name d \\\n    --output o.jsonl\n"
            "accelerate launch -m nca_trl.cli train --config r.yaml --ddp_backend gloo\n"
            "nca-trl score --dataset_name 'a && b' --output o.jsonl  # not scaled\n")
    assert rewrite_shell(code, "--max_steps 2").splitlines() == [
        "nca-trl make-tiny-model outputs/m && nca-trl train --config recipes/tiny/nca.yaml --max_steps 2",
        "nca-trl iterate --config r.yaml --rounds 4 --max_steps 2  # one more round",
        "nca-trl generate --model_name_or_path m --dataset_name d --output o.jsonl --max_steps 2",
        "accelerate launch -m nca_trl.cli train --config r.yaml --ddp_backend gloo --max_steps 2",
        "nca-trl score --dataset_name 'a && b' --output o.jsonl  # not scaled",
    ]
    assert rewrite_shell("pip install x && echo hi  # greet\n") == "echo hi  # greet\n"
    assert _console_code("$ echo a \\\n  b\noutput line\n$ echo c\n") == "echo a \\\n  b\necho c\n"


def test_a_broken_block_fails(tmp_path):
    """A documented command that no longer matches the code (here a misspelled flag) fails the page's test, naming
    the block and showing the error."""
    text = "```bash\nnca-trl train --config recipes/tiny/nca.yaml --learning-rat 1e-3\n```\n"
    (block,), _ = parse_page(text, REPO / "docs" / "example.md")
    with pytest.raises(AssertionError, match=r"(?s)docs/example\.md:1 failed.*--learning-rat.*learning_rate"):
        run_block(block, page_folder(tmp_path), timeout=300)


# ------------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=_rel)
def test_page_blocks_run(page, tmp_path):
    """The page's runnable blocks, in order, in one folder laid out like a fresh clone; a `printed` block is checked
    against what the block before it printed, which may print no warning."""
    folder = page_folder(tmp_path / "clone")
    ran = None
    for block in parse_page(page.read_text(encoding="utf-8"), page)[0]:
        if block.action == "run":
            ran = run_block(block, folder)
        elif block.action == "printed":
            problems = printed_problems(block.code, ran.stdout)
            assert not problems, f"{block.id}: " + "; ".join(problems) + f"\n--- printed ---\n{ran.stdout[-4000:]}"
            warnings = [line for line in ran.stderr.splitlines() if _WARNING.search(line)]
            assert not warnings, f"{block.id}: the block before it printed warnings: {warnings}"


if __name__ == "__main__":  # pragma: no cover - `python tests/test_doc_blocks.py`: what happens to every block
    for page, blocks in all_blocks().items():
        for block in blocks:
            scale = block.directive("scale-down")
            what = {"skip": f"skip: {block.directive('skip')}", "run": "run" + (f" + {scale}" if scale else "")}
            print(f"{block.id:40} {block.info or '(none)':8} {what.get(block.action, block.action)}")
