"""Safe outputs: never overwrite an input, write atomically, sweep stale temporaries, lock run folders.

Every command that writes goes through this module:

* :func:`check_output` refuses (``ConfigError``, exit 2, one line) an output path that is a
  folder, has no parent folder, is not writable, is one of the command's inputs, or is an
  existing file the command did not create, unless ``--overwrite`` was given.
* :func:`atomic_path` / :func:`write_text_atomic` / :func:`write_bytes_atomic` write a hidden
  temporary ``.NAME.tmp-PID-XXXX`` in the destination's folder and rename it over the
  destination, so readers see the old file or the whole new one; the temporary is removed if
  the write fails. A full disk is reported as one line.
* :func:`sweep_temporaries` removes temporaries left by killed writers (their pid is gone); the
  next writer of the same file (:func:`check_output`) or run folder (:func:`claim_run_dir`) or
  cache (``dnfer prepare``) calls it at its start.
* :class:`RunLock` holds an exclusive ``flock`` on ``RUN/.dnfer.lock`` while ``dnfer train``
  writes into RUN; the kernel releases it when the process dies, so a stale lock cannot block.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dnfer.errors import ConfigError, DnferError

#: Hidden temporaries written by dnfer: ``.NAME.tmp-PID`` optionally followed by ``-SUFFIX``.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-[^/]*)?$")

#: Lock file of a run folder.
LOCK_NAME = ".dnfer.lock"

#: Files a dnfer run writes in its folder (``--overwrite`` removes them before training again).
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "last.prev.pt", "best.prev.pt",
             "train_dynamics.npz", "skipped.csv", "label_issues.csv", "report.html", "tensorboard")

#: Files that hold a run's results (a folder without them has nothing to lose).
_RESULT_FILES = ("metrics.jsonl", "summary.json", "last.pt", "best.pt", "train_dynamics.npz")

#: Files ``dnfer bench`` puts in a cell's folder before the cell trains.
_BENCH_FILES = ("cell.yaml", "cell.log", "train.log")


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output(path: str | Path, *, option: str, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                 ours: bool = False) -> Path:
    """Check that a command may write the file ``path``; returns it as a Path.

    Args:
        option: the flag that named it (``--out``), for the error message.
        inputs: files the command reads; writing one of them is always refused.
        overwrite: ``--overwrite`` was given: an existing (non-input) file may be replaced.
        ours: ``path`` is the command's own default output name (e.g. ``RUN/label_issues.csv``),
            which it replaces without ``--overwrite``.
    """
    p = Path(path)
    where = f"{option} {str(p)!r}"
    for inp in inputs:
        if inp is not None and _exists(Path(inp)) and _exists(p) and _same_file(p, Path(inp)):
            raise ConfigError(f"{where} is one of this command's inputs; choose another output file")
    if p.is_dir():
        raise ConfigError(f"{where} is a folder; expected a file path")
    _check_ancestors(p.parent, where)  # missing parent folders are created when writing
    sweep_temporaries(p.parent, p.name)  # left by an earlier writer of this file that was killed
    if _exists(p):
        if not os.access(p, os.W_OK):
            raise ConfigError(f"{where} exists and is read-only")
        if not (overwrite or ours):
            raise ConfigError(f"{where} already exists; pass --overwrite to replace it, or choose another path")
    return p


def check_output_dir(path: str | Path, *, option: str, inputs: Iterable[str | Path] = ()) -> Path:
    """Check that ``path`` can be (or already is) a writable output folder; returns it as a Path."""
    p = Path(path)
    where = f"{option} {str(p)!r}"
    for inp in inputs:
        if inp is not None and _exists(Path(inp)) and _exists(p) and _same_file(p, Path(inp)):
            raise ConfigError(f"{where} is one of this command's inputs; choose another output folder")
    if _exists(p) and not p.is_dir():
        raise ConfigError(f"{where} is a file; expected a folder")
    _check_ancestors(p, where)
    return p


def _check_ancestors(folder: Path, where: str) -> None:
    """The nearest existing ancestor of ``folder`` (itself included) must be a writable folder."""
    anc = folder if str(folder) else Path(".")
    while not _exists(anc) and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{where}: {str(anc)!r} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: the folder {str(anc)!r} is not writable")


def read_utf8_text(path: str | Path) -> str:
    """The whole text of a UTF-8 file; a byte that is not UTF-8 is a DataError naming its line."""
    from dnfer.errors import DataError

    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); the file, and the file names in it, must be UTF-8 text") from None


def read_utf8_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file; a line that is not UTF-8 is a DataError naming it.

    (Decoding with replacement characters would turn a Latin-1 file name into one that is then
    reported as "file not found".)
    """
    from dnfer.errors import DataError

    for lineno, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}); the file, and the file names in it, must be UTF-8 text") from None


