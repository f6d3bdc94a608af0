"""Stage 3 and evaluation end to end on real cached features and masks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.store.checkpoints import load_checkpoint
from pipeline.em.config import RECIPES
from pipeline.segmenter import load_segmenter
from stages.evaluate import EvaluateSettings, run_evaluate
from stages.extract import ExtractSettings, run_extract
from stages.fit import FitSettings, baseline_path, run_fit


def fit_settings(features: Path, masks: Path, out: Path, **changes) -> FitSettings:
    return replace(FitSettings(features=features, masks=masks, classes=11, out=out, epochs=3,
                               overrides={"batch_size": 4, "init_samples": 2000, "kmeans_iterations": 10}), **changes)


def test_fit_writes_baseline_and_model(camvid_features, camvid_masks, tmp_path):
    settings = fit_settings(camvid_features, camvid_masks, tmp_path / "model.pt")
    summary = run_fit(settings, progress=False)
    assert summary.epochs_run == 3 and np.isfinite(summary.final_loss) and 0 < summary.labelled_fraction <= 1
    model, baseline = load_checkpoint(settings.out), load_checkpoint(baseline_path(settings))
    assert model["kind"] == "primaps-em" and model["complete"] and len(model["history"]) == 3
    for row in model["history"]:
        assert len(row["class_shares"]) == settings.classes and sum(row["class_shares"]) == pytest.approx(1, abs=1e-4)
    assert model["logits"] == "raw", "the default is the paper's raw-feature logits"
    assert baseline["kind"] == "baseline"
    assert torch.equal(model["init"], baseline["init"])
    assert not torch.equal(model["momentum"]["direction"], baseline["momentum"]["direction"])
    assert model["features_provenance"]["backbone"] == "dinov2_vits14_imgfocus"
    assert not settings.out.with_name("model.pt.partial").exists()
    assert run_fit(settings, progress=False).epochs_run == 0


def test_resumed_fit_equals_uninterrupted(camvid_features, camvid_masks, tmp_path):
    whole = fit_settings(camvid_features, camvid_masks, tmp_path / "whole.pt")
    run_fit(whole, progress=False)
    interrupted = replace(whole, out=tmp_path / "resumed.pt", baseline_out=tmp_path / "resumed.baseline.pt")
    first = run_fit(interrupted, progress=False, stop_after_epochs=1)
    assert first.epochs_run == 1 and not interrupted.out.exists()
    assert run_fit(interrupted, progress=False).epochs_run == 2
    expected, resumed = load_checkpoint(whole.out), load_checkpoint(interrupted.out)
    for role in ("momentum", "running"):
        for key in expected[role]:
            assert torch.equal(expected[role][key], resumed[role][key]), (role, key)
    assert expected["history"] == resumed["history"]


def other_backbone_features(camvid: Path, out: Path) -> Path:
    """The same CamVid images through a (randomly initialised) DINO ViT-S/16: other provenance."""
    run_extract(ExtractSettings(dataset="camvid", root=str(camvid), split="val", backbone="dino_vits16", out=out,
                                resolution=224, max_images=16, random_init=True, flip_average=True), progress=False)
    return out


def test_fit_refuses_other_settings_and_foreign_masks(camvid, camvid_features, camvid_masks, tmp_path):
    settings = fit_settings(camvid_features, camvid_masks, tmp_path / "model.pt", epochs=1)
    run_fit(settings, progress=False)
    tuned = RECIPES["tuned"]
    assert run_fit(replace(settings, recipe="paper").overriding(**tuned), progress=False).epochs_run == 0, \
        "the paper's recipe with the tuned keys set is the tuned recipe: the finished fit is not refused"
    for key, value in (("ema_every", 3), ("ema_max_decay", 0.98), ("vote_balance", 0.0), ("keep_share", 1.0),
                       ("learning_rate", 1e-3), ("mask_weighting", 0.0), ("vote", "restore")):
        with pytest.raises(PipelineError, match=rf"model\.pt: made with different settings: .*{key}"):
            run_fit(settings.overriding(**{key: value}), progress=False)
    with pytest.raises(PipelineError, match=r"model\.pt: made with different settings: ema_every \(file: 1, now: 10\)"):
        run_fit(replace(settings, recipe="paper"), progress=False)
    with pytest.raises(PipelineError, match=r"--set mask_weighting=-1\.0: must lie in \[0, 2\.0\]"):
        run_fit(replace(settings, out=tmp_path / "negative.pt").overriding(mask_weighting=-1.0), progress=False)
    other = other_backbone_features(camvid, tmp_path / "other.h5")
    with pytest.raises(PipelineError, match=r"camvid_val: masks were made from other features than .*other\.h5"):
        run_fit(replace(settings, features=other, out=tmp_path / "other.pt"), progress=False)
    with pytest.raises(PipelineError, match=r"other\.h5: features do not match model .*model\.pt: backbone"):
        run_evaluate(EvaluateSettings(model=settings.out, features=other, out=tmp_path / "report"), progress=False)


def test_evaluate_scores_model_and_baseline(camvid_features, camvid_masks, tmp_path):
    settings = fit_settings(camvid_features, camvid_masks, tmp_path / "model.pt")
    run_fit(settings, progress=False)
    summary = run_evaluate(EvaluateSettings(model=settings.out, baseline=baseline_path(settings),
                                            features=camvid_features, out=tmp_path / "report", crf=True), progress=False)
    for role in ("baseline", "primaps_em"):
        for variant in ("no_crf", "crf"):
            scores = summary[role][variant]
            assert 0 < scores["miou"] <= scores["pixel_accuracy"] <= 100
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert written["primaps_em"]["no_crf"] == summary["primaps_em"]["no_crf"]
    table = (tmp_path / "report" / "per_class.md").read_text()
    assert "| sky |" in table and "bicyclist" in table
    assert (tmp_path / "report" / "figures" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "report" / "figures" / "clusters.png").exists()
    assert written["labelled"] is True and 1 <= written["primaps_em"]["clusters_used"] <= 11


def test_evaluation_predictions_match_the_fitted_momentum_prototypes(camvid_features, camvid_masks, tmp_path):
    settings = fit_settings(camvid_features, camvid_masks, tmp_path / "model.pt", epochs=1)
    run_fit(settings, progress=False)
    checkpoint = load_checkpoint(settings.out)
    prototypes = load_segmenter(checkpoint).prototypes
    weight = checkpoint["momentum"]["gain"][:, None] * torch.nn.functional.normalize(checkpoint["momentum"]["direction"], dim=1)
    tokens = torch.randn(2, 16, 16, 384)
    assert not prototypes.cosine
    assert torch.allclose(prototypes(tokens), torch.einsum("bhwc,kc->bkhw", tokens, weight), atol=1e-5)
    baseline = load_segmenter(load_checkpoint(baseline_path(settings))).prototypes
    assert baseline.cosine
    cosines = baseline.pixel_logits(tokens, (32, 32))
    assert cosines.abs().max() <= 1 + 1e-5 and cosines.std() > 0.01


def test_a_held_out_fold_is_left_out_of_the_fit_and_scored_alone(camvid_features, camvid_masks, tmp_path):
    """Cross-validation on the training split: fit without a fold, score only that fold."""
    from pipeline.store.features import FeatureFile

    with FeatureFile(camvid_features) as features:
        names = features.names
        fold = names[::4]
        labelled = sum(int((features.label(names.index(name)) < 11).sum()) for name in fold)
    (tmp_path / "fold.txt").write_text("\n".join(fold) + "\n")
    whole = fit_settings(camvid_features, camvid_masks, tmp_path / "whole.pt", epochs=1)
    held = replace(whole, out=tmp_path / "held.pt", baseline_out=tmp_path / "held.baseline.pt",
                   holdout=tmp_path / "fold.txt")
    run_fit(whole, progress=False)
    run_fit(held, progress=False)
    whole_model, held_model = load_checkpoint(whole.out), load_checkpoint(held.out)
    assert whole_model["recipe"]["holdout"] is None and held_model["recipe"]["holdout"] is not None
    assert not torch.equal(whole_model["init"], held_model["init"])
    batches = -(-(len(names) - len(fold)) // whole.em_config().batch_size)
    assert held_model["em"]["steps"] == batches < load_checkpoint(whole.out)["em"]["steps"]

    summary = run_evaluate(EvaluateSettings(model=held.out, features=camvid_features, out=tmp_path / "eval",
                                            images=tmp_path / "fold.txt"), progress=False)
    details = json.loads((tmp_path / "eval" / "details.json").read_text())
    assert sum(map(sum, details["primaps_em"]["no_crf"]["confusion"])) == labelled
    assert summary["primaps_em"]["no_crf"]["pixel_accuracy"] > 0

    (tmp_path / "bad.txt").write_text(f"{names[0]}\nnot-an-image\n")
    with pytest.raises(PipelineError, match=r"bad\.txt: line 2: no image 'not-an-image' in the feature file"):
        run_fit(replace(held, holdout=tmp_path / "bad.txt", overwrite=True), progress=False)
