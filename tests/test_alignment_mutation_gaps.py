"""Behaviour of the evaluation's depth alignments that no other test pinned (found by mutation testing).

Expected values follow by hand from the documented definitions (Adam's steps under a constant gradient, the
closed-form least-squares scale), independently of `g2vlm_hf.evaluation.alignment`."""

from __future__ import annotations

import numpy as np
import pytest

from g2vlm_hf.evaluation.alignment import adam_l1_scale_shift

# From s = median(gt) / median(pred) = 100 / 2 = 50 and t = 0 the residuals s * pred + t - gt are -50, +95, -50: the
# gradient of sum |residual| is -1 + 2 - 3 = -2 for s and -1 + 1 - 1 = -1 for t, and stays so while s and t move by
# far less than the residuals. Under a constant gradient Adam moves each parameter by lr * |g| / (|g| + 1e-8) per
# step (its bias-corrected moments are g and g^2), here upwards; the loss drops by lr * (2 + 1) a step.
PRED, GT = np.array([1.0, 2.0, 3.0]), np.array([100.0, 5.0, 200.0])


def test_adam_scale_and_shift_take_max_steps_of_the_learning_rate_while_the_loss_keeps_changing():
    """The loss drops by 3e-4 a step (over the tolerance): all 1000 default steps of 1e-4 run, in float64."""
    scale, shift = adam_l1_scale_shift(PRED, GT)
    assert scale == pytest.approx(50.0 + 1000 * 1e-4 * (1 - 0.5e-8), abs=1e-9)
    assert shift == pytest.approx(1000 * 1e-4 * (1 - 1e-8), abs=1e-9)
    assert adam_l1_scale_shift(PRED, GT, max_steps=7) == (pytest.approx(50.0007, abs=1e-9), pytest.approx(7e-4))


def test_adam_scale_and_shift_stop_below_the_default_tolerance_of_1e_6():
    """With lr 4e-7 the loss drops by 1.2e-6 a step, over the default tolerance (1e-6): all 1000 steps run; with a
    tolerance of 1.3e-6 Adam stops after its second step."""
    scale, shift = adam_l1_scale_shift(PRED, GT, lr=4e-7)
    assert scale == pytest.approx(50.0 + 1000 * 4e-7, abs=1e-9) and shift == pytest.approx(1000 * 4e-7, abs=1e-9)
    scale, shift = adam_l1_scale_shift(PRED, GT, lr=4e-7, tolerance=1.3e-6)
    assert scale == pytest.approx(50.0 + 2 * 4e-7, abs=1e-11) and shift == pytest.approx(2 * 4e-7, abs=1e-11)
