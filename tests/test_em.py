"""PriMaPs-EM pieces against hand computations, and the whole EM loop on planted-cluster data."""

import io
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import em
from pipeline.em import (
    EMConfig,
    PrimapsEM,
    Prototypes,
    ema_decay,
    ema_update,
    focal_class_weights,
    majority_vote,
    mask_size_weights,
    pca_directions,
    pseudo_label_loss,
    spherical_kmeans,
    upsample_logits,
    upsampled_argmax,
    upsampled_pseudo_label_loss,
)
from pipeline.errors import PipelineError
from pipeline.metrics import SegmentationEvaluator

# --- planted clusters: K orthonormal class directions painted as regions, plus a shared offset and noise ---

K, C, TOKENS, SCALE = 4, 16, 8, 4
CROP = (TOKENS * SCALE, TOKENS * SCALE)


class PlantedScenes:
    """Images of 2×2 token quadrants, each a random class; masks are the quadrants (one split in two,
    one sometimes background), like PriMaPs proposals that are pure but not one-per-object."""

    def __init__(self, seed: int, noise: float = 0.5):
        self.rng = np.random.default_rng(seed)
        basis = np.linalg.qr(self.rng.normal(size=(C, C)))[0]
        self.directions = basis[:K]
        self.offset = 3.0 * basis[K]
        self.noise = noise

    def batch(self, size: int):
        quadrant_class = self.rng.integers(0, K, size=(size, 2, 2))
        token_class = quadrant_class.repeat(TOKENS // 2, 1).repeat(TOKENS // 2, 2)
        features = 2.0 * self.directions[token_class] + self.offset + self.noise * self.rng.normal(size=(size, TOKENS, TOKENS, C))
        quadrant = np.arange(1, 5).reshape(2, 2).repeat(TOKENS // 2, 0).repeat(TOKENS // 2, 1)
        masks = np.broadcast_to(quadrant, (size, TOKENS, TOKENS)).copy()
        masks[:, : TOKENS // 4, : TOKENS // 2] = 5
        masks[self.rng.random(size) < 0.3, TOKENS // 2 :, TOKENS // 2 :] = 255
        return (
            torch.tensor(features, dtype=torch.float32),
            torch.tensor(to_crop(masks), dtype=torch.uint8),
            to_crop(token_class),
        )

    def confused_init(self, lean: float = 0.8, jitter: float = 0.05) -> np.ndarray:
        """A poor start: every prototype leans strongly toward the next class, plus a little noise."""
        return self.directions + lean * np.roll(self.directions, -1, axis=0) + jitter * self.rng.normal(size=(K, C))


def to_crop(token_map: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upsampling of B×h×w token maps to crop resolution."""
    return token_map.repeat(SCALE, 1).repeat(SCALE, 2)


def accuracy(model: PrimapsEM, features, labels) -> float:
    evaluator = SegmentationEvaluator(K)
    evaluator.process(model.predict(features, CROP).numpy(), labels)
    return evaluator.evaluate()["pixel_accuracy"]


def random_batch(seed: int, size: int = 3):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(size, 5, 6, C, generator=generator)
    student = clean + 0.3 * torch.randn(clean.shape, generator=generator)
    masks = torch.randint(1, 6, (size, 20, 24), generator=generator, dtype=torch.uint8)
    masks[:, :3] = 255
    return clean, student, masks


# --- prototypes and upsampling ---


def test_prototypes_are_gain_times_unit_direction():
    prototypes = Prototypes(3, C)
    assert torch.equal(prototypes.gain.detach(), torch.ones(3))
    features = torch.randn(2, 4, 5, C)
    direction = prototypes.direction.detach()
    expected = torch.einsum("bhwc,kc->bkhw", features, direction / direction.norm(dim=1, keepdim=True))
    torch.testing.assert_close(prototypes(features), expected)
    with torch.no_grad():
        prototypes.direction.mul_(7.0)
        prototypes.gain.copy_(torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(prototypes(features), expected * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1))


def test_logits_at_token_resolution_then_upsampled_equal_projected_upsampled_features():
    prototypes = Prototypes(5, C)
    with torch.no_grad():
        prototypes.gain.uniform_(0.5, 2.0)
    features = torch.randn(2, 5, 7, C)
    cheap = upsample_logits(prototypes(features), (40, 56))
    upsampled = F.interpolate(features.permute(0, 3, 1, 2), size=(40, 56), mode="bilinear", align_corners=False)
    expensive = prototypes(upsampled.permute(0, 2, 3, 1))
    assert cheap.shape == (2, 5, 40, 56)
    torch.testing.assert_close(cheap, expensive, atol=1e-5, rtol=1e-5)



def test_cosine_prototypes_score_normalised_upsampled_features_as_the_reference_baseline():
    prototypes = Prototypes(4, C, cosine=True)
    features = 3.0 * torch.randn(2, 5, 7, C)
    upsampled = F.interpolate(features.permute(0, 3, 1, 2), size=(40, 56), mode="bilinear", align_corners=False)
    unit_pixels = F.normalize(upsampled, dim=1)
    expected = torch.einsum("bchw,kc->bkhw", unit_pixels, F.normalize(prototypes.direction.detach(), dim=1))
    logits = prototypes.pixel_logits(features, (40, 56))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert logits.abs().max() <= 1 + 1e-5
    raw = Prototypes(4, C)
    raw.load_state_dict(prototypes.state_dict())
    assert raw.pixel_logits(features, (40, 56)).abs().max() > 5
    assert not torch.allclose(upsample_logits(prototypes(features), (40, 56)), expected, atol=1e-3)


def test_pixel_classes_are_the_argmax_of_pixel_logits_for_raw_and_cosine_prototypes():
    features = torch.randn(2, 5, 7, C)
    for cosine in (False, True):
        prototypes = Prototypes(6, C, cosine=cosine)
        with torch.no_grad():
            prototypes.gain.uniform_(0.5, 2.0)
        assert torch.equal(prototypes.pixel_classes(features, (30, 42)),
                           prototypes.pixel_logits(features, (30, 42)).argmax(dim=1))


# --- initialisation ---


def test_pca_directions_match_numpy_svd_and_sign_rule(monkeypatch):
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(500, 8)) * np.array([5, 4, 3, 2, 1, 0.5, 0.3, 0.1])) @ np.linalg.qr(rng.normal(size=(8, 8)))[0]
    features = (features + 10.0).astype(np.float32)
    monkeypatch.setattr(em.initialisation, "_COVARIANCE_CHUNK", 64)  # exercise the chunked accumulation
    directions = pca_directions(features, 3)
    reference = np.linalg.svd(features - features.mean(axis=0), full_matrices=False)[2][:3]
    assert directions.shape == (3, 8) and directions.dtype == np.float32
    np.testing.assert_allclose(np.abs(np.sum(directions * reference, axis=1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(directions @ directions.T, np.eye(3), atol=1e-5)
    largest = directions[np.arange(3), np.abs(directions).argmax(axis=1)]
    assert (largest > 0).all()


def test_pca_directions_rejects_too_many_directions():
    with pytest.raises(PipelineError, match="directions"):
        pca_directions(np.zeros((10, 4), dtype=np.float32), 5)


def test_spherical_kmeans_recovers_well_separated_clusters():
    scenes = PlantedScenes(seed=1)
    rng = np.random.default_rng(1)
    assignment = rng.integers(0, K, size=2000)
    # Cluster scales differ: spherical k-means must ignore the norm.
    points = (scenes.directions[assignment] + 0.1 * rng.normal(size=(2000, C))) * rng.uniform(0.5, 5.0, size=(2000, 1))
    init = scenes.confused_init(lean=0.5, jitter=0.1)
    centroids = spherical_kmeans(points, init, iterations=20)
    assert centroids.shape == (K, C) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    cosine = np.diag(centroids @ scenes.directions.T)
    assert (cosine > 0.99).all()


def test_spherical_kmeans_without_faiss_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(PipelineError, match=r"pip install 'primaps-pipeline\[cpu\]'"):
        spherical_kmeans(np.ones((10, 4), dtype=np.float32), np.ones((2, 4), dtype=np.float32))


# --- E-step ---


def test_majority_vote_on_crafted_batch_with_ties_and_background():
    masks = torch.tensor(
        [
            [[1, 1, 1, 1], [2, 2, 255, 255]],
            [[1, 1, 3, 3], [1, 1, 3, 3]],
        ],
        dtype=torch.uint8,
    )
    predictions = torch.tensor(
        [
            [[0, 2, 2, 1], [3, 1, 0, 0]],  # mask 1 → 2 (two votes of four); mask 2 ties 3 vs 1 → 1
            [[0, 0, 2, 1], [0, 1, 2, 0]],  # the same mask id in another image is another mask: 1 → 0, 3 → 2
        ]
    )
    pseudo = majority_vote(predictions, masks, num_classes=4)
    expected = torch.tensor(
        [
            [[2, 2, 2, 2], [1, 1, 255, 255]],
            [[0, 0, 2, 2], [0, 0, 2, 2]],
        ],
        dtype=torch.uint8,
    )
    assert pseudo.dtype == torch.uint8
    assert torch.equal(pseudo, expected)

    # Shares: image 0 mask 1 = 2/4, mask 2 = 1/2; image 1 mask 1 = 3/4, mask 3 = 2/4.
    strict = majority_vote(predictions, masks, num_classes=4, min_share=0.6)
    expected_strict = torch.tensor(
        [
            [[255, 255, 255, 255], [255, 255, 255, 255]],
            [[0, 0, 255, 255], [0, 0, 255, 255]],
        ],
        dtype=torch.uint8,
    )
    assert torch.equal(strict, expected_strict)


def test_majority_vote_equals_per_mask_counting():
    generator = torch.Generator().manual_seed(3)
    predictions = torch.randint(0, 5, (3, 12, 10), generator=generator)
    masks = torch.randint(0, 7, (3, 12, 10), generator=generator, dtype=torch.uint8)
    masks[masks == 6] = 255
    pseudo = majority_vote(predictions, masks, num_classes=5, min_share=0.35)
    for image in range(3):
        for mask_id in masks[image].unique().tolist():
            where = masks[image] == mask_id
            votes = Counter(predictions[image][where].tolist())
            top = max(votes.values())
            winner = min(c for c, n in votes.items() if n == top)
            if mask_id == 255 or top < 0.35 * where.sum().item():
                winner = 255
            assert (pseudo[image][where] == winner).all()


# --- M-step ---


def test_focal_class_weights_against_hand_computation():
    probabilities = torch.tensor(
        [
            [[[0.7, 0.1]], [[0.2, 0.3]], [[0.1, 0.6]]],
            [[[0.5, 0.2]], [[0.25, 0.4]], [[0.25, 0.4]]],
        ],
        requires_grad=True,
    )  # B=2, K=3, H=1, W=2
    for gamma in (2.0, 1.5):
        means = [(0.7 + 0.1 + 0.5 + 0.2) / 4, (0.2 + 0.3 + 0.25 + 0.4) / 4, (0.1 + 0.6 + 0.25 + 0.4) / 4]
        weights = focal_class_weights(probabilities, gamma)
        assert not weights.requires_grad
        torch.testing.assert_close(weights, torch.tensor([(1 - m) ** gamma for m in means]))


def test_pseudo_label_loss_is_weighted_ce_averaged_over_all_pixels():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    pseudo = torch.randint(0, 3, (2, 4, 5), generator=generator, dtype=torch.uint8)
    pseudo[0, 0] = 255
    loss = pseudo_label_loss(logits, pseudo, gamma=2.0)

    probabilities = logits.detach().softmax(dim=1)
    weights = [(1 - probabilities[:, c].mean().item()) ** 2 for c in range(3)]
    log_probabilities = logits.log_softmax(dim=1)
    total = 0.0
    for b in range(2):
        for y in range(4):
            for x in range(5):
                target = int(pseudo[b, y, x])
                if target != 255:
                    total = total - weights[target] * log_probabilities[b, target, y, x]
    expected = total / pseudo.numel()
    torch.testing.assert_close(loss, expected)
    (gradient,) = torch.autograd.grad(loss, logits)
    (expected_gradient,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(gradient, expected_gradient)


def test_mask_size_weights_give_every_region_the_same_total():
    # The same ids in both images: image 0 has mask 1 (1 pixel), mask 2 (3) and 2 pixels outside every mask;
    # image 1 has mask 1 (4 pixels) and 2 outside. Regions are counted per image.
    masks = torch.tensor([[[1, 2, 2, 2, 255, 255]], [[1, 1, 1, 1, 255, 255]]], dtype=torch.uint8)
    weights = mask_size_weights(masks, exponent=1.0)
    torch.testing.assert_close(weights, torch.tensor([[[1, 1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2]],
                                                      [[1 / 4, 1 / 4, 1 / 4, 1 / 4, 1 / 2, 1 / 2]]]))
    torch.testing.assert_close(mask_size_weights(masks, exponent=0.0), torch.ones(2, 1, 6))
    torch.testing.assert_close(mask_size_weights(masks, exponent=0.5)[0, 0, 1], torch.tensor(3 ** -0.5))


def test_mask_weighted_loss_is_the_mean_over_masks_of_each_masks_mean_loss():
    generator = torch.Generator().manual_seed(5)
    masks = torch.tensor([[[1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 1, 2]], [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 2]]],
                         dtype=torch.uint8)
    logits = torch.randn(2, 3, 2, 6, generator=generator)
    pseudo = torch.randint(0, 3, (2, 2, 6), generator=generator, dtype=torch.uint8)
    loss = pseudo_label_loss(logits, pseudo, gamma=0.0, pixel_weights=mask_size_weights(masks, 1.0))

    per_pixel = F.cross_entropy(logits, pseudo.long(), reduction="none")
    per_mask = [per_pixel[b][masks[b] == m].mean() for b in range(2) for m in masks[b].unique().tolist()]
    torch.testing.assert_close(loss, torch.stack(per_mask).mean())
    assert not torch.allclose(loss, per_pixel.mean())


def test_pixel_weights_ignore_unlabelled_pixels_and_keep_the_unweighted_loss_when_uniform():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 3, 3, 4, generator=generator)
    pseudo = torch.randint(0, 3, (1, 3, 4), generator=generator, dtype=torch.uint8)
    pseudo[0, 0] = 255
    uniform = pseudo_label_loss(logits, pseudo, gamma=2.0, pixel_weights=torch.full((1, 3, 4), 7.0))
    torch.testing.assert_close(uniform, pseudo_label_loss(logits, pseudo, gamma=2.0))
    with pytest.raises(PipelineError, match=r"pixel weights of shape \(1, 3, 3\) for pseudo labels of shape \(1, 3, 4\)"):
        pseudo_label_loss(logits, pseudo, pixel_weights=torch.ones(1, 3, 3))
    unlabelled_only = torch.ones(1, 3, 4)
    unlabelled_only[0, 0] = 1000.0
    torch.testing.assert_close(pseudo_label_loss(logits, pseudo, gamma=2.0, pixel_weights=unlabelled_only),
                               pseudo_label_loss(logits, pseudo, gamma=2.0))


@pytest.mark.parametrize("images_per_chunk", [1, 2, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_upsampled_loss_equals_the_loss_of_upsampled_logits_in_value_and_gradient(monkeypatch, images_per_chunk,
                                                                                   weighted):
    size = (40, 56)
    generator = torch.Generator().manual_seed(11)
    logits = 4 * torch.randn(5, 3, 5, 7, generator=generator)
    pseudo = torch.randint(0, 3, (5, *size), generator=generator, dtype=torch.uint8)
    pseudo[:, :9] = 255
    masks = torch.randint(0, 4, (5, *size), generator=generator, dtype=torch.uint8)
    pixel_weights = mask_size_weights(masks, 1.0) if weighted else None
    monkeypatch.setattr(em.prototypes, "_CACHE_CHUNK_ELEMENTS", images_per_chunk * 3 * size[0] * size[1])

    fast_input = logits.clone().requires_grad_(True)
    fast = upsampled_pseudo_label_loss(fast_input, size, pseudo, gamma=2.0, pixel_weights=pixel_weights)
    (2 * fast).backward()
    plain_input = logits.clone().requires_grad_(True)
    plain = pseudo_label_loss(upsample_logits(plain_input, size), pseudo, gamma=2.0, pixel_weights=pixel_weights)
    (2 * plain).backward()
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(fast_input.grad, plain_input.grad)


def test_upsampled_loss_stays_exact_where_the_target_probability_underflows():
    size = (8, 8)
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = 300.0
    pseudo = torch.ones(1, *size, dtype=torch.uint8)
    fast = upsampled_pseudo_label_loss(logits, size, pseudo, gamma=0.0)
    torch.testing.assert_close(fast, pseudo_label_loss(upsample_logits(logits, size), pseudo, gamma=0.0))
    assert fast.item() == pytest.approx(300.0)
    with pytest.raises(PipelineError, match=r"pseudo labels of size \(8, 8\) for crop size \(8, 9\)"):
        upsampled_pseudo_label_loss(logits, (8, 9), pseudo)


def test_upsampled_argmax_is_the_argmax_of_the_upsampled_logits(monkeypatch):
    logits = torch.randn(5, 6, 5, 7, generator=torch.Generator().manual_seed(12))
    expected = upsample_logits(logits, (30, 42)).argmax(dim=1)
    for images_per_chunk in (1, 2, 8):
        monkeypatch.setattr(em.prototypes, "_CACHE_CHUNK_ELEMENTS", images_per_chunk * 6 * 30 * 42)
        assert torch.equal(upsampled_argmax(logits, (30, 42)), expected)


# --- EMA ---


def test_ema_decay_sequence():
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == pytest.approx(1 / 2)
    assert ema_decay(2) == pytest.approx(2 / 3)
    for k in range(200):
        assert ema_decay(k) == pytest.approx(min(k / (k + 1), 0.98))
    assert ema_decay(49) == pytest.approx(0.98)
    assert ema_decay(50) == 0.98 and ema_decay(10_000) == 0.98
    assert ema_decay(3, max_decay=0.5) == 0.5


def test_ema_update_blends_every_parameter():
    momentum, running = Prototypes(3, C), Prototypes(3, C)
    with torch.no_grad():
        running.gain.fill_(3.0)
    before = [p.detach().clone() for p in momentum.parameters()]
    ema_update(momentum, running, 0.75)
    for old, new, fast in zip(before, momentum.parameters(), running.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * fast)
    ema_update(momentum, running, ema_decay(0))
    for new, fast in zip(momentum.parameters(), running.parameters()):
        assert torch.equal(new, fast)


# --- the EM loop ---


def test_momentum_stays_at_init_until_the_first_ema_update_copies_running():
    init = PlantedScenes(seed=5).confused_init()
    model = PrimapsEM(init, EMConfig(num_classes=K, ema_every=10))
    initial = model.momentum.state_dict()
    for step in range(10):
        model.step(*random_batch(step))
        if step < 9:
            for name, value in model.momentum.state_dict().items():
                assert torch.equal(value, initial[name])
    assert model.ema_updates == 1
    for name, value in model.momentum.state_dict().items():
        assert torch.equal(value, model.running.state_dict()[name])


def test_step_weighs_the_loss_by_mask_when_configured():
    init = PlantedScenes(seed=8).confused_init()
    clean, student, masks = random_batch(8)
    masks[0, 3:] = 1
    weighted = PrimapsEM(init, EMConfig(num_classes=K, mask_weighting=1.0))
    size = tuple(masks.shape[-2:])
    with torch.no_grad():
        pseudo = em.e_step(upsample_logits(weighted.momentum(clean), size), masks, K)
        expected = pseudo_label_loss(upsample_logits(weighted.running(student), size), pseudo,
                                     pixel_weights=mask_size_weights(masks, 1.0))
    loss = weighted.step(clean, student, masks)["loss"]
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    per_pixel = PrimapsEM(init, EMConfig(num_classes=K)).step(clean, student, masks)["loss"]
    assert per_pixel != pytest.approx(loss, rel=1e-3)


def test_labelled_fraction_is_the_share_of_mask_pixels():
    clean, student, masks = random_batch(7)
    model = PrimapsEM(PlantedScenes(seed=7).confused_init(), EMConfig(num_classes=K))
    result = model.step(clean, student, masks)
    assert result["labelled_fraction"] == pytest.approx((masks != 255).float().mean().item())


@pytest.mark.parametrize("balance", [0.0, 1.0])
def test_class_pixels_count_the_e_step_pseudo_labels_per_class(balance):
    clean, student, masks = random_batch(5)
    model = PrimapsEM(PlantedScenes(seed=5).confused_init(), EMConfig(num_classes=K, vote_balance=balance))
    with torch.no_grad():
        logits = upsample_logits(model.momentum(clean), tuple(masks.shape[-2:]))
        pseudo = em.e_step(logits, masks, K, balance=balance)
        plain = em.e_step(logits, masks, K)
    counts = model.step(clean, student, masks)["class_pixels"]
    assert counts == [int((pseudo == k).sum()) for k in range(K)]
    assert sum(counts) == int((masks != 255).sum()) and sum(count > 0 for count in counts) >= 2
    assert torch.equal(pseudo, plain) == (balance == 0.0)


def test_em_on_planted_clusters_reaches_95_percent_from_a_poor_init():
    scenes = PlantedScenes(seed=0)
    test_features, _, test_labels = scenes.batch(32)
    model = PrimapsEM(scenes.confused_init(), EMConfig(num_classes=K))
    initial = accuracy(model, test_features, test_labels)
    for _ in range(80):
        features, masks, _ = scenes.batch(8)
        student = features + 0.15 * torch.from_numpy(scenes.rng.normal(size=features.shape)).float()
        model.step(features, student, masks)
    final = accuracy(model, test_features, test_labels)
    assert initial < 90.0
    assert final >= 95.0


def test_resume_from_state_dict_equals_uninterrupted_fit():
    init = PlantedScenes(seed=8).confused_init()
    config = EMConfig(num_classes=K, ema_every=3)
    batches = [random_batch(seed) for seed in range(12)]

    uninterrupted = PrimapsEM(init, config)
    for batch in batches[:7]:
        uninterrupted.step(*batch)
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    reference = [uninterrupted.step(*batch) for batch in batches[7:]]

    resumed = PrimapsEM(init, config)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.steps == 7 and resumed.ema_updates == 2
    assert [resumed.step(*batch) for batch in batches[7:]] == reference
    for name in ("running", "momentum"):
        for key, value in getattr(uninterrupted, name).state_dict().items():
            assert torch.equal(value, getattr(resumed, name).state_dict()[key])


def test_predict_returns_class_ids_at_crop_size():
    model = PrimapsEM(PlantedScenes(seed=9).confused_init(), EMConfig(num_classes=K))
    prediction = model.predict(torch.randn(2, 5, 6, C), (20, 24))
    assert prediction.shape == (2, 20, 24) and prediction.dtype == torch.int64
    assert 0 <= prediction.min() and prediction.max() < K


def test_vote_balance_lets_a_small_class_win_the_mask_it_over_represents():
    # One 10×10 image; a 10-pixel mask (row 0) holds 3 pixels of class 1 and 7 of class 0; the other 90 pixels
    # (outside every mask) are class 0, so the batch shares are π = (0.97, 0.03).
    predictions = torch.zeros(1, 10, 10, dtype=torch.long)
    predictions[0, 0, :3] = 1
    masks = torch.full((1, 10, 10), 255, dtype=torch.uint8)
    masks[0, 0] = 0
    row = lambda balance: majority_vote(predictions, masks, num_classes=2, balance=balance)[0, 0].unique().tolist()
    assert row(0.0) == [0]  # the paper's count: 7 against 3
    assert row(0.2) == [0]  # 7 / 0.97^0.2 = 7.04 against 3 / 0.03^0.2 = 6.05
    assert row(0.5) == [1]  # 7 / 0.97^0.5 = 7.11 against 3 / 0.03^0.5 = 17.3
    # min_share judges the winner's own share of the mask: class 1 covers 3/10 of it.
    assert majority_vote(predictions, masks, 2, min_share=0.4, balance=0.5)[0, 0].unique().tolist() == [255]
    assert majority_vote(predictions, masks, 2, min_share=0.25, balance=0.5)[0, 0].unique().tolist() == [1]


def test_keep_share_leaves_a_sizeable_minority_its_own_pixels():
    # A 10-pixel mask (row 0) of 6 pixels of class 0, 3 of class 1 and 1 of class 2; row 1 lies outside every mask.
    predictions = torch.tensor([[[1, 1, 1, 2, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]])
    masks = torch.tensor([[[0] * 10, [255] * 10]], dtype=torch.uint8)
    vote = lambda **options: majority_vote(predictions, masks, num_classes=3, **options)[0].tolist()
    assert vote() == [[0] * 10, [255] * 10]
    assert vote(keep_share=0.5) == vote()  # only the majority can cover half of a mask
    assert vote(keep_share=0.3) == [[1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [255] * 10]  # class 1: 3/10
    assert vote(keep_share=0.1) == [predictions[0, 0].tolist(), [255] * 10]  # class 2: 1/10


def test_balanced_vote_with_kept_shares_equals_per_mask_scoring():
    generator = torch.Generator().manual_seed(5)
    predictions = torch.randint(0, 5, (3, 12, 10), generator=generator)
    predictions[predictions == 4] = 0  # class 0 is common, class 4 absent from the batch
    masks = torch.randint(0, 7, (3, 12, 10), generator=generator, dtype=torch.uint8)
    masks[masks == 6] = 255
    shares = Counter(predictions.flatten().tolist())
    pseudo = majority_vote(predictions, masks, num_classes=5, balance=0.7, keep_share=0.3)
    for image in range(3):
        for mask_id in masks[image].unique().tolist():
            where = masks[image] == mask_id
            votes = Counter(predictions[image][where].tolist())
            scores = {c: n / (shares[c] / predictions.numel()) ** 0.7 for c, n in votes.items()}
            top = max(scores.values())
            winner = 255 if mask_id == 255 else min(c for c, v in scores.items() if v == top)
            for pixel, label in zip(predictions[image][where].tolist(), pseudo[image][where].tolist()):
                kept = mask_id != 255 and votes[pixel] >= 0.3 * where.sum().item()
                assert label == (pixel if kept else winner)


def test_init_with_wrong_number_of_prototypes_is_refused():
    with pytest.raises(PipelineError, match="initial prototypes"):
        PrimapsEM(np.zeros((3, C), dtype=np.float32), EMConfig(num_classes=K))


def test_e_step_teacher_fallback_labels_what_the_vote_leaves_out():
    # One image, 1×6 pixels: mask 1 covers pixels 0-2 (teacher 0, 0, 1: majority 0 with share 2/3),
    # mask 2 covers pixels 3-4 (teacher 1, 2: a tie at share 1/2), pixel 5 lies outside every mask.
    teacher = torch.tensor([[[0, 0, 1, 1, 2, 2]]])
    logits = F.one_hot(teacher, 3).permute(0, 3, 1, 2).float()
    masks = torch.tensor([[[1, 1, 1, 2, 2, 255]]], dtype=torch.uint8)
    assert em.e_step(logits, masks, 3).tolist() == [[[0, 0, 0, 1, 1, 255]]]
    assert em.e_step(logits, masks, 3, min_share=0.6).tolist() == [[[0, 0, 0, 255, 255, 255]]]
    assert em.e_step(logits, masks, 3, min_share=0.6, teacher_fallback=True).tolist() == [[[0, 0, 0, 1, 2, 2]]]
