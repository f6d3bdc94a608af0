"""Dense CRF: marginals are distributions and a mask boundary snaps onto a sharp image edge."""

import numpy as np
import pytest

from pipeline.crf import CRFParams, dense_crf

SIZE = 160
EDGE = 80
OFFSET = 6


def two_halves(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A crop of two flat colours split at column EDGE (little noise) and its true labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((SIZE, SIZE), dtype=np.int64)
    labels[:, EDGE:] = 1
    colours = np.array([[60, 90, 160], [200, 170, 80]], dtype=np.float64)
    image = colours[labels] + rng.normal(0, 3, (SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0)
    return shifted - np.log(np.exp(shifted).sum(axis=0))


def shifted_mask_log_probs(offset: int) -> np.ndarray:
    """0/1 logits of a two-label mask whose boundary sits `offset` pixels right of the edge."""
    right = np.zeros((SIZE, SIZE), dtype=np.float32)
    right[:, EDGE + offset :] = 1
    return log_softmax(np.stack([1 - right, right])).astype(np.float32)


def boundary_error(prediction: np.ndarray, labels: np.ndarray) -> float:
    """Mean number of mislabelled pixels per row: the distance of the boundary from the edge."""
    return float((prediction != labels).sum(axis=1).mean())


def test_boundary_snaps_onto_image_edge():
    image, labels = two_halves()
    log_probs = shifted_mask_log_probs(OFFSET)
    before = boundary_error(log_probs.argmax(axis=0), labels)
    after = boundary_error(dense_crf(image, log_probs).argmax(axis=0), labels)
    assert before == OFFSET
    assert after <= before / 6


def test_marginals_are_distributions():
    image, _ = two_halves()
    marginals = dense_crf(image, shifted_mask_log_probs(OFFSET))
    assert marginals.dtype == np.float32
    assert marginals.shape == (2, SIZE, SIZE)
    assert np.all(marginals >= 0)
    np.testing.assert_allclose(marginals.sum(axis=0), 1, atol=1e-5)


def test_same_input_same_output():
    image, _ = two_halves()
    log_probs = shifted_mask_log_probs(OFFSET)
    np.testing.assert_array_equal(dense_crf(image, log_probs), dense_crf(image, log_probs))


def test_without_pairwise_terms_the_unary_decides():
    image, _ = two_halves()
    log_probs = shifted_mask_log_probs(OFFSET)
    unary_only = CRFParams(gaussian_compat=0, bilateral_compat=0)
    np.testing.assert_array_equal(dense_crf(image, log_probs, unary_only).argmax(axis=0), log_probs.argmax(axis=0))


def test_probabilities_below_the_floor_cost_no_more_than_the_floor():
    """Unary-only, one pixel, log-probabilities 0, -20, -50: with the 1e-5 floor labels 1 and 2 both cost
    −log(1e-5), so their marginals are equal; without it the -50 label is far less likely."""
    image = np.zeros((1, 1, 3), np.uint8)
    log_probs = np.array([0.0, -20.0, -50.0], np.float32).reshape(3, 1, 1)
    floored = dense_crf(image, log_probs, CRFParams(gaussian_compat=0, bilateral_compat=0, iterations=1))[:, 0, 0]
    assert floored[1] == pytest.approx(floored[2], rel=1e-6)
    assert floored[1] == pytest.approx(1e-5 / (1 + 2e-5), rel=1e-3)
    raw = dense_crf(image, log_probs, CRFParams(gaussian_compat=0, bilateral_compat=0, iterations=1,
                                                probability_floor=0))[:, 0, 0]
    assert raw[2] < 1e-3 * raw[1]


def test_rejects_mismatched_inputs():
    image, _ = two_halves()
    with pytest.raises(ValueError):
        dense_crf(image.astype(np.float32), shifted_mask_log_probs(OFFSET))
    with pytest.raises(ValueError):
        dense_crf(image, shifted_mask_log_probs(OFFSET)[:, :-1])


def test_read_only_image_is_accepted():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 255
    image.setflags(write=False)
    log_probs = np.log(np.full((2, 8, 8), 0.5, np.float32))
    assert dense_crf(image, log_probs).shape == (2, 8, 8)