def not_a_file_text(path: str | Path) -> str:
    """Why ``path`` (not a regular file) cannot be read as one: a folder, a device or pipe, or missing."""
    p = Path(path)
    if p.is_dir():
        return "is a folder; expected a file"
    if _exists(p):
        return "is not a regular file (a device, pipe or socket)"
    return "does not exist"


def os_error_text(e: OSError, path: str | Path | None = None) -> str:
    """One sentence for an OSError met while writing (disk full, read-only, permission...)."""
    target = path if path is not None else e.filename
    name = f"{str(target)!r}: " if target is not None else ""
    return f"{name}{_ERRNO_TEXT.get(e.errno or 0, e.strerror or str(e))}"


#: One sentence per errno a write commonly meets; others use the C library's text.
_ERRNO_TEXT = {
    errno.ENOSPC: "disk full (no space left on the device); free space and run again",
    errno.EDQUOT: "disk quota exceeded; free space and run again",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a folder; expected a file",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENOENT: "does not exist",
}


def temp_name(path: Path) -> Path:
    """A hidden temporary next to ``path``: ``.NAME.tmp-PID-XXXXXXXX`` (swept by :func:`sweep_temporaries`)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on failure remove it.

    The caller writes the temporary completely (a file, or a folder); an OSError raised meanwhile
    (a full disk, say) becomes a one-line :class:`DnferError`.
    """
    dest = Path(path)
    tmp = temp_name(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, dest)
    except OSError as e:
        _remove(tmp)
        raise DnferError(f"cannot write {os_error_text(e, dest)}") from None
    except BaseException:
        _remove(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced temporary + rename)."""
    dest = Path(path)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return dest


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return False
    return True


def sweep_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove dnfer temporaries in ``folder`` whose writer is gone; returns what was removed.

    Args:
        name: only temporaries of this destination name (``.NAME.tmp-*``); None: all of them.
    """
    d = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or (name is not None and m.group("name") != name):
            continue
        if _pid_alive(int(m.group("pid"))):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------- run lock
class RunLock:
    """Exclusive lock on a run folder (``RUN/.dnfer.lock``) held for the life of a training run.

    The file records ``pid``, ``host`` and ``since`` so that a second run can name the holder.
    ``flock`` is released by the kernel when the holder dies, so a lock file left by a killed
    run does not block the next one.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--out {str(self.run_dir)!r}: cannot create the lock file ({os_error_text(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(f"--out {str(self.run_dir)!r} is in use by another dnfer run ({holder}); "
                              "wait for it to finish or choose another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (idempotent); the lock file stays, empty."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _dnfer_owned(name: str) -> bool:
    return name == LOCK_NAME or name in _BENCH_FILES or _TEMP_RE.match(name) is not None or name == ".write-test"


def claim_run_dir(run_dir: str | Path, config_yaml: str, *, resume: bool, overwrite: bool,
                  main: bool = True) -> RunLock | None:
    """Lock ``run_dir`` for a training run and check it may be written; returns the lock (None off rank 0).

    A non-empty folder is used only if it is a dnfer run of the same config (its ``config.yaml``
    equals ``config_yaml`` up to the resolved image size), or with ``resume`` or ``overwrite``;
    ``overwrite`` removes the previous run's files (:data:`RUN_FILES`) first, other files stay.
    """
    if not main:
        return None
    d = check_output_dir(run_dir, option="--out")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {str(d)!r}: cannot create the folder ({os_error_text(e)})") from None
    lock = RunLock(d).acquire()
    try:
        sweep_temporaries(d)
        others = sorted(e.name for e in d.iterdir() if not _dnfer_owned(e.name))
        # a dnfer bench cell that failed before any result is rerun with the sweep's current settings
        failed_bench_cell = (d / "cell.yaml").is_file() and not any(_exists(d / n) for n in _RESULT_FILES)
        if (others and not (resume or overwrite or failed_bench_cell)
                and not _same_run_config(d / "config.yaml", config_yaml)):
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            if (d / "config.yaml").is_file():
                raise ConfigError(f"--out {str(d)!r} holds a dnfer run with a different config ({shown}); pass "
                                  "--resume to continue it, --overwrite to replace it, or choose another --out")
            raise ConfigError(f"--out {str(d)!r} holds files that are not a dnfer run ({shown}); choose another "
                              "--out, or pass --overwrite to train there anyway (replacing dnfer's own file names)")
        if overwrite and not resume:
            for name in RUN_FILES:
                if _exists(d / name):
                    _remove(d / name)
    except BaseException:
        lock.release()
        raise
    return lock


def _same_run_config(path: Path, config_yaml: str) -> bool:
    import yaml

    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
        current = yaml.safe_load(config_yaml)
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return False
    for cfg in (saved, current):
        cfg.pop("out", None)
        if isinstance(cfg.get("train"), dict):
            cfg["train"].pop("progress", None)
    # the saved config has the resolved image size; the new one may still leave it to the default
    if (current.get("data") or {}).get("image_size") is None and isinstance(saved.get("data"), dict):
        saved["data"]["image_size"] = None
    return saved == current
