"""The E-step rules that keep a class alive (`transport`, `restore`) against the paper's majority vote."""

import numpy as np
import pytest
import torch

from pipeline.em import EMConfig, PrimapsEM, majority_vote
from pipeline.em.vote import anchored_bias
from pipeline.errors import PipelineError


def staircase():
    """One image of four 10-pixel masks (rows) in which class 1 covers 4, 3, 2 and 1 pixels: a minority everywhere."""
    predictions = torch.zeros(1, 4, 10, dtype=torch.long)
    for row, width in enumerate((4, 3, 2, 1)):
        predictions[0, row, :width] = 1
    masks = torch.arange(1, 5, dtype=torch.uint8).view(1, 4, 1).expand(1, 4, 10).clone()
    return predictions, masks


def class_counts(pseudo: torch.Tensor, classes: int) -> list[int]:
    return torch.bincount(pseudo[pseudo != 255].long(), minlength=classes).tolist()


def test_the_majority_vote_starves_a_class_that_is_a_minority_in_every_mask():
    predictions, masks = staircase()
    assert class_counts(majority_vote(predictions, masks, 2), 2) == [40, 0]


def test_transport_gives_a_starved_class_the_masks_it_covers_most_until_it_holds_its_share():
    predictions, masks = staircase()
    pseudo = majority_vote(predictions, masks, 2, rule="transport")
    assert pseudo[0, :, 0].tolist() == [1, 0, 0, 0]  # the mask where class 1 covers 40%, wholly: 10 of its 10 pixels
    assert class_counts(pseudo, 2) == class_counts(predictions, 2)


def test_restore_gives_a_starved_class_back_its_own_pixels_largest_shares_first():
    predictions, masks = staircase()
    assert torch.equal(majority_vote(predictions, masks, 2, rule="restore"), predictions.to(torch.uint8))
    # Class 1 now wins row 0 (6 of 10 pixels), so the vote gives it 10 where θ_M gives it 6 + 3 + 2 + 1 = 12: it is
    # 2 short, and its largest remaining cell (row 1, 3 pixels) makes that good; rows 2 and 3 keep the vote.
    predictions[0, 0, :6] = 1
    pseudo = majority_vote(predictions, masks, 2, rule="restore")
    assert pseudo[0].tolist() == [[1] * 10, [1] * 3 + [0] * 7, [0] * 10, [0] * 10]
    assert class_counts(pseudo, 2) == [27, 13]


@pytest.mark.parametrize("rule", ["transport", "restore"])
def test_a_vote_that_keeps_every_class_count_is_left_unchanged(rule):
    # Two classes, each the majority of one mask with the same minority share: the plain vote keeps both counts.
    predictions = torch.zeros(1, 2, 10, dtype=torch.long)
    predictions[0, 0, :2] = 1
    predictions[0, 1, 2:] = 1
    masks = torch.tensor([[[1] * 10, [2] * 10]], dtype=torch.uint8)
    assert torch.equal(majority_vote(predictions, masks, 2, rule=rule), majority_vote(predictions, masks, 2))
    # Pure masks of random classes over a batch of images, with background: nothing to balance.
    generator = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 5, (3, 4, 4), generator=generator)
    predictions = blocks.repeat_interleave(5, 1).repeat_interleave(5, 2)
    masks = (torch.arange(16).view(4, 4) + 1).repeat_interleave(5, 0).repeat_interleave(5, 1).expand(3, 20, 20)
    masks = masks.to(torch.uint8).clone()
    masks[1, :5] = 255
    assert torch.equal(majority_vote(predictions, masks, 5, rule=rule), majority_vote(predictions, masks, 5))


@pytest.mark.parametrize("rule", ["transport", "restore"])
def test_on_random_impure_masks_every_class_keeps_close_to_its_teacher_count(rule):
    generator = torch.Generator().manual_seed(11)
    predictions = torch.randint(0, 7, (4, 30, 30), generator=generator)
    predictions[predictions == 6] = 0  # class 0 is common; class 6 absent
    masks = torch.randint(1, 9, (4, 30, 30), generator=generator, dtype=torch.uint8)
    masks[:, :, :3] = 255
    teacher = class_counts(torch.where(masks == 255, 255, predictions).to(torch.uint8), 7)
    plain = class_counts(majority_vote(predictions, masks, 7), 7)
    balanced = class_counts(majority_vote(predictions, masks, 7, rule=rule), 7)
    assert min(plain[:6]) == 0  # the plain vote starves at least one class of the batch
    largest_cell = 30 * 27 // 8 * 2  # generous bound on one mask's pixels
    assert min(balanced[:6]) > 0 and balanced[6] == 0
    assert all(abs(b - t) <= largest_cell for b, t in zip(balanced, teacher))
    assert sum(balanced) == sum(teacher)


