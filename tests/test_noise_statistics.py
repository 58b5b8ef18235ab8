"""Statistical quality of each backend's noise (fixed seeds: deterministic, not flaky)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import fused_vae as fv
from helpers import is_simulated


def draw(backend, n: int, seed: int, num_samples=None, logvar=0.0) -> np.ndarray:
    name, device = backend
    mu = torch.zeros(n // 64, 64, device=device)
    lv = torch.full_like(mu, logvar)
    z = fv.reparameterize(mu, lv, seed=seed, num_samples=num_samples, backend=name)
    return z.double().cpu().numpy().reshape(-1)


def sample_size(backend) -> int:
    return 2**14 if is_simulated(backend) else 2**19


@pytest.mark.parametrize("seed", [0, 2**63 + 977])
def test_moments_and_kolmogorov_smirnov(backend, seed):
    n = sample_size(backend)
    x = draw(backend, n, seed)
    se = 1 / np.sqrt(n)
    assert abs(x.mean()) < 5 * se
    assert abs(x.var() - 1) < 5 * np.sqrt(2) * se
    assert abs(stats.skew(x)) < 5 * np.sqrt(6) * se
    assert abs(stats.kurtosis(x)) < 5 * np.sqrt(24) * se
    assert stats.kstest(x, "norm").pvalue > 1e-4
    assert np.abs(x).max() < 5.7, "Box-Muller with u >= 1e-7 bounds |eps| by sqrt(-2 ln 1e-7)"


def test_lanes_and_neighbouring_groups_are_uncorrelated(backend):
    n = sample_size(backend)
    x = draw(backend, n, seed=12345)
    lanes = x.reshape(-1, 4)
    r = np.corrcoef(lanes, rowvar=False)
    bound = 5 / np.sqrt(lanes.shape[0])
    off_diag = r[~np.eye(4, dtype=bool)]
    assert np.abs(off_diag).max() < bound, r
    next_group = np.corrcoef(lanes[:-1].reshape(-1), lanes[1:].reshape(-1))[0, 1]
    assert abs(next_group) < bound
    # squares too: Box-Muller pairs share a radius, a classic source of dependence
    sq = np.corrcoef(lanes**2, rowvar=False)[~np.eye(4, dtype=bool)]
    assert np.abs(sq).max() < 2 * bound, sq


def test_seeds_and_samples_are_independent(backend):
    n = sample_size(backend) // 4
    a, b = draw(backend, n, seed=1), draw(backend, n, seed=2)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(n)
    both = draw(backend, n, seed=1, num_samples=2).reshape(2, -1)
    np.testing.assert_allclose(both[0], a, rtol=0, atol=0)
    assert abs(np.corrcoef(both[0], both[1])[0, 1]) < 5 / np.sqrt(n)


def test_scaled_samples_have_the_requested_variance(backend):
    n = sample_size(backend)
    x = draw(backend, n, seed=3, logvar=np.log(4.0))
    assert abs(x.std() - 2.0) < 2.0 * 5 * np.sqrt(0.5 / n)
    assert stats.kstest(x / 2.0, "norm").pvalue > 1e-4
