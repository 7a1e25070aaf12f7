"""Atomic writes and hashing.

Every artifact is written to a temporary file in the destination folder and moved into place with
:func:`os.replace`, so a crash or Ctrl-C never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError, OutputPathError

__all__ = [
    "folder_lock",
    "temp_prefix",
    "sweep_stale_temps",
    "safe_component",
    "inside",
    "sha256_file",
    "sha256_file_cached",
    "sha256_bytes",
    "canonical_json",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "commit_files",
    "check_writable",
]

_CHUNK = 8 << 20


_TEMP_RE = re.compile(r"^\.shiva-tmp-(\d+)-")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Holds an exclusive lock on ``folder`` (``<folder>/.shiva.lock``, ``flock``) for one writer; a second
    writer is refused at once with one line naming the holder. The kernel drops the lock when its
    process dies, so a killed run never leaves the folder locked."""
    import fcntl

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    lock = d / ".shiva.lock"
    f = open(lock, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputPathError(
                f"{what} {d} is being written by {holder}; wait for that run to finish, or pass another output folder."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        locked = True
        yield d
    finally:
        if "locked" in locals():
            with contextlib.suppress(OSError):
                lock.unlink()  # still holding the lock: the folder is left as clean as it was
        f.close()


def temp_prefix(tag: str = "") -> str:
    """Prefix of this process's temporary files and folders: ``.shiva-tmp-<pid>-<tag>``. The pid lets a
    later run tell a killed run's leftovers (:func:`sweep_stale_temps`) from a live concurrent run's."""
    return f".shiva-tmp-{os.getpid()}-{tag}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Removes temporary files/folders in ``folder`` left by runs that were killed (their pid is gone)."""
    import shutil

    d = Path(folder)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        m = _TEMP_RE.match(p.name)
        if not m or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def safe_component(name: Any, what: str) -> str:
    """``name`` if it is safe as one folder/file name (letters, digits, ``._-``, no leading dot, no
    separators, at most 100 characters); else :class:`~shiva_export.errors.ConfigError` naming ``what``.
    Every path part that comes from an artifact's metadata, a recipe or a suite goes through here."""
    if not isinstance(name, str) or not _SAFE_COMPONENT.match(name) or name in (".", ".."):
        raise ConfigError(
            f"{what} {name!r} is not a safe file name (letters, digits and ._- only, no path separators, at most 100 characters); "
            "rename it in its recipe, suite or export."
        )
    return name


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` if it resolves inside ``root`` (else :class:`~shiva_export.errors.OutputPathError`)."""
    r = Path(root).resolve()
    p = Path(path).resolve()
    if p != r and r not in p.parents:
        raise OutputPathError(f"{what} {path} resolves to {p}, outside its output folder {r}; refusing to write there.")
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cache_root() -> Path:
    env = os.environ.get("SHIVA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "shiva-export"


def sha256_file_cached(path: str | os.PathLike) -> str:
    """SHA-256 of a file's *content*, remembered across runs so multi-GB weights are hashed once.

    The remembered digest is reused only while the file's size, ``mtime_ns``, ``ctime_ns``, inode and
    device are all unchanged. ``ctime`` moves on every write and cannot be set back by the user (unlike
    ``mtime`` with ``touch -d``), so a same-size change with a restored mtime is still re-hashed. The memo
    lives in ``$SHIVA_CACHE_DIR/sha256.json`` (default ``~/.cache/shiva-export``); if it cannot be written
    the digest is simply recomputed next time.
    """
    p = Path(path).resolve()
    st = p.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    memo_path = _cache_root() / "sha256.json"
    try:
        memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(str(p))
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = sha256_file(p)
    memo[str(p)] = {"stamp": stamp, "sha256": digest}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo, sort_keys=True))
    except (OSError, OutputPathError):
        pass
    return digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for config/recipe hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Checks that ``path``'s folder exists (or can be made) and is writable; returns ``path`` as a Path."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise OutputPathError(f"{what} path is a directory: {path}. Pass a file path (e.g. {path / 'model.onnx'}).")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"Cannot create the folder for the {what}: {parent} ({err.strerror}). Choose another --out.") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} folder is not writable: {parent}. Choose a writable --out.")
    return path


@contextlib.contextmanager
def _tmp_in(dest: Path, suffix: str = ".tmp") -> Iterator[Path]:
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest.name + "."), suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; finished artifacts get normal permissions
    try:
        yield tmp_path
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (temp file in the same folder + fsync + rename)."""
    dest = check_writable(path)
    with _tmp_in(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    return dest


@contextlib.contextmanager
def atomic_write_stream(path: str | os.PathLike) -> Iterator[Any]:
    """Binary file object writing to ``path`` atomically (temp file + fsync + rename on a clean exit;
    removed on an exception), for artifacts too large to hold in memory (engine plans)."""
    dest = check_writable(path)
    with _tmp_in(dest) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def commit_files(moves: list[tuple[Path, Path]]) -> None:
    """Moves finished temp files into place with :func:`os.replace`, in the order given.

    Callers list side files (external data) first and the file that makes the set look complete
    (``model.onnx``, ``manifest.json``) last, so an interrupted commit never leaves a complete-looking set.
    """
    for src, dst in moves:
        os.replace(src, dst)
