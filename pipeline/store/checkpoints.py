"""Model checkpoints written by `fit`: prototypes, optimiser state, config and the provenance of the inputs.

A checkpoint is a torch file of plain tensors and JSON-able values (loadable with ``weights_only=True``).
It records the feature provenance it was fitted on, and refuses to be applied to features of another
backbone, weights file or resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.store.atomic import atomic_path
from pipeline.store.validate import check_tensors

FORMAT_VERSION = 1
# The feature-provenance keys that must agree between a model and the features it is applied to.
FEATURE_KEYS = ("backbone", "weights_sha256", "resolution", "grid", "mean", "std")


def save_torch_atomic(path: str | Path, value: Any) -> None:
    """Atomically write `value` with torch.save; a failed write names `path` and the OS error."""
    with atomic_path(path) as temporary:
        try:
            torch.save(value, temporary)
        except RuntimeError:
            # torch's file writer reports a failed write as "unexpected pos"; writing the same value through
            # a Python file object fails again with the OSError itself, which atomic_path reports.
            try:
                with open(temporary, "wb") as stream:
                    torch.save(value, stream)
            except RuntimeError as error:
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from None
                raise


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Atomically write a checkpoint dict."""
    save_torch_atomic(path, {"format_version": FORMAT_VERSION, **checkpoint})


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, every tensor checked against what the file holds
    (store/validate.py), with a one-line error for anything else."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: model checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a foreign or torn file
        raise PipelineError(f"{path}: not a readable primaps-pipeline checkpoint ({error.__class__.__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != FORMAT_VERSION:
        raise PipelineError(f"{path}: not a primaps-pipeline checkpoint (format {FORMAT_VERSION})")
    return check_tensors(path, checkpoint)


def require_matching_features(model_path: str | Path, checkpoint: dict[str, Any], features_path: str | Path,
                              features_provenance: dict[str, Any], feature_dim: int) -> None:
    """Refuse to apply a model to features made by another backbone, weights file or resolution, or of
    another token dimension than its input (its head's, or its prototypes')."""
    head = checkpoint.get("head")
    wanted = (head["state"]["cluster1.0.weight"] if head else checkpoint["momentum"]["direction"]).shape[1]
    if int(wanted) != feature_dim:
        raise PipelineError(f"{features_path}: {feature_dim}-dimensional tokens, but model {model_path} takes {wanted}")
    fitted = checkpoint["features_provenance"]
    changed = [f"{key} (model: {fitted.get(key)}, features: {features_provenance.get(key)})"
               for key in FEATURE_KEYS if fitted.get(key) != features_provenance.get(key)]
    if changed:
        raise PipelineError(f"{features_path}: features do not match model {model_path}: {'; '.join(changed)}")
