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
from pipeline.store.validate import require_fields, require_matrix, tensor_state

HEAD_KIND = "head"
HEAD_TYPES = ("stego", "hp")
"""The head architectures a head file can hold (STEGO's and HP's heads are the same two 1×1-conv branches)."""
HEAD_KEYS = ("cluster1.0.weight", "cluster1.0.bias", "cluster2.0.weight", "cluster2.0.bias",
             "cluster2.2.weight", "cluster2.2.bias")
RESOLUTION_KEYS = ("resolution", "grid", "mean", "std")
"""Feature-provenance keys besides the backbone that make a trained head's code incompatible: it learnt
the token statistics of this input size and normalisation."""


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


def check_head_tensors(path: str | Path, state: Any, clusters: Any, what: str = "head") -> dict[str, Tensor]:
    """The head weights `state` (HEAD_KEYS, a C×D, D×D and C×D 1×1-conv pair with biases) and K×C `clusters`,
    after checking that they fit together; one line naming the file otherwise."""
    state = tensor_state(path, state, f"{what} weights")
    missing = [key for key in HEAD_KEYS if key not in state]
    if missing:
        raise PipelineError(f"{path}: {what} weights lack {missing[:3]}")
    first = state["cluster1.0.weight"]
    if first.ndim != 4:
        raise PipelineError(f"{path}: {what} weight cluster1.0.weight of shape {tuple(first.shape)} is not a 1×1 conv")
    code, feature = first.shape[:2]
    expected = {"cluster1.0.weight": (code, feature, 1, 1), "cluster1.0.bias": (code,),
                "cluster2.0.weight": (feature, feature, 1, 1), "cluster2.0.bias": (feature,),
                "cluster2.2.weight": (code, feature, 1, 1), "cluster2.2.bias": (code,)}
    wrong = [f"{key} {tuple(state[key].shape)} != {shape}" for key, shape in expected.items()
             if tuple(state[key].shape) != shape or not state[key].is_floating_point()]
    if wrong:
        raise PipelineError(f"{path}: {what} shapes do not fit together: {'; '.join(wrong[:3])}")
    if not isinstance(clusters, Tensor):
        raise PipelineError(f"{path}: {what} clusters are a {type(clusters).__name__}, not a tensor")
    require_matrix(path, clusters, f"{what} clusters", columns=int(code))
    return {key: state[key] for key in HEAD_KEYS}


def head_feature_dim(head: dict[str, Any]) -> int:
    """The token dimension a head's input must have."""
    return int(head["state"]["cluster1.0.weight"].shape[1])


def check_head_record(path: str | Path, record: dict[str, Any], what: str = "head file") -> None:
    """Refuse a head record (a head file, or the head a model embeds) whose layout is not a head's."""
    require_fields(path, record, {"head_type": str, "state": dict, "clusters": Tensor, "backbone": str}, what)
    if record["head_type"] not in HEAD_TYPES:
        raise PipelineError(f"{path}: {what} holds a head of type {record['head_type']!r}, not one of "
                            f"{', '.join(HEAD_TYPES)}")
    check_head_tensors(path, record["state"], record["clusters"], what)


def load_head(path: str | Path) -> dict[str, Any]:
    """A finished head file with a head's layout, or a one-line error naming it."""
    record = load_checkpoint(path)
    if record.get("kind") != HEAD_KIND:
        raise PipelineError(f"{path}: not a head file (kind {record.get('kind')!r}); make one with `head`")
    if not record.get("complete"):
        raise PipelineError(f"{path}: head training did not finish; rerun `head` to resume it")
    check_head_record(path, record)
    if record.get("source") == "trained":
        require_fields(path, record, {"features_provenance": dict}, "head file")
    return record


def require_head_matches_features(head_path: str | Path, head: dict[str, Any], features_path: str | Path,
                                  features_provenance: dict[str, Any], feature_dim: int) -> None:
    """Refuse a head whose input is not these features: another token dimension, another backbone
    (architecture or weights), or, for a head trained here, another resolution or normalisation."""
    wanted = {"backbone": head["backbone"], "backbone_tensors_sha256": head.get("backbone_tensors_sha256")}
    if head.get("source") == "trained":
        wanted.update({key: head["features_provenance"].get(key) for key in RESOLUTION_KEYS})
    changed = [f"{key} (head: {str(wanted[key])[:16]}, features: {str(features_provenance.get(key))[:16]})"
               for key in wanted if wanted[key] != features_provenance.get(key)]
    if changed:
        raise PipelineError(f"{features_path}: features do not match the ones head {head_path} was trained on: "
                            f"{'; '.join(changed)}")
    if head_feature_dim(head) != feature_dim:
        raise PipelineError(f"{features_path}: {feature_dim}-dimensional tokens, but head {head_path} takes "
                            f"{head_feature_dim(head)}")

