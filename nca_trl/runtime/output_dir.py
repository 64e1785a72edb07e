"""`output_dir` checked writable before anything is loaded, and locked for the whole run.

`check_output_dir_writable` creates and deletes a probe file (a real write, which also refuses root on a read-only
mount). `claim_output_dir` holds `fcntl.flock` on `output_dir/.nca-trl.lock` (body: pid, host, start, command) for
the whole run, on the global main process only; a second run refuses naming the holder. The kernel drops the lock of
a dead process: a lock file left behind with a body is a stale lock, taken over with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time

from .checkpoints import COMPLETE_MARKER
from .errors import OutputDirError, SettingsError
from .files import json_default

logger = logging.getLogger("nca_trl")

__all__ = ["LOCK_NAME", "FinishedRunError", "OutputDirError", "OutputDirLockedError", "changed_settings",
           "check_output_dir", "check_output_dir_writable", "claim_output_dir", "claim_output_file",
           "finished_run_message", "missing_folders", "remove_empty_folders"]

LOCK_NAME = ".nca-trl.lock"


class OutputDirLockedError(OutputDirError):
    """Another run holds `output_dir` (or `nca-trl generate`'s output): one line, exit 2 on the command line."""


class FinishedRunError(SettingsError):
    """The output holds a finished run of other settings, and the command did not say to replace it."""


def changed_settings(before: dict, now: dict, ignore=()) -> list[str]:
    """`key: before -> now` for every setting that differs between two settings mappings, keys of `ignore` left out;
    values compared as JSON (what a record on disk holds)."""
    before, now = (json.loads(json.dumps(d, default=json_default, sort_keys=True)) for d in (before, now))
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
            if key not in ignore and before.get(key) != now.get(key)]


def finished_run_message(where: str, what: str, changes: list[str], option: str, another: str) -> str:
    """Why a command refuses to write over a finished run of other settings, and the two ways out."""
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    return (f"{where} holds {what} with other settings ({shown}). Nothing was loaded or written. Write to another "
            f"{another}, or replace that run on purpose with `{option} true`.")




