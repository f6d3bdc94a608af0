"""Model files as `fit` and `head` write them: the PriMaPs-EM model, its Baseline, a head's cluster probe and the
head files, and the one rule by which a rerun resumes an unfinished file or refuses one made otherwise.

Every file is a checkpoint (store/checkpoints.py) whose `kind` names its layout:
- `primaps-em`: θ_M (`momentum`) and θ_R (`running`) prototypes, their start (`init`), the EM state for resuming
  (`em`), the per-epoch `history`, the resolved EM configuration (`em_config`, from the named `recipe_name`), the
  values a rerun must match (`recipe`) and input `provenance`, the embedded `head` for a fit on a head's code;
- `baseline`: the PCA + k-means start as a model of its own (θ_M = θ_R = init, gain 1, scored on cosines);
- `cluster-probe`: a head's cluster-probe centroids as a model (gain 2, cosines), for a fit on that head's code;
- `head` (store/heads.py): a segmentation head and its clusters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.store.checkpoints import FEATURE_KEYS, load_checkpoint
from pipeline.store.heads import check_head_record
from pipeline.store.provenance import differences
from pipeline.store.validate import require_fields, require_matrix

MODEL_KIND = "primaps-em"
BASELINE_KIND = "baseline"
PROBE_KIND = "cluster-probe"


def _prototypes(directions: torch.Tensor, gain: float) -> dict[str, torch.Tensor]:
    return {"direction": directions, "gain": torch.full((len(directions),), gain)}


def baseline_record(recipe: dict[str, Any], features_provenance: dict[str, Any], init: torch.Tensor) -> dict[str, Any]:
    """A Baseline file: the fit's start, which depends on the features and the init recipe only."""
    prototypes = _prototypes(init, 1.0)
    return {"kind": BASELINE_KIND, "complete": True, "recipe": recipe,
            "provenance": baseline_provenance(features_provenance), "features_provenance": features_provenance,
            "init": init, "momentum": prototypes, "running": prototypes, "history": []}


def baseline_provenance(features_provenance: dict[str, Any]) -> dict[str, Any]:
    """What a Baseline file must have been made from to be reused."""
    return {"features": features_provenance, "package_version": __version__}


def cluster_probe_record(classes: int, features_provenance: dict[str, Any], head: dict[str, Any],
                         clusters: torch.Tensor, gain: float) -> dict[str, Any]:
    """A head's cluster probe as a model file: its own segmentation, and a fit's start on the head's code."""
    probe = _prototypes(clusters, gain)
    return {"kind": PROBE_KIND, "complete": True, "recipe": {"classes": classes},
            "provenance": {"features": features_provenance, "head": head["fingerprint"], "package_version": __version__},
            "features_provenance": features_provenance, "init": clusters, "momentum": probe, "running": probe,
            "history": [], "head": head}


def model_record(*, recipe: dict[str, Any], recipe_name: str, config: dict[str, Any], provenance: dict[str, Any],
                 logits: str, init: torch.Tensor, state: dict[str, Any], history: list[dict[str, Any]],
                 head: dict[str, Any] | None, complete: bool) -> dict[str, Any]:
    """A PriMaPs-EM model file (finished, or a resumable partial one) from the EM state (PrimapsEM.state_dict).
    `recipe` is what a rerun must match; `config` the resolved EM configuration that every reader takes the
    hyper-parameters from; `recipe_name` the named recipe it started from."""
    return {"kind": MODEL_KIND, "complete": complete, "recipe": recipe, "recipe_name": recipe_name,
            "em_config": config, "provenance": provenance, "logits": logits,
            "features_provenance": provenance["features"], "init": init,
            "momentum": {key: value.cpu() for key, value in state["momentum"].items()},
            "running": {key: value.cpu() for key, value in state["running"].items()},
            "em": state, "history": history, "head": head}


MODEL_KINDS = (MODEL_KIND, BASELINE_KIND, PROBE_KIND)
"""The kinds a model file (what evaluate, predict, inspect and report apply) can be."""


def load_model(path: str | Path) -> dict[str, Any]:
    """A finished model file (PriMaPs-EM model, Baseline or cluster probe) with its layout checked: the
    prototypes θ_M and θ_R (K×D directions, K gains), their start, the feature provenance every reader
    compares against, and the embedded head, if any, whose code is what the prototypes see."""
    record = load_checkpoint(path)
    if record.get("kind") not in MODEL_KINDS:
        raise PipelineError(f"{path}: not a model file (kind {record.get('kind')!r}); make one with `fit`")
    if not record.get("complete"):
        raise PipelineError(f"{path}: the fit did not finish; rerun `fit` to resume it")
    what = "model file"
    require_fields(path, record, {"features_provenance": dict, "momentum": dict, "running": dict,
                                  "init": torch.Tensor}, what)
    lacking = [key for key in FEATURE_KEYS if key not in record["features_provenance"]]
    if lacking:
        raise PipelineError(f"{path}: {what} lacks the provenance of its features ({', '.join(lacking)}); "
                            "rerun `fit` to make it again")
    require_matrix(path, record["init"], "initial prototypes")
    classes, dim = record["init"].shape
    for name in ("momentum", "running"):
        require_fields(path, record[name], {"direction": torch.Tensor, "gain": torch.Tensor}, f"{what} {name}")
        require_matrix(path, record[name]["direction"], f"{name} prototypes", classes, dim)
        if tuple(record[name]["gain"].shape) != (classes,):
            raise PipelineError(f"{path}: {name} gains of shape {tuple(record[name]['gain'].shape)} do not fit "
                                f"{classes} prototypes")
    if record["kind"] == MODEL_KIND:
        require_fields(path, record, {"provenance": dict}, what)
    if record.get("head") is not None or record["kind"] == PROBE_KIND:
        require_fields(path, record, {"head": dict}, what)
        check_head_record(path, record["head"], "embedded head")
        code_dim = int(record["head"]["state"]["cluster1.0.weight"].shape[0])
        if code_dim != dim:
            raise PipelineError(f"{path}: prototypes of {dim} dims behind a head whose code has {code_dim}")
    return record


def fitted_config(path: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved EM configuration a PriMaPs-EM model was fitted with; None for a Baseline or a cluster probe,
    which were not fitted by EM. A model file from before configurations were stored is refused in one line."""
    if record.get("kind") != MODEL_KIND:
        return None
    if not isinstance(record.get("em_config"), dict):
        raise PipelineError(f"{path}: written by an older primaps-pipeline that did not store its EM configuration; "
                            "rerun `fit` with --overwrite")
    return record["em_config"]


def resume_or_refuse(paths: tuple[Path, ...], recipe: dict[str, Any], provenance: dict[str, Any], *,
                     provenance_key: str, overwrite: bool) -> dict[str, Any] | None:
    """The first of `paths` (a finished file, then its partial) that exists, when it was made with this recipe from
    these inputs (its `provenance_key` entry): a rerun then finishes or reuses it. Anything else is refused in one
    line, unless `overwrite`, which deletes them. None when there is nothing to resume."""
    for path in paths:
        if not path.exists():
            continue
        if overwrite:
            path.unlink()
            continue
        try:
            record = load_checkpoint(path)
        except PipelineError as error:
            raise PipelineError(f"{error}; rerun with --overwrite to replace it") from None
        changed = differences(record.get("recipe", {}), recipe) + differences(record.get(provenance_key, {}), provenance)
        if changed:
            raise PipelineError(f"{path}: made with different settings: {'; '.join(changed[:3])}; "
                                "rerun with --overwrite to replace it")
        return record
    return None
