"""The dataset-level Hungarian metric against hand-built cases and a brute-force reference."""

from itertools import permutations

import numpy as np
import pytest

from pipeline.metrics import SegmentationEvaluator, confusion_matrix, hungarian_match


def brute_force_scores(predictions, labels, num_clusters, num_classes):
    """Try every one-to-one cluster→class assignment, score it pixel by pixel, keep the most matched pixels."""
    valid = (labels >= 0) & (labels < num_classes)
    predictions, labels = predictions[valid], labels[valid]
    best = None
    for classes in permutations(list(range(num_classes)) + [-1] * max(num_clusters - num_classes, 0), num_clusters):
        mapped = np.array([classes[p] for p in predictions])
        hits = int((mapped == labels).sum())
        if best is None or hits > best[0]:
            best = (hits, mapped)
    hits, mapped = best
    ious = []
    for c in range(num_classes):
        union = int(((mapped == c) | (labels == c)).sum())
        ious.append(100.0 * int(((mapped == c) & (labels == c)).sum()) / union if union else None)
    return 100.0 * hits / len(labels), ious


def test_confusion_matrix_counts_every_pixel_pair():
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 4, size=(3, 5, 7))
    labels = rng.integers(0, 3, size=(3, 5, 7))
    labels[0, 0, :] = 255
    expected = np.zeros((4, 3), dtype=np.int64)
    for p, l in zip(predictions.ravel(), labels.ravel()):
        if l != 255:
            expected[p, l] += 1
    np.testing.assert_array_equal(confusion_matrix(predictions, labels, 4, 3), expected)


def test_confusion_matrix_rejects_out_of_range_clusters():
    with pytest.raises(ValueError, match="cluster ids"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3, 2)


def test_hungarian_match_equals_brute_force():
    rng = np.random.default_rng(1)
    for clusters, classes in [(4, 4), (5, 3), (3, 4)]:
        confusion = rng.integers(0, 50, size=(clusters, classes))
        mapping = hungarian_match(confusion)
        matched = sum(confusion[k, c] for k, c in enumerate(mapping) if c >= 0)
        assert len(set(c for c in mapping if c >= 0)) == min(clusters, classes)
        best = max(
            sum(confusion[k, c] for k, c in enumerate(assignment) if c >= 0)
            for assignment in permutations(list(range(classes)) + [-1] * max(clusters - classes, 0), clusters)
        )
        assert matched == best


def test_permuted_perfect_prediction_scores_100():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, size=(4, 16, 16))
    labels[:, :2] = 255
    permutation = rng.permutation(5)
    evaluator = SegmentationEvaluator(5, class_names=list("abcde"))
    evaluator.process(permutation[np.where(labels == 255, 0, labels)], labels)
    result = evaluator.evaluate()
    assert result["pixel_accuracy"] == pytest.approx(100.0)
    assert result["miou"] == pytest.approx(100.0)
    assert result["matching"] == permutation.tolist()
    counts = np.bincount(labels[labels != 255], minlength=5)
    np.testing.assert_array_equal(np.array(result["confusion"]), np.diag(counts))
    assert set(result["per_class_iou"]) == set("abcde")


@pytest.mark.parametrize("num_clusters", [3, 5])
def test_scores_equal_brute_force_with_as_many_or_more_clusters(num_clusters):
    rng = np.random.default_rng(num_clusters)
    labels = rng.integers(0, 3, size=(2, 8, 9))
    # Mostly a relabelling of the truth, with noise, so the matching is not trivial.
    predictions = np.where(rng.random(labels.shape) < 0.6, (labels + 1) % 3, rng.integers(0, num_clusters, labels.shape))
    evaluator = SegmentationEvaluator(3, num_clusters=num_clusters)
    for image in range(2):
        evaluator.process(predictions[image], labels[image])
    result = evaluator.evaluate()
    accuracy, ious = brute_force_scores(predictions.ravel(), labels.ravel(), num_clusters, 3)
    assert result["pixel_accuracy"] == pytest.approx(accuracy)
    assert list(result["per_class_iou"].values()) == pytest.approx(ious)
    assert result["miou"] == pytest.approx(np.mean(ious))


def test_more_clusters_than_classes_counts_unmatched_pixels_as_wrong():
    labels = np.array([0, 0, 0, 1, 1, 1])
    predictions = np.array([0, 0, 2, 1, 1, 1])  # cluster 2 holds one class-0 pixel and stays unmatched
    evaluator = SegmentationEvaluator(2, num_clusters=3)
    evaluator.process(predictions, labels)
    result = evaluator.evaluate()
    assert result["matching"] == [0, 1]
    assert result["pixel_accuracy"] == pytest.approx(100.0 * 5 / 6)
    assert result["per_class_iou"] == pytest.approx({"0": 100.0 * 2 / 3, "1": 100.0})


def test_class_absent_from_split_and_predictions_is_excluded_from_miou():
    labels = np.array([0, 0, 1, 1, 1, 1])
    predictions = np.array([0, 1, 1, 1, 1, 1])
    evaluator = SegmentationEvaluator(3, class_names=["sky", "road", "car"])
    evaluator.process(predictions, labels)
    result = evaluator.evaluate()
    iou_sky, iou_road = 100.0 * 1 / 2, 100.0 * 4 / 5
    assert result["per_class_iou"] == {"sky": pytest.approx(iou_sky), "road": pytest.approx(iou_road), "car": None}
    assert result["miou"] == pytest.approx((iou_sky + iou_road) / 2)


def test_class_absent_from_split_but_predicted_counts_as_zero():
    labels = np.array([0, 0, 0, 1, 1])
    predictions = np.array([0, 0, 2, 1, 1])  # cluster 2 must go to the absent class and is all wrong
    evaluator = SegmentationEvaluator(3)
    evaluator.process(predictions, labels)
    result = evaluator.evaluate()
    assert result["matching"] == [0, 1, 2]
    assert result["per_class_iou"]["2"] == 0.0
    assert result["miou"] == pytest.approx((100.0 * 2 / 3 + 100.0 + 0.0) / 3)


def test_ignored_labels_change_nothing():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, size=200)
    predictions = rng.integers(0, 4, size=200)
    plain = SegmentationEvaluator(4)
    plain.process(predictions, labels)
    padded = SegmentationEvaluator(4)
    padded.process(
        np.concatenate([predictions, rng.integers(0, 4, size=50)]),
        np.concatenate([labels, np.full(40, 255), np.full(10, -1)]),
    )
    assert padded.evaluate() == plain.evaluate()


def test_reset_forgets_processed_batches():
    evaluator = SegmentationEvaluator(2)
    evaluator.process(np.array([1, 1]), np.array([0, 1]))
    evaluator.reset()
    evaluator.process(np.array([0, 1]), np.array([0, 1]))
    assert evaluator.evaluate()["pixel_accuracy"] == pytest.approx(100.0)
