"""F-LMM's loss on hand-computed cases: mmdet's sigmoid BCE and naive dice (eps 1) with their
avg_factor reductions, the per-image weighting of ``compute_loss``, padding, and the nearest
resize of the ground truth onto the coarse window."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelllm.models.flmm import objective

EPS = float(np.finfo(np.float32).eps)


def test_bce_and_dice_of_one_mask():
    logits = jnp.zeros((1, 1, 1, 2))          # p = 0.5 everywhere
    targets = jnp.asarray([[[[1.0, 0.0]]]])
    pixel_valid = jnp.ones((1, 1, 2), bool)
    mask_valid = jnp.ones((1, 1), bool)
    bce = objective.mask_bce(logits, targets, pixel_valid, mask_valid)
    dice = objective.mask_dice(logits, targets, pixel_valid, mask_valid)
    # BCE: ln 2 per pixel, summed over 2 pixels / (2 + eps); one mask.
    np.testing.assert_allclose(bce.mean(), 2 * math.log(2) / (2 + EPS), rtol=1e-6)
    assert float(bce.normalizer) == 1.0
    # Dice: 1 - (2 * 0.5 + 1) / (1 + 1 + 1) = 1/3, / (1 + eps).
    np.testing.assert_allclose(dice.mean(), (1 / 3) / (1 + EPS), rtol=1e-6)


def test_images_weigh_by_their_masks_and_padding_adds_nothing():
    # Image 0: two 1x2 masks (logit 0, targets [1, 0] and [1, 1]); image 1: one 1x1 mask of
    # logit ln 3 (p = 3/4) on target 1 and a padding slot holding NaN; the grid is 1x3 with
    # image 0 on 2 columns and image 1 on 1.
    logits = np.zeros((2, 2, 1, 3), np.float32)
    logits[0, :, :, 2] = 50.0                 # outside image 0: ignored
    logits[1, 0, 0, 0] = math.log(3.0)
    logits[1, 0, 0, 1:] = -50.0               # outside image 1
    logits[1, 1] = np.nan                     # padding slot
    targets = np.zeros((2, 2, 1, 3), np.float32)
    targets[0, 0, 0, 0] = 1.0
    targets[0, 1, 0, :2] = 1.0
    targets[1, 0, 0, 0] = 1.0
    pixel_valid = jnp.asarray([[[True, True, False]], [[True, False, False]]])
    mask_valid = jnp.asarray([[True, True], [True, False]])
    bce = objective.mask_bce(jnp.asarray(logits), jnp.asarray(targets), pixel_valid, mask_valid)
    dice = objective.mask_dice(jnp.asarray(logits), jnp.asarray(targets), pixel_valid, mask_valid)

    ln2, ln43 = math.log(2.0), math.log(4 / 3)
    image0_bce = 4 * ln2 / (4 + EPS)           # 4 pixels of ln 2
    image1_bce = ln43 / (1 + EPS)              # -ln(3/4)
    np.testing.assert_allclose(bce.mean(), (2 * image0_bce + 1 * image1_bce) / 3, rtol=1e-6)
    dice0 = [1 - (2 * 0.5 + 1) / (1 + 1 + 1), 1 - (2 * 1.0 + 1) / (1 + 2 + 1)]
    dice1 = 1 - (2 * 0.75 + 1) / (0.75 + 1 + 1)
    expected = (2 * sum(dice0) / (2 + EPS) + dice1 / (1 + EPS)) / 3
    np.testing.assert_allclose(dice.mean(), expected, rtol=1e-6)
    assert float(bce.normalizer) == float(dice.normalizer) == 3.0


def test_no_mask_gives_zero():
    logits = jnp.zeros((1, 2, 2, 2))
    invalid = jnp.zeros((1, 2), bool)
    for loss in (objective.mask_bce, objective.mask_dice):
        value = loss(logits, jnp.ones((1, 2, 2, 2)), jnp.ones((1, 2, 2), bool), invalid)
        assert float(value.mean()) == 0.0 and float(value.normalizer) == 0.0


@pytest.mark.parametrize("original, window", [((4, 6), (1, 2, 2, 3)), ((7, 5), (0, 1, 3, 4)),
                                              ((3, 3), (2, 0, 5, 7))])
def test_coarse_targets_match_torch_nearest(original, window):
    rng = np.random.default_rng(0)
    mask_hw, coarse_hw = (7, 6), (8, 8)
    targets = np.zeros((1, 2, *mask_hw), np.float32)
    targets[0, :, :original[0], :original[1]] = rng.uniform(size=(2, *original)) < 0.5
    got = np.asarray(objective.coarse_targets(jnp.asarray(targets), jnp.asarray([original]),
                                              jnp.asarray([window]), coarse_hw))
    top, left, h, w = window
    crop = torch.from_numpy(targets[:, :, :original[0], :original[1]])
    expected = np.zeros((1, 2, *coarse_hw), np.float32)
    expected[:, :, top:top + h, left:left + w] = F.interpolate(crop, size=(h, w)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_coarse_targets_hand_case():
    # 4 x 6 -> 2 x 3 nearest reads rows 0, 2 and columns 0, 2, 4.
    targets = np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6)
    got = objective.coarse_targets(jnp.asarray(targets), jnp.asarray([[4, 6]]),
                                   jnp.asarray([[1, 1, 2, 3]]), (3, 5))
    expected = np.zeros((1, 1, 3, 5), np.float32)
    expected[0, 0, 1:3, 1:4] = [[0, 2, 4], [12, 14, 16]]
    np.testing.assert_array_equal(got, expected)


def test_flmm_losses_terms_and_total():
    coarse = jnp.zeros((1, 1, 2, 2))
    masks = jnp.zeros((1, 1, 2, 2))
    targets = jnp.asarray([[[[1.0, 0.0], [0.0, 0.0]]]])
    terms = objective.flmm_losses(coarse=coarse, coarse_window=jnp.asarray([[0, 0, 2, 2]]),
                                  masks=masks, target_masks=targets,
                                  original_hw=jnp.asarray([[2, 2]]),
                                  mask_valid=jnp.ones((1, 1), bool))
    assert set(terms) == {"mask", "dice", "sam_mask", "sam_dice"}
    ln2 = math.log(2.0)
    np.testing.assert_allclose(terms["mask"].mean(), 4 * ln2 / (4 + EPS), rtol=1e-6)
    dice = 1 - (2 * 0.5 + 1) / (2 + 1 + 1)
    np.testing.assert_allclose(terms["sam_dice"].mean(), dice / (1 + EPS), rtol=1e-6)
    np.testing.assert_allclose(objective.total_loss(terms),
                               2 * 4 * ln2 / (4 + EPS) + 2 * dice / (1 + EPS), rtol=1e-6)
