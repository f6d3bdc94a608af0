"""Head files: a segmentation head (STEGO architecture) with its cluster probe and the backbone it belongs to.

Written by `head`: trained here from the feature cache, or a released STEGO or HP checkpoint converted once
and checked. A head file is a checkpoint (``weights_only``-loadable) of kind
``head``: ``head_type`` (stego | hp), ``state`` (head weights), ``clusters`` (K×C centroids), ``backbone`` and
``backbone_tensors_sha256`` (which frozen backbone its inputs must come from), ``source``, and for heads trained
here their ``recipe``, ``history`` and optimiser state. Fitted models embed the head they were fitted on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.store.checkpoints import load_checkpoint

HEAD_KIND = "head"


def trained_head_record(*, state: dict[str, Tensor], clusters: Tensor, features_provenance: dict[str, Any],
                        recipe: dict[str, Any], history: list[dict[str, float]], training: dict[str, Any],
                        complete: bool) -> dict[str, Any]:
    """A STEGO head trained here (finished, or a resumable partial with its optimiser and random streams)."""
    return {"kind": HEAD_KIND, "complete": complete, "head_type": "stego", "source": "trained", "state": state,
            "clusters": clusters, "backbone": features_provenance["backbone"],
            "backbone_tensors_sha256": features_provenance.get("backbone_tensors_sha256"),
            "features_provenance": features_provenance, "recipe": recipe, "history": history, "training": training,
            "package_version": __version__}


def imported_head_record(head_type: str, checkpoint: Path, checkpoint_sha256: str, state: dict[str, Tensor],
                         clusters: Tensor, backbone: dict[str, Any]) -> dict[str, Any]:
    """A released STEGO / HP checkpoint's head and clusters, with the backbone (`backbone`,
    `backbone_tensors_sha256`) it was trained on."""
    return {"kind": HEAD_KIND, "complete": True, "head_type": head_type,
            "source": {"checkpoint": str(checkpoint), "sha256": checkpoint_sha256}, "state": state,
            "clusters": clusters, **backbone, "package_version": __version__}


def load_head(path: str | Path) -> dict[str, Any]:
    """A finished head file, or a one-line error naming it."""
    record = load_checkpoint(path)
    if record.get("kind") != HEAD_KIND:
        raise PipelineError(f"{path}: not a head file (kind {record.get('kind')!r}); make one with `head`")
    if not record.get("complete"):
        raise PipelineError(f"{path}: head training did not finish; rerun `head` to resume it")
    return record


def require_head_matches_features(head_path: str | Path, head: dict[str, Any], features_path: str | Path,
                                  features_provenance: dict[str, Any]) -> None:
    """Refuse a head whose backbone (architecture or weights) is not the one that made the cached features."""
    wanted = {"backbone": head["backbone"], "backbone_tensors_sha256": head["backbone_tensors_sha256"]}
    found = {key: features_provenance.get(key) for key in wanted}
    changed = [f"{key} (head: {str(wanted[key])[:16]}, features: {str(found[key])[:16]})"
               for key in wanted if wanted[key] != found[key]]
    if changed:
        raise PipelineError(f"{features_path}: features come from another backbone than head {head_path}: "
                            f"{'; '.join(changed)}")
