"""Files every command writes and reads: atomic writes, content hashes, and the output rules.

Every file goes to a temporary name in its folder first and is renamed into place only when
complete, so an interrupted run leaves the old file or the new one, never half of one. No
command writes over one of its own inputs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it into place only on success."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual mode
    except OSError as e:
        raise OutputError(f"cannot write to {parent}: {e.strerror}", "choose a writable location") from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
