"""`inspect`, `predict` and `report` on real cached CamVid features, masks and a briefly fitted model."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.store.checkpoints import load_checkpoint, save_checkpoint
from pipeline.store.features import FeatureFile
from pipeline.viz import TITLE_HEIGHT
from pipeline.segmenter import load_segmenter
from stages.evaluate import EvaluateSettings, run_evaluate
from stages.extract import ExtractSettings, run_extract
from stages.fit import FitSettings, run_fit
from stages.inspect import InspectSettings, run_inspect
from stages.predict import PredictSettings, run_predict
from stages.report import ReportSettings, run_report

CLASSES = 11


@pytest.fixture(scope="module")
def model(camvid_features, camvid_masks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "model.pt"
    run_fit(FitSettings(features=camvid_features, masks=camvid_masks, classes=CLASSES, out=out, epochs=1,
                        overrides={"batch_size": 4, "init_samples": 2000, "kmeans_iterations": 5}), progress=False)
    return out


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [unquote(value) for key, value in attrs if key in ("src", "href") and value]


def linked_files(page: Path) -> list[Path]:
    """Every src/href of an HTML page, resolved against its directory."""
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return [page.parent / link for link in parser.links]


def test_inspect_renders_requested_images_and_a_gallery(camvid_features, camvid_masks, model, tmp_path):
    with FeatureFile(camvid_features) as features:
        names = (features.names[3], features.names[10])
        crop, resolution = features.crop(3), features.resolution
    summary = run_inspect(InspectSettings(features=camvid_features, masks=camvid_masks, out=tmp_path, model=model,
                                          images=names), progress=False)
    pictures = sorted(tmp_path.glob("*.png"))
    assert [picture.stem for picture in pictures] == sorted(names) and len(summary.figures) == 2
    strip = np.asarray(Image.open(tmp_path / f"{names[0]}.png"))
    # crop | masks | pseudo label | prediction | ground truth, under one title bar
    assert strip.shape == (resolution + TITLE_HEIGHT, 5 * resolution, 3)
    assert np.array_equal(strip[TITLE_HEIGHT:, :resolution], crop)
    links = linked_files(tmp_path / "index.html")
    assert len(links) == 4 and all(link.is_file() for link in links)
    page = (tmp_path / "index.html").read_text()
    assert "dinov2_vits14_imgfocus" in page and "not matched" in page and "coverage" in page


def test_inspect_samples_without_a_model_and_refuses_unknown_names(camvid_features, camvid_masks, tmp_path):
    summary = run_inspect(InspectSettings(features=camvid_features, masks=camvid_masks, out=tmp_path / "a", sample=3,
                                          seed=1), progress=False)
    pictures = list((tmp_path / "a").glob("*.png"))
    assert len(pictures) == 3 == len(summary.figures)
    width = np.asarray(Image.open(pictures[0])).shape[1]
    assert width == 3 * 224  # crop | masks | ground truth
    with pytest.raises(PipelineError, match="has no image named 'nope'"):
        run_inspect(InspectSettings(features=camvid_features, masks=camvid_masks, out=tmp_path / "b",
                                    images=("nope",)), progress=False)


def test_predict_keeps_any_image_size(camvid, model, tmp_path):
    photo = sorted((camvid / "val").glob("*.png"))[0]
    with Image.open(photo) as image:
        image.convert("RGB").crop((40, 60, 340, 230)).save(tmp_path / "odd.png")
    run_predict(PredictSettings(model=model, images=(tmp_path / "odd.png",), out=tmp_path / "out", device="cpu"),
                progress=False)
    clusters = np.asarray(Image.open(tmp_path / "out" / "odd.png"))
    assert clusters.dtype == np.uint8 and clusters.shape == (170, 300)
    assert clusters.max() < CLASSES and len(np.unique(clusters)) > 1
    assert np.asarray(Image.open(tmp_path / "out" / "odd_overlay.png")).shape == (170, 300, 3)
    run_predict(PredictSettings(model=model, images=(tmp_path / "odd.png",), out=tmp_path / "crf", device="cpu",
                                crf=True), progress=False)
    refined = np.asarray(Image.open(tmp_path / "crf" / "odd.png"))
    assert refined.shape == (170, 300) and refined.max() < CLASSES
    with pytest.raises(PipelineError, match=r"missing\.jpg: cannot read image"):
        run_predict(PredictSettings(model=model, images=(tmp_path / "missing.jpg",), out=tmp_path / "out"),
                    progress=False)


def test_predict_on_a_cached_crop_matches_the_cached_features(camvid_features, model, tmp_path):
    """A crop of exactly R×R is not resized, so predict must agree with θ_M on its cached tokens."""
    with FeatureFile(camvid_features) as features:
        crop, tokens = features.crop(0), features.features(0).astype(np.float32)
    Image.fromarray(crop).save(tmp_path / "crop.png")
    run_predict(PredictSettings(model=model, images=(tmp_path / "crop.png",), out=tmp_path / "out", device="cpu"),
                progress=False)
    with torch.no_grad():
        logits = load_segmenter(load_checkpoint(model)).prototypes(torch.from_numpy(tokens)[None])
        expected = torch.nn.functional.interpolate(logits, size=crop.shape[:2], mode="bilinear").argmax(1)[0].numpy()
    agreement = (np.asarray(Image.open(tmp_path / "out" / "crop.png")) == expected).mean()
    assert agreement > 0.99  # cached tokens are float16


def test_predict_refuses_other_backbone_weights(model, camvid, tmp_path):
    checkpoint = load_checkpoint(model)
    checkpoint["features_provenance"] = {**checkpoint["features_provenance"], "weights_sha256": "0" * 64}
    save_checkpoint(tmp_path / "other.pt", checkpoint)
    photo = sorted((camvid / "val").glob("*.png"))[0]
    with pytest.raises(PipelineError, match=r"weights sha256 .* differ from those model .*other\.pt"):
        run_predict(PredictSettings(model=tmp_path / "other.pt", images=(photo,), out=tmp_path / "out"),
                    progress=False)
    assert not (tmp_path / "out").exists()


def test_report_shows_metrics_and_gallery(camvid_features, camvid_masks, model, tmp_path):
    run_evaluate(EvaluateSettings(model=model, features=camvid_features, out=tmp_path / "metrics"), progress=False)
    summary = run_report(ReportSettings(features=camvid_features, masks=camvid_masks, model=model,
                                        metrics=tmp_path / "metrics", out=tmp_path / "report", sample=2),
                         progress=False)
    page = tmp_path / "report" / "index.html"
    text = page.read_text()
    assert summary.has_metrics and "<table>" in text and "mIoU" in text and "no metrics" not in text
    links = linked_files(page)
    assert {tmp_path / "report" / name for name in ("confusion.png", "clusters.png", "history.png")} <= set(links)
    assert len(links) == 3 + 2 * 2 and all(link.is_file() for link in links)


def test_report_without_labels_says_so(camvid, camvid_features, camvid_masks, model, tmp_path):
    """Metrics of an unlabelled split (plain photos through the same backbone): no accuracy, still a page."""
    photos = tmp_path / "photos.h5"
    run_extract(ExtractSettings(dataset="folder", root=str(camvid / "val"), split="val", out=photos,
                                backbone="dinov2_vits14_imgfocus", resolution=224, max_images=2), progress=False)
    run_evaluate(EvaluateSettings(model=model, features=photos, out=tmp_path / "metrics"), progress=False)
    summary = run_report(ReportSettings(features=camvid_features, masks=camvid_masks, model=model,
                                        metrics=tmp_path / "metrics", out=tmp_path / "report", sample=1),
                         progress=False)
    page = tmp_path / "report" / "index.html"
    text = page.read_text()
    assert not summary.has_metrics and "no labels: no metrics" in text and "Confusion" not in text
    links = linked_files(page)
    assert tmp_path / "report" / "clusters.png" in links and all(link.is_file() for link in links)


def test_predictions_are_recoloured_by_the_class_each_cluster_was_matched_to():
    from stages.inspect import _matched

    clusters = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(_matched(clusters, (2, 0, -1)), [[1, 255], [0, 255]])


def test_a_model_from_before_recipes_still_predicts_and_inspect_names_the_fix(camvid_features, camvid_masks, model,
                                                                              tmp_path):
    """A model file written before the EM configuration was stored: prediction needs only its prototypes; the
    pseudo-label panel needs the E-step's configuration, so inspect refuses in one line naming `fit`."""
    old = load_checkpoint(model)
    for key in ("em_config", "recipe_name"):
        old.pop(key)
    save_checkpoint(tmp_path / "old.pt", {key: value for key, value in old.items() if key != "format_version"})
    photo = tmp_path / "crop.png"
    with FeatureFile(camvid_features) as features:
        Image.fromarray(features.crop(0)).save(photo)
    run_predict(PredictSettings(model=tmp_path / "old.pt", images=(photo,), out=tmp_path / "out", device="cpu"),
                progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "crop.png")),
                          np.asarray(Image.open(_predicted(model, photo, tmp_path / "new"))))
    with pytest.raises(PipelineError, match=r"old\.pt: written by an older primaps-pipeline .* rerun `fit` with --overwrite$"):
        run_inspect(InspectSettings(features=camvid_features, masks=camvid_masks, out=tmp_path / "inspect",
                                    model=tmp_path / "old.pt", sample=1), progress=False)


def _predicted(model: Path, photo: Path, out: Path) -> Path:
    run_predict(PredictSettings(model=model, images=(photo,), out=out, device="cpu"), progress=False)
    return out / photo.name
