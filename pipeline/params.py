"""params.yaml → option defaults for one CLI command, so DVC stages and hand-typed commands share one code path.

A command run with ``--params params.yaml --section extract.train`` takes its defaults from the scalars of the
``extract`` mapping, overridden by those of ``extract.train``; options typed on the command line win over both. A
mapping is a section, except under a key that names an option taking one (``fit.set``: recipe keys and values).
Keys are the option names with underscores (``batch_size`` for ``--batch-size``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError


def load_section(path: str | Path, section: str, mapping_options: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The merged settings along the dotted `section` path of a params file: its scalars, and the mappings under a
    key in `mapping_options` (an option whose value is a mapping, such as `fit.set`); other mappings are sections."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise PipelineError(f"{path}: cannot read params ({error.__class__.__name__}: {str(error).splitlines()[0]})") from None
    settings: dict[str, Any] = {}
    node: Any = document
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            raise PipelineError(f"{path}: no section {section!r} (missing {part!r})")
        node = node[part]
        if not isinstance(node, dict):
            raise PipelineError(f"{path}: section {section!r} is not a mapping")
        settings.update({key: value for key, value in node.items()
                         if not isinstance(value, dict) or key in mapping_options})
    return settings
