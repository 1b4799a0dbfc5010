"""Z'-factor and the cross-fitted control separation."""

import numpy as np

from bioembed_assets.evaluate.separation import control_z_prime, z_prime


def test_z_prime_formula() -> None:
    pos, neg = np.array([10.0, 11.0, 9.0]), np.array([0.0, 1.0, -1.0])
    assert np.isclose(z_prime(pos, neg), 1 - 3 * (1 + 1) / 10)


def test_separated_controls_score_high_and_identical_ones_low() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 30))
    is_pos = np.arange(40) < 16
    is_neg = (np.arange(40) >= 16) & (np.arange(40) < 32)
    assert control_z_prime(X, is_pos, is_neg) < 0  # same distribution: no separation
    X[is_pos, 0] += 40.0
    assert control_z_prime(X, is_pos, is_neg) > 0.5
    assert np.isnan(control_z_prime(X, np.arange(40) < 2, is_neg))
