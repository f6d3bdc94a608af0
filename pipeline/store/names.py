"""Image names → file paths: the one place where a name from a dataset or a feature file becomes a path.

Names are relative ids such as ``0001TP_008550`` (CamVid) or ``aachen/aachen_000000_000019`` (Cityscapes,
folder readers): "/" separates sub-folders, which are kept as folders of the output directory. Feature files
are shared between people, so their names are untrusted input: every component must be a plain file name
(not empty, no leading dot, so no ``.`` or ``..``; no backslash, NUL, control or format characters; at most
``MAX_COMPONENT_BYTES`` bytes), the name must not be absolute, and no two names of one file may map to the
same path, even on a case-insensitive or Unicode-normalising file system. A name that breaks a rule is
refused in one line; nothing is written for it.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Iterable

from pipeline.errors import PipelineError

SEPARATOR = "/"
MAX_COMPONENT_BYTES = 200
"""File systems allow 255 bytes per name; the rest is room for suffixes and temporary-file tags."""

_REFUSED_CATEGORIES = ("Cc", "Cf", "Cs")  # control, format (e.g. bidi overrides), lone surrogates


def unsafe_reason(name: object) -> str | None:
    """Why `name` cannot name a file inside an output directory, or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name:
        return "is empty"
    if name.startswith(SEPARATOR):
        return "is an absolute path"
    for component in name.split(SEPARATOR):
        if not component:
            return "has an empty path component"
        if component.startswith("."):
            return f"has a path component starting with '.' ({component!r})"
        if "\\" in component:
            return "contains a backslash"
        if any(unicodedata.category(character) in _REFUSED_CATEGORIES for character in component):
            return "contains a control character"
        if len(component.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            return f"has a path component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def require_safe_names(names: Iterable[object], source: str | Path) -> None:
    """Refuse, in one line naming `source`, the first name that cannot be a file name or that collides."""
    seen: dict[str, object] = {}
    for name in names:
        reason = unsafe_reason(name)
        if reason is not None:
            raise PipelineError(f"{source}: image name {name!r} {reason}; refusing to use it as a file name")
        key = unicodedata.normalize("NFC", name).casefold()
        if key in seen:
            raise PipelineError(f"{source}: image names {seen[key]!r} and {name!r} would name the same file")
        seen[key] = name


def name_path(directory: str | Path, name: str, suffix: str) -> Path:
    """`directory/<name><suffix>`, after checking that `name` is safe and that the file lands inside
    `directory` (a symbolic link among its sub-folders cannot lead it out)."""
    reason = unsafe_reason(name)
    if reason is not None:
        raise PipelineError(f"{directory}: image name {name!r} {reason}; refusing to use it as a file name")
    directory = Path(directory)
    path = directory / f"{name}{suffix}"
    if SEPARATOR in name:
        inside = os.path.realpath(directory)
        if os.path.commonpath([inside, os.path.realpath(path.parent)]) != inside:
            raise PipelineError(f"{path}: leads outside {directory} through a symbolic link; refusing to use it")
    return path
