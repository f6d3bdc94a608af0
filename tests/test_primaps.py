"""PriMaPs proposals on planted-cluster feature maps: recovery, the stop rule, degenerate maps."""

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.primaps import (
    BACKGROUND_ID,
    PrimapsParams,
    ProposalTiming,
    masks_to_logits,
    propose_token_masks,
    proposal_map,
)

PATCH = 8


def planted_regions(grid: int, regions: int, seed: int) -> np.ndarray:
    """A grid×grid label map of `regions` Voronoi cells around random seed points."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, grid, (regions, 2))
    rows, cols = np.mgrid[:grid, :grid]
    distances = (rows[..., None] - seeds[:, 0]) ** 2 + (cols[..., None] - seeds[:, 1]) ** 2
    return distances.argmin(axis=-1)


def planted_features(labels: np.ndarray, channels: int, seed: int, offset: float = 0.5) -> np.ndarray:
    """ViT-like fp16 tokens: one random unit direction per region, a shared offset, small noise."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((labels.max() + 1, channels))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    shared = rng.standard_normal(channels)
    shared *= offset / np.linalg.norm(shared)
    noise = 0.02 * rng.standard_normal(labels.shape + (channels,))
    return (4 * (directions[labels] + shared + noise)).astype(np.float16)


def painted_crop(labels: np.ndarray, seed: int) -> np.ndarray:
    """The label map upsampled to pixels, each region in a distinct colour with a little noise."""
    rng = np.random.default_rng(seed)
    colours = rng.permutation(np.linspace(20, 235, labels.max() + 1))[:, None] * np.array([1.0, 0.6, 0.3])
    colours[:, 1] = rng.permutation(colours[:, 1])
    pixels = np.kron(labels, np.ones((PATCH, PATCH), dtype=labels.dtype))
    return np.clip(colours[pixels] + rng.normal(0, 3, pixels.shape + (3,)), 0, 255).astype(np.uint8)


def best_ious(ids: np.ndarray, labels: np.ndarray, ignore: int) -> list[float]:
    """For each planted region, the IoU of its best-matching proposed mask."""
    found = [i for i in np.unique(ids) if i != ignore]
    return [
        max(((ids == i) & (labels == region)).sum() / ((ids == i) | (labels == region)).sum() for i in found)
        for region in range(labels.max() + 1)
    ]


@pytest.mark.parametrize("grid,channels", [(40, 384), (23, 768)])
@pytest.mark.parametrize("regions", [3, 5])
def test_planted_regions_are_recovered_at_token_level(grid, channels, regions):
    labels = planted_regions(grid, regions, seed=regions)
    masks = propose_token_masks(planted_features(labels, channels, seed=regions))
    assert masks.dtype == np.int32 and masks.shape == (grid, grid)
    assert min(best_ious(masks, labels, ignore=0)) >= 0.9
    assert sorted(set(np.unique(masks)) - {0}) == list(range(1, masks.max() + 1))


def test_planted_regions_are_recovered_in_the_proposal_map():
    labels = planted_regions(40, 4, seed=7)
    features = planted_features(labels, 384, seed=7)
    crop = painted_crop(labels, seed=7)
    timing = ProposalTiming()
    ids = proposal_map(features, crop, timing=timing)
    assert ids.dtype == np.uint8 and ids.shape == crop.shape[:2]
    pixel_labels = np.kron(labels, np.ones((PATCH, PATCH), dtype=labels.dtype))
    assert min(best_ious(ids, pixel_labels, ignore=BACKGROUND_ID)) >= 0.9
    assert set(np.unique(ids)) <= set(np.unique(propose_token_masks(features))) | {BACKGROUND_ID}
    assert min(timing.pca_seconds, timing.median_seconds, timing.crf_seconds) > 0


def test_same_input_same_output():
    labels = planted_regions(40, 5, seed=3)
    features = planted_features(labels, 384, seed=3)
    crop = painted_crop(labels, seed=3)
    np.testing.assert_array_equal(propose_token_masks(features), propose_token_masks(features))
    np.testing.assert_array_equal(proposal_map(features, crop), proposal_map(features, crop))


@pytest.mark.parametrize("stop_fraction", [0.5, 0.8, 0.95])
def test_stops_as_soon_as_the_stop_fraction_is_assigned(stop_fraction):
    labels = planted_regions(40, 30, seed=11)
    masks = propose_token_masks(planted_features(labels, 384, seed=11), PrimapsParams(stop_fraction=stop_fraction))
    assert masks.max() >= 2
    assert (masks > 0).mean() >= stop_fraction
    assert ((masks > 0) & (masks < masks.max())).mean() < stop_fraction


def test_stall_guard_ends_a_loop_that_finds_no_mask():
    labels = planted_regions(40, 4, seed=5)
    masks = propose_token_masks(planted_features(labels, 384, seed=5), PrimapsParams(psi=1.5))
    assert not masks.any()


def test_zero_norm_tokens_stay_unassigned_and_the_loop_ends():
    labels = planted_regions(40, 4, seed=2)
    features = planted_features(labels, 384, seed=2)
    zero = np.random.default_rng(2).random(labels.shape) < 0.1
    features[zero] = 0
    masks = propose_token_masks(features)
    assert not masks[zero].any()
    assert masks[~zero].all()


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_masks_do_not_depend_on_the_feature_scale(scale):
    labels = planted_regions(40, 4, seed=4)
    features = planted_features(labels, 384, seed=4).astype(np.float32)
    np.testing.assert_array_equal(propose_token_masks(features * np.float32(scale)), propose_token_masks(features))


