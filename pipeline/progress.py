"""Progress output that suits where it goes: a live bar on a terminal, a few plain lines in a log.

A bar redraws itself with carriage returns, which a terminal shows in place but a log file (DVC's output, CI)
keeps as one ever-growing line with the next message glued to it. Off a terminal the same tqdm bar is
therefore redrawn at most every `LOG_INTERVAL_SECONDS`, each state on its own line, and always finished with
a newline.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

from tqdm import tqdm

LOG_INTERVAL_SECONDS = 30.0
_LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed{postfix}"
_LOG_FORMAT_UNSIZED = "{desc}: {n_fmt} {unit}, {elapsed} elapsed{postfix}"


class _LineWriter:
    """A file-like sink that turns tqdm's carriage-return redraws into whole lines, skipping blank ones and
    repeats of the line before (closing a bar redraws the state its last update already showed)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> None:
        for chunk in text.replace("\r", "\n").split("\n"):
            line = chunk.rstrip()
            if line.strip() and line != self._last:
                self._stream.write(line + "\n")
                self._last = line

    def flush(self) -> None:
        self._stream.flush()


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, stream: TextIO | None = None,
                 **options: Any) -> tqdm:
    """A tqdm bar on `stream` (stderr): live on a terminal, plain timed lines otherwise; nothing when disabled."""
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(iterable, disable=True, **options)
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, dynamic_ncols=True, **options)
    options["leave"] = True
    sized = options.get("total") is not None or hasattr(iterable, "__len__")
    return tqdm(iterable, file=_LineWriter(stream), mininterval=LOG_INTERVAL_SECONDS, maxinterval=LOG_INTERVAL_SECONDS,
                bar_format=_LOG_FORMAT if sized else _LOG_FORMAT_UNSIZED, **options)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