def test_transport_refuses_a_vote_balance_and_an_unknown_rule_is_refused():
    predictions, masks = staircase()
    with pytest.raises(PipelineError, match="vote balance"):
        majority_vote(predictions, masks, 2, rule="transport", balance=0.5)
    with pytest.raises(PipelineError, match="rule 'equal'"):
        majority_vote(predictions, masks, 2, rule="equal")


def starving_scenes(seed: int, batch: int = 8):
    """Planted images of 8×8 tokens: left half class 0, right half class 1, and a 2×2 patch of class 2 inside the
    left half. The proposals are the two halves, so class 2 (1/16 of the pixels) never wins a mask."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))[0][:3]
    token_class = np.zeros((batch, 8, 8), dtype=np.int64)
    token_class[:, :, 4:] = 1
    for image in range(batch):
        row, column = rng.integers(0, 7), rng.integers(0, 3)
        token_class[image, row:row + 2, column:column + 2] = 2
    features = 2.0 * basis[token_class] + 0.3 * rng.normal(size=(batch, 8, 8, 8))
    masks = np.where(np.arange(8) < 4, 1, 2)[None, None, :].repeat(8, 1).repeat(batch, 0)
    to_crop = lambda array: array.repeat(2, 1).repeat(2, 2)
    return (torch.tensor(features, dtype=torch.float32), torch.tensor(to_crop(masks), dtype=torch.uint8),
            basis, to_crop(token_class))


@pytest.mark.parametrize("rule", ["majority", "restore", "anchored"])
def test_em_keeps_the_minority_class_alive_only_when_the_vote_cannot_starve_it(rule):
    _, _, basis, _ = starving_scenes(0)
    model = PrimapsEM(basis + 0.05, EMConfig(num_classes=3, learning_rate=0.05, ema_every=1, vote=rule))
    for step in range(60):
        features, masks, _, _ = starving_scenes(step + 1)
        model.step(features, features, masks)
    features, _, _, truth = starving_scenes(999)
    predicted = model.predict(features, (16, 16)).numpy()
    recall = (predicted[truth == 2] == 2).mean()
    if rule == "majority":
        assert recall < 0.1  # the class the vote never gives a mask is learned away
    else:
        assert recall > 0.9


def test_anchored_bias_gives_every_class_the_anchors_share_and_revives_a_class_the_teacher_lost():
    generator = torch.Generator().manual_seed(2)
    anchor = torch.randn(2, 4, 6, 6, generator=generator) * 3
    teacher = anchor.clone()
    teacher[:, 3] -= 50.0  # θ_M no longer predicts class 3 anywhere
    target = torch.bincount(anchor.argmax(dim=1).flatten(), minlength=4).double() / anchor[:, 0].numel()
    assert target[3] > 0 and (teacher.argmax(dim=1) == 3).sum() == 0
    rebalanced = (teacher + anchored_bias(teacher, anchor).view(1, -1, 1, 1)).argmax(dim=1)
    shares = torch.bincount(rebalanced.flatten(), minlength=4).double() / rebalanced.numel()
    assert (shares - target).abs().max() < 0.05 and shares[3] > 0
    # A teacher that already has the anchor's shares keeps its classes: the offsets are (nearly) equal.
    same = (anchor + anchored_bias(anchor, anchor).view(1, -1, 1, 1)).argmax(dim=1)
    assert (same == anchor.argmax(dim=1)).double().mean() > 0.95
    # A class the anchor gives no token gets a finite offset that never wins.
    absent = anchor.clone()
    absent[:, 2] = -100.0
    bias = anchored_bias(teacher, absent)
    assert torch.isfinite(bias).all() and ((teacher + bias.view(1, -1, 1, 1)).argmax(dim=1) != 2).all()