def check_output_dir_writable(output_dir: str) -> None:
    """Create `output_dir` if needed and write, then delete, a probe file in it; `OutputDirError` if that fails."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nca-trl-write-probe-", dir=output_dir)
        try:
            os.write(fd, b"nca-trl")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise OutputDirError(
            e.errno,
            f"output_dir {output_dir!r} is not writable ({type(e).__name__}: {e.strerror or e}). Nothing was loaded. "
            "Choose another `output_dir` (`--output_dir PATH`), or make this one writable: create it, fix its "
            "permissions, free disk space, or remount it read-write.",
        ) from e


def _is_main(args) -> bool:
    return getattr(args, "process_index", 0) == 0


def _agree(args, fn):
    """Run `fn` on the global main process only; if it raises an `OutputDirError`/`OutputDirLockedError` there, raise
    on every process (the others would otherwise wait for it at the next collective)."""
    result, error = None, None
    if _is_main(args):
        try:
            result = fn()
        except (OutputDirError, OutputDirLockedError) as e:
            error = e
    state = getattr(args, "distributed_state", None)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = [(type(error).__name__, str(error)) if error is not None else None]
        broadcast_object_list(message, from_process=0)
        if message[0] is not None and error is None:
            kind = OutputDirError if message[0][0] == OutputDirError.__name__ else OutputDirLockedError
            refused = f"The main process refused to start: {message[0][1]}"
            raise kind(refused)
    if error is not None:
        raise error
    return result


def check_output_dir(args) -> None:
    """`check_output_dir_writable(args.output_dir)` on the main process, refused on every process."""
    if args.output_dir:
        _agree(args, lambda: check_output_dir_writable(args.output_dir))


class _Lock:
    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiting process sees a removed file and retries
        os.close(self.fd)
        self.fd = None


def _read_body(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": None, "command": "(unreadable lock file)"}


def _holder_text(body: dict | None) -> str:
    if not body:
        return "a process that has just taken it"
    started = body.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {body.get('pid')} on host {body.get('host')} (started {when}: {body.get('command')})"


def acquire_lock(output_dir: str, name: str = LOCK_NAME, what: str | None = None) -> _Lock | None:
    """Take `output_dir/<name>` (non-blocking). `OutputDirLockedError` if another process holds it; None (and a
    warning) on a filesystem without locks. `what`: what the lock guards, in messages (default: `output_dir`)."""
    import fcntl

    check_output_dir_writable(output_dir)
    path = os.path.join(output_dir, name)
    what = what or f"output_dir {output_dir!r}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            body = _read_body(fd)
            os.close(fd)
            raise OutputDirLockedError(
                f"{what} is in use by another nca-trl run: {_holder_text(body)}. Wait for it to finish or stop it, "
                f"or choose another {what.split()[0]}. (The lock is {path}; it is released when that process ends, "
                "however it ends.)"
            ) from None
        except OSError as e:
            os.close(fd)
            logger.warning(
                "%s: this filesystem does not support file locks (%s); a second run writing into it will not be "
                "stopped.", what, e,
            )
            return None
        try:  # the holder may have released (and removed) the file between our open and our flock
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    previous = _read_body(fd)
    if previous:
        if previous.get("host") == socket.gethostname():
            pid = previous.get("pid")
            why = (" (that pid now belongs to another process)" if isinstance(pid, int) and _pid_alive(pid) else
                   " (no longer running)") + ": that run ended without releasing it (killed or crashed)"
        else:
            why = (": its lock is free, so that run ended without releasing it; if it is still running on that host, "
                   "this filesystem does not share locks between hosts (an NFS mount with `nolock`?): stop one run")
        logger.warning(
            "%s: taking over the stale lock of %s%s.%s", what, _holder_text(previous), why,
            f" Its checkpoints count only if complete ({COMPLETE_MARKER})." if name == LOCK_NAME else "",
        )
    body = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(body).encode(), 0)
    os.fsync(fd)
    return _Lock(fd, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_claimed: set[str] = set()  # output_dirs this process has claimed (the CLI's claim covers the trainer's)


def missing_folders(path: str) -> list[str]:
    """`path` and those of its parent folders that do not exist yet, deepest first: what `os.makedirs(path)` creates."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def remove_empty_folders(folders: list[str]) -> None:
    """Remove each of `folders` (deepest first) that is empty; stop at the first that is not (or is gone)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


@contextlib.contextmanager
def _holding(lock: _Lock | None, created: list[str]):
    """The block under `lock` (released after it); the folders a claim `created` removed again if it raises while
    they are empty."""
    finished = False
    try:
        yield
        finished = True
    finally:
        if lock is not None:
            lock.release()
        if not finished:
            remove_empty_folders(created)


@contextlib.contextmanager
def claim_output_file(output, state):
    """Hold `.<name>.lock` beside `output` (`nca-trl generate`'s), on the main process of `state`, for the block: a
    second run writing the same output is refused on every process (`_agree`), as an unwritable folder is. It merged
    the first run's chunks and removed them, and the first then waited for them forever. A block that raises leaves
    no folder the claim created."""
    from types import SimpleNamespace

    folder, name = os.path.split(os.path.abspath(output))
    created = missing_folders(folder) if state.is_main_process else []
    where = SimpleNamespace(process_index=state.process_index, distributed_state=state)
    try:
        lock = _agree(where, lambda: acquire_lock(folder, f".{name}.lock", f"output {str(output)!r}"))
    except OutputDirError:
        remove_empty_folders(created)
        raise
    with _holding(lock, created):
        yield


@contextlib.contextmanager
def claim_output_dir(args):
    """Check `args.output_dir` is writable and hold its lock (main process) for the block; every process refuses
    together. Reentrant within a process: `nca-trl train` claims it for the whole run, `trainer.train` again. A block
    that raises before anything was written leaves no folder behind: the folders the claim created are removed again
    while empty (a refused setting found after the claim, such as a split the data does not have)."""
    key = os.path.realpath(args.output_dir) if args.output_dir else None
    if key is None or key in _claimed:
        yield
        return
    created = missing_folders(args.output_dir) if _is_main(args) else []
    lock = _agree(args, lambda: acquire_lock(args.output_dir))
    _claimed.add(key)
    try:
        with _holding(lock, created):
            yield
    finally:
        _claimed.discard(key)


# ------------------------------------------------------------------------------------------------ checkpoints
