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
import stat
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
    "check_regular_target",
    "write_onnx_record",
    "verify_onnx_record",
]

_CHUNK = 8 << 20


_TEMP_RE = re.compile(r"^\.shiva-tmp-(\d+)-")


_HELD: dict[str, int] = {}  # folders this process holds locked (a nested lock of the same folder passes through)


def _made_dirs(d: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` of ``d`` will create, deepest first."""
    made = []
    p = d
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    return made


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Holds an exclusive lock on ``folder`` (``<folder>/.shiva.lock``, ``flock``) for one writer; a second
    writer is refused at once with one line naming the holder. The kernel drops the lock when its
    process dies, so a killed run never leaves the folder locked. Re-entrant within one process (a command
    that locks its output folder may call a library function that locks it again). Folders it had to create
    are removed again when they are still empty on exit, so a refused run leaves nothing behind."""
    import fcntl

    d = Path(folder)
    key = str(d.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield d
        finally:
            _HELD[key] -= 1
        return
    made = _made_dirs(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(
            f"Cannot create the folder for the {what}: {d} ({err.strerror or err}). Pass a writable folder path that is not a file."
        ) from None
    lock = d / ".shiva.lock"
    check_regular_target(lock, f"{what} lock")
    try:
        f = open(lock, "a+")
    except OSError as err:
        _remove_empty(made)
        raise OutputPathError(f"{what} {d} is not writable ({err.strerror or err}); pass a writable folder.") from None
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
        _HELD[key] = 1
        yield d
    finally:
        if "locked" in locals():
            _HELD.pop(key, None)
            with contextlib.suppress(OSError):
                lock.unlink()  # still holding the lock: the folder is left as clean as it was
        f.close()
        if "locked" in locals():
            _remove_empty(made)


def _remove_empty(made: list[Path]) -> None:
    for p in made:  # deepest first; stops at the first folder something was written into
        try:
            p.rmdir()
        except OSError:
            break


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


def cache_root() -> Path:
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
    memo_path = cache_root() / "sha256.json"
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


_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular_target(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` if writing it (atomically: a temp file moved over it) can only create or replace a regular file
    in its own folder; else :class:`~shiva_export.errors.OutputPathError`. Refused: a device node, FIFO or
    socket (replacing ``/dev/null`` as root would break the machine; opening a FIFO blocks), and a symlink
    that leads out of the folder or to anything but a regular file."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    except OSError as err:
        raise OutputPathError(f"{what} {p} cannot be inspected ({err.strerror or err}); pass another path.") from None
    if stat.S_ISLNK(st.st_mode):
        target = p.resolve()
        folder = p.parent.resolve()
        if target.parent != folder:
            raise OutputPathError(
                f"{what} {p} is a symlink to {target}, outside its folder {folder}; refusing to write through it. Pass a plain file path."
            )
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return p
    if not stat.S_ISREG(st.st_mode):
        raise OutputPathError(
            f"{what} {p} is {_kind(st.st_mode)}, not a regular file; refusing to write or replace it. Pass a path to a regular file."
        )
    return p


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Checks that ``path``'s folder exists (or can be made) and is writable; returns ``path`` as a Path."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise OutputPathError(f"{what} path is a directory: {path}. Pass a file path (e.g. {path / 'model.onnx'}).")
    check_regular_target(path, what)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(
            f"Cannot create the folder for the {what}: {parent} ({err.strerror or err}). Choose another --out."
        ) from None
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
    for _src, dst in moves:
        check_regular_target(dst, "output")
    for src, dst in moves:
        os.replace(src, dst)


ONNX_RECORD_FORMAT = "shiva-onnx-record/1"


def onnx_record_path(onnx_path: str | os.PathLike) -> Path:
    """Where an exported graph records its own sha256 (and its external data's): ``<model.onnx>.sha256.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".sha256.json")


def write_onnx_record(onnx_path: str | os.PathLike, data_files: list[Path], record_path: str | os.PathLike) -> Path:
    """Writes the content record of a graph (``onnx_path``) and its external-data files to ``record_path`` (a
    temporary name beside them; the caller moves it into place before the graph)."""
    p = Path(onnx_path)
    rec = {
        "format": ONNX_RECORD_FORMAT,
        "onnx": p.name,
        "onnx_sha256": sha256_file(p),
        "data": {f.name: sha256_file(f) for f in sorted(data_files, key=lambda f: f.name)},
    }
    Path(record_path).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return Path(record_path)


def verify_onnx_record(onnx_path: str | os.PathLike) -> str | None:
    """None when ``onnx_path`` and every external-data file it was exported with still have the sha256 recorded
    beside it at export; else why not (one phrase). The graph is hashed in full every time; its external data
    through :func:`sha256_file_cached` (re-hashed whenever size, mtime, ctime or inode moves)."""
    p = Path(onnx_path)
    rp = onnx_record_path(p)
    try:
        rec = json.loads(rp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no content record {rp.name} (written by `shiva-export onnx` beside every graph)"
    except (OSError, ValueError) as err:
        return f"its content record {rp.name} is unreadable ({type(err).__name__})"
    if not isinstance(rec, dict) or rec.get("format") != ONNX_RECORD_FORMAT or not isinstance(rec.get("data"), dict):
        return f"its content record {rp.name} is malformed"
    got = sha256_file(p)
    if got != rec.get("onnx_sha256"):
        return f"its sha256 {got[:12]}... differs from the {str(rec.get('onnx_sha256'))[:12]}... recorded at export (the graph was edited or replaced)"
    for name, want in rec["data"].items():
        f = p.parent / safe_component(name, "external-data file")
        if not f.is_file():
            return f"its external data {name} is missing"
        if sha256_file_cached(f) != want:
            return f"its external data {name} differs from the sha256 recorded at export (edited or replaced)"
    return None
