"""What made a file, and the refusal to mix outputs that were made differently."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import PipelineError


def canonical_json(value: Any) -> str:
    """A stable text form: equal records give equal strings (and equal hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(value: Any) -> str:
    """Short sha256 of a record's canonical form, for names and quick comparisons."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:16]


# Recorded for the reader's information; a newer package may still resume or read the file.
INFORMATIONAL_KEYS = frozenset({"package_version", "created"})


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Human-readable `key (file: a, now: b)` items for every key whose value differs."""
    found = []
    for key in sorted((set(stored) | set(wanted)) - INFORMATIONAL_KEYS):
        before, after = stored.get(key), wanted.get(key)
        if canonical_json(before) != canonical_json(after):
            found.append(f"{key} (file: {_short(before)}, now: {_short(after)})")
    return found


def require_same(path: str | Path, stored: Mapping[str, Any], wanted: Mapping[str, Any], hint: str) -> None:
    """Refuse, in one line naming `path`, to add to an output made with other settings."""
    changed = differences(stored, wanted)
    if changed:
        raise PipelineError(f"{path}: made with different settings: {'; '.join(changed[:4])}; {hint}")


def _short(value: Any) -> str:
    text = canonical_json(value)
    return text if len(text) <= 40 else text[:37] + "..."
