"""Files every command writes and reads: atomic writes, content hashes, and the output rules.

Every file goes to a temporary name in its folder first and is renamed into place only when
complete, so an interrupted run leaves the old file or the new one, never half of one. No
command writes over one of its own inputs.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover (not on Windows)
    fcntl = None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it into place only on success.

    The temporary name carries the writer's process id, so that the next writer of the same target
    removes what a killed writer left behind (and never what a live one is writing)."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(parent, target.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=PARTIAL, dir=parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror}", "choose a writable location") from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as e:  # a full disk, a file system that refuses the name, ...
        raise OutputError(f"cannot write {target}: {e.strerror or e}", "check the disk space and the location") from e
    finally:
        tmp_path.unlink(missing_ok=True)


PARTIAL = ".partial"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove_stale_partials(folder: Path, name: str) -> None:
    """``.NAME.PID-XXXX.partial`` files whose writer is no longer alive."""
    for p in folder.glob(f".{glob.escape(name)}.*{PARTIAL}"):
        pid = p.name[len(name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode())


def atomic_write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    with atomic_path(target) as tmp:
        writer(tmp)


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, remembered per (path, size, modification time)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output_file(output: Path, suffixes: tuple[str, ...], inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """An output file may not be a folder, one of the command's inputs, or of an unknown kind."""
    output = Path(output)
    if output.is_dir():
        raise OutputError(f"{output} is a folder", "give a file name, e.g. model.safetensors")
    if output.suffix not in suffixes:
        raise OutputError(f"{output}: the output must end in {' or '.join(suffixes)}")
    check_not_input(output, inputs)


def check_not_input(output: Path, inputs: tuple[str | os.PathLike, ...]) -> None:
    """No command writes over one of its own inputs (names that are not files, such as tiny, pass)."""
    output = Path(output)
    for src in inputs:
        if src and Path(src).exists() and output.exists() and output.samefile(src):
            raise OutputError(f"{output} is also an input of this command", "write the output to another file")


class FolderLock:
    """An OS-level lock on a folder, held while a command writes into it, so that two runs never
    write the same folder at once. It dies with its process: a killed run leaves no stale lock."""

    NAME = ".actvar.lock"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"{self.folder} is a file", "give a folder")
        if fcntl is None:  # no flock (Windows): the folder goes unlocked
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write to {self.folder}: {e.strerror}", "choose a writable folder") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(
                f"{self.folder} is in use by process {holder}", "wait for that run to end, or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
