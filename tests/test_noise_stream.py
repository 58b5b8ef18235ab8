"""The noise stream: Philox words, the normal stream and every backend's eps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_vae as fv
from fused_vae import philox
from independent import philox4x32_10, stream

# Known-answer vectors of Philox4x32-10 (Salmon et al., Random123 kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_independent_philox_matches_known_answers(ctr, key, expected):
    with np.errstate(over="ignore"):
        out = philox4x32_10(np.array([ctr], dtype=np.uint64), key)[0]
    assert tuple(int(v) for v in out) == expected


@pytest.mark.parametrize("ctr,key,expected", [k for k in KAT if k[0][2] == k[0][3] == 0])
def test_library_philox_matches_known_answers(ctr, key, expected):
    words = philox.philox4x32(key[0] | (key[1] << 32), torch.tensor([ctr[0]]), torch.tensor([ctr[1]]))
    assert tuple(int(w) for w in words) == expected


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), lo=st.integers(0, 2**32 - 1), hi=st.integers(0, 2**32 - 1))
def test_library_philox_words_equal_independent(seed, lo, hi):
    counters_lo = torch.tensor([lo, (lo + 1) % 2**32, 0, 2**32 - 1])
    counters_hi = torch.tensor([hi, hi, 2**32 - 1, 0])
    words = philox.philox4x32(seed, counters_lo, counters_hi)
    ctr = np.zeros((4, 4), dtype=np.uint64)
    ctr[:, 0] = counters_lo.numpy()
    ctr[:, 1] = counters_hi.numpy()
    with np.errstate(over="ignore"):
        expected = philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))
    got = torch.stack(words, dim=1).numpy().astype(np.uint32)
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    offset=st.one_of(st.integers(0, 1000), st.integers(2**32 - 10, 2**32 + 10), st.integers(0, 2**64 - 2**20)),
    numel=st.integers(0, 77),
)
def test_standard_normal_equals_independent_stream(seed, offset, numel):
    got = fv.standard_normal((numel,), seed, offset=offset)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    np.testing.assert_allclose(got.numpy(), stream(seed, numel, offset), rtol=2e-6, atol=2e-6)


def test_standard_normal_shape_dtype_device_and_offset_consistency():
    full = fv.standard_normal((3, 8), 99)
    assert full.shape == (3, 8)
    shifted = fv.standard_normal(16, 99, offset=2)  # groups 2.. = elements 8..
    torch.testing.assert_close(shifted, full.reshape(-1)[8:])
    as64 = fv.standard_normal((3, 8), 99, dtype=torch.float64)
    assert as64.dtype == torch.float64
    torch.testing.assert_close(as64, full.double())
    seed_t = torch.tensor(99)
    torch.testing.assert_close(fv.standard_normal((3, 8), seed_t), full)
    assert fv.standard_normal((0, 5), 1).shape == (0, 5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), shape=st.sampled_from([(1,), (3,), (5, 3), (2, 7, 3), (64, 33)]))
def test_backend_eps_is_the_stream(backend, seed, shape):
    """With mu = 0 and logvar = 0, z = eps exactly: every backend draws the same stream."""
    name, device = backend
    mu = torch.zeros(shape, device=device)
    z = fv.reparameterize(mu, torch.zeros_like(mu), seed=seed, backend=name)
    expected = torch.from_numpy(stream(seed, mu.numel())).reshape(shape)
    torch.testing.assert_close(z.cpu(), expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape,num_samples", [((3,), 5), ((5, 3), 3), ((2, 2), 4), ((7, 5), 2)])
def test_backend_multi_sample_stream_straddles_groups(backend, shape, num_samples):
    """[S, *shape] is one flat stream; groups of 4 cross sample boundaries when numel % 4."""
    name, device = backend
    mu = torch.zeros(shape, device=device)
    z = fv.reparameterize(mu, torch.zeros_like(mu), seed=7, num_samples=num_samples, backend=name)
    assert z.shape == (num_samples, *shape)
    expected = torch.from_numpy(stream(7, num_samples * mu.numel())).reshape(num_samples, *shape)
    torch.testing.assert_close(z.cpu(), expected, rtol=2e-6, atol=2e-6)


def test_backend_seed_above_2_63(backend):
    name, device = backend
    mu = torch.zeros(9, device=device)
    seed = 2**64 - 5
    z = fv.reparameterize(mu, torch.zeros_like(mu), seed=seed, backend=name)
    torch.testing.assert_close(z.cpu(), torch.from_numpy(stream(seed, 9)), rtol=2e-6, atol=2e-6)
    z_t = fv.reparameterize(mu, torch.zeros_like(mu), seed=torch.tensor(seed - 2**64), backend=name)
    torch.testing.assert_close(z_t, z)


def test_seed_none_follows_torch_manual_seed(backend):
    name, device = backend
    mu, lv = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    torch.manual_seed(123)
    z1, kl1 = fv.reparameterize_kl(mu, lv, backend=name)
    z2, _ = fv.reparameterize_kl(mu, lv, backend=name)
    torch.manual_seed(123)
    z3, kl3 = fv.reparameterize_kl(mu, lv, backend=name)
    torch.testing.assert_close(z1, z3, rtol=0, atol=0)
    torch.testing.assert_close(kl1, kl3, rtol=0, atol=0)
    assert not torch.equal(z1, z2), "two draws without a seed must differ"


def test_explicit_seed_is_deterministic_and_seeds_differ(backend):
    name, device = backend
    mu, lv = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    a = fv.reparameterize(mu, lv, seed=5, backend=name)
    b = fv.reparameterize(mu, lv, seed=5, backend=name)
    c = fv.reparameterize(mu, lv, seed=6, backend=name)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