@pytest.mark.parametrize(
    "features",
    [
        np.zeros((40, 40, 384), dtype=np.float16),
        np.full((40, 40, 384), 0.7, dtype=np.float16),
        np.full((40, 40, 384), 1e-7, dtype=np.float16),
        planted_features(planted_regions(40, 4, seed=8), 384, seed=8).astype(np.float32) * np.float32(1e-40),
    ],
    ids=["zero", "constant", "fp16-subnormal", "tiny-norm"],
)
def test_degenerate_maps_give_a_valid_map(features):
    crop = np.full((320, 320, 3), 128, dtype=np.uint8)
    ids = proposal_map(features, crop)
    assert ids.dtype == np.uint8 and ids.shape == (320, 320)
    assert np.all((ids == BACKGROUND_ID) | (ids <= propose_token_masks(features).max()))
    if not features.any():
        assert np.all(ids == BACKGROUND_ID)
    elif np.ptp(features) == 0:
        assert np.all(ids == 1)


def test_center_is_subtracted_before_cosine_similarity():
    labels = planted_regions(40, 3, seed=9)
    features = planted_features(labels, 384, seed=9, offset=3.0).astype(np.float32)
    merged = propose_token_masks(features)
    centred = propose_token_masks(features, center=features.reshape(-1, 384).mean(axis=0))
    assert min(best_ious(merged, labels, ignore=0)) < 0.9
    assert min(best_ious(centred, labels, ignore=0)) >= 0.9


def test_sign_rules_on_a_worked_example():
    """Four tokens in a row, C = 2: (4, 1), (3, 1), (-1, 1), (-2, 1); ψ = 0.5.

    The available mean is (1, 1) and the centred tokens lie on the x axis, so u = ±x.
    - "mean": ⟨mean, u⟩ > 0 → u = +x → anchor (4, 1); cosines to it 1, 0.997, -0.514, -0.760 → mask 1 = tokens 0, 1;
      then the mean of the rest, (-1.5, 1), gives u = -x → anchor (-2, 1) → mask 2 = tokens 2, 3.
    - "reference": the first token minus the mean, (3, 0), projects negatively → u = -x → anchor (-2, 1);
      cosines 0.948 (token 2), -0.760, -0.707 → mask 1 = tokens 2, 3; then token 0 minus the mean of the rest,
      (0.5, 0), gives u = -x again → anchor (3, 1), cosine 0.997 to (4, 1) → mask 2 = tokens 0, 1.
    """
    features = np.array([[[4, 1], [3, 1], [-1, 1], [-2, 1]]], dtype=np.float32)
    mean_rule = propose_token_masks(features, PrimapsParams(psi=0.5, sign_rule="mean"))
    reference_rule = propose_token_masks(features, PrimapsParams(psi=0.5, sign_rule="reference"))
    np.testing.assert_array_equal(mean_rule, [[1, 1, 2, 2]])
    np.testing.assert_array_equal(reference_rule, [[2, 2, 1, 1]])
    with pytest.raises(PipelineError, match="sign_rule must be one of mean, reference"):
        PrimapsParams(sign_rule="random")


def test_more_masks_than_a_uint8_map_holds_is_an_error():
    features = np.random.default_rng(0).standard_normal((17, 17, 384)).astype(np.float32)
    with pytest.raises(PipelineError, match="254"):
        proposal_map(features, np.zeros((136, 136, 3), dtype=np.uint8))


def test_non_finite_features_are_rejected():
    features = np.ones((4, 4, 8), dtype=np.float32)
    features[1, 2, 3] = np.nan
    with pytest.raises(PipelineError):
        propose_token_masks(features)


def test_masks_to_logits_shapes_and_distributions():
    token_masks = planted_regions(10, 3, seed=1).astype(np.int32) + 1
    token_masks[:, :2] = 0
    log_probs = masks_to_logits(token_masks, (80, 96))
    assert log_probs.dtype == np.float32 and log_probs.shape == (4, 80, 96)
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=0), 1, atol=1e-5)
    assert np.all(log_probs[:, :, :8].argmax(axis=0) == 0)


def test_median_filter_removes_an_isolated_token():
    token_masks = np.ones((10, 10), dtype=np.int32)
    token_masks[5, 5] = 2
    log_probs = masks_to_logits(token_masks, (80, 80))
    winners = log_probs.argmax(axis=0)
    assert np.all(winners == 1)
    assert log_probs[2].max() < log_probs[1].min()


def test_median_filter_mirrors_the_border():
    token_masks = np.ones((10, 10), dtype=np.int32)
    token_masks[:, 0] = 2
    winners = masks_to_logits(token_masks, (10, 10)).argmax(axis=0)
    assert not np.any(winners == 2)


def test_no_masks_give_only_background():
    log_probs = masks_to_logits(np.zeros((5, 5), dtype=np.int32), (40, 40))
    assert log_probs.shape == (1, 40, 40)
    assert np.all(log_probs == 0)


def test_without_crf_the_map_is_the_argmax_of_the_logits():
    labels = planted_regions(40, 4, seed=6)
    features = planted_features(labels, 384, seed=6)
    crop = painted_crop(labels, seed=6)
    ids = proposal_map(features, crop, crf=None)
    expected = masks_to_logits(propose_token_masks(features), crop.shape[:2]).argmax(axis=0).astype(np.uint8)
    expected[expected == 0] = BACKGROUND_ID
    np.testing.assert_array_equal(ids, expected)
