"""Atomic file writes: a reader never sees a half-written output, and a crash never destroys a finished one.

A file is published (renamed to its final name) only after every byte was written and flushed to the disk;
any I/O error on the way (a full disk, a file-size limit, a read-only directory) leaves the previous file, if
any, untouched and becomes one PipelineError naming the file and the OS error. A temporary left by a writer
that was killed (kill -9, power loss) is removed by the next write of the same file.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError


_HOST = "".join(character if character.isalnum() or character in "-_" else "_" for character in socket.gethostname())
"""This machine's name as it appears in temporary names (outputs may sit on a file system several machines share)."""


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name next to `path` (same file system, so `os.replace` is atomic), unique per process and machine."""
    return path.with_name(f".{path.name}.{tag}-{_HOST}-{os.getpid()}")


_SWEPT: set[Path] = set()
"""Directories this process already swept: a directory is scanned once per process, not once per write (a mask
directory takes one write per image)."""


def remove_stale_temporaries(directory: Path, tag: str = "tmp") -> None:
    """Delete, once per process, what writers in `directory` on this machine left behind when they were killed
    mid-write: temporaries whose process no longer runs. A live writer's temporary, or another machine's, is
    left alone."""
    if directory in _SWEPT:
        return
    _SWEPT.add(directory)
    marker = f".{tag}-{_HOST}-"
    try:
        candidates = [entry for entry in directory.iterdir() if entry.name.startswith(".") and marker in entry.name]
    except OSError:
        return
    for entry in candidates:
        pid = entry.name.rsplit(marker, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_runs(int(pid)):
            try:
                entry.unlink()
            except OSError:
                pass


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_os_error(error: OSError) -> str:
    """`[Errno 28] No space left on device` style text, on one line, without the (temporary) file name."""
    if error.errno is not None and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return " ".join(str(error).split()) or error.__class__.__name__


def write_failure(path: str | Path, error: OSError) -> PipelineError:
    """The one-line error for an output that could not be written."""
    return PipelineError(f"{path}: cannot write ({describe_os_error(error)}); nothing was published there")


def flush_to_disk(path: str | Path) -> None:
    """fsync a written file, so that a publish never precedes the data (write-back errors surface here)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` only if the block finishes without error and the
    data reached the disk. An OSError in the block or while publishing becomes a PipelineError naming `path`."""
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        yield temporary
        if not temporary.is_file():
            raise OSError(errno.ENOENT, "the writer produced no file")
        flush_to_disk(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise write_failure(path, error) from None
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
