"""Every error case of docs/design.md: the right exception type, naming the argument."""

from __future__ import annotations

import pytest
import torch

import fused_vae as fv

FUNCS = {
    "reparameterize_kl": lambda mu, lv, **kw: fv.reparameterize_kl(mu, lv, **kw),
    "reparameterize": lambda mu, lv, **kw: fv.reparameterize(mu, lv, **kw),
    "gaussian_kl": lambda mu, lv, **kw: fv.gaussian_kl(mu, lv, **kw),
    "sample_gaussian": lambda mu, lv, **kw: fv.sample_gaussian(mu, lv, kl="sum", log_density="ratio", **kw),
}


@pytest.fixture(params=list(FUNCS))
def func(request):
    return FUNCS[request.param]


def good():
    return torch.randn(3, 4), torch.randn(3, 4)


def test_non_tensor_inputs(func):
    mu, lv = good()
    with pytest.raises(TypeError, match="mu must be a torch.Tensor"):
        func([1.0, 2.0], lv)
    with pytest.raises(TypeError, match="logvar must be a torch.Tensor"):
        func(mu, 3.0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_dtypes(func, dtype):
    mu, lv = good()
    with pytest.raises(TypeError, match=r"mu must be float32, float64, float16 or bfloat16"):
        func(mu.to(dtype), lv.to(dtype))
    with pytest.raises(TypeError, match=r"logvar must be float32, float64, float16 or bfloat16"):
        func(mu, lv.to(dtype))


def test_dtype_mismatch(func):
    mu, lv = good()
    with pytest.raises(TypeError, match=r"logvar dtype torch.float64 must match mu dtype torch.float32"):
        func(mu, lv.double())


def test_shape_mismatch_and_0d(func):
    mu, lv = good()
    with pytest.raises(ValueError, match=r"logvar shape \(4, 3\) must match mu shape \(3, 4\)"):
        func(mu, lv.t())
    with pytest.raises(ValueError, match="mu must be at least 1-D"):
        func(torch.tensor(1.0), torch.tensor(1.0))


def test_different_devices(func):
    mu, lv = good()
    with pytest.raises(ValueError, match=r"logvar is on meta but mu is on cpu"):
        func(mu, lv.to("meta"))


@pytest.mark.parametrize("bad", ["mean", "elementwise", None, 1])
def test_bad_reduction(bad):
    mu, lv = good()
    with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'per_sample', 'sum', 'batchmean'"):
        fv.reparameterize_kl(mu, lv, reduction=bad)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fv.gaussian_kl(mu, lv, reduction=bad)


@pytest.mark.parametrize("fn", [fv.reparameterize_kl, fv.reparameterize])
def test_bad_num_samples(fn):
    mu, lv = good()
    for bad in (0, -2):
        with pytest.raises(ValueError, match=r"num_samples must be None or an int >= 1, got"):
            fn(mu, lv, num_samples=bad)
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError, match=r"num_samples must be None or an int >= 1"):
            fn(mu, lv, num_samples=bad)


@pytest.mark.parametrize(
    "bad,exc,msg",
    [
        ((1.0, -1.0), ValueError, r"logvar_clamp must have lo <= hi"),
        ((float("nan"), 1.0), ValueError, r"logvar_clamp lo must not be NaN"),
        ((1.0,), TypeError, r"logvar_clamp must be None or a pair"),
        ("ab", TypeError, r"logvar_clamp must be None or a pair"),
        ((0.0, "x"), TypeError, r"logvar_clamp hi must be a real number"),
    ],
)
def test_bad_logvar_clamp(func, bad, exc, msg):
    mu, lv = good()
    with pytest.raises(exc, match=msg):
        func(mu, lv, logvar_clamp=bad)


@pytest.mark.parametrize("fn", [fv.reparameterize_kl, fv.reparameterize])
def test_bad_seed(fn):
    mu, lv = good()
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        fn(mu, lv, seed=-1)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        fn(mu, lv, seed=2**64)
    with pytest.raises(TypeError, match=r"seed must be an int"):
        fn(mu, lv, seed=1.5)
    with pytest.raises(TypeError, match=r"seed tensor must hold one int64 element"):
        fn(mu, lv, seed=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"seed tensor must hold one int64 element"):
        fn(mu, lv, seed=torch.tensor(1.0))


def test_unknown_backend(func):
    mu, lv = good()
    with pytest.raises(ValueError, match=r"backend must be one of 'reference', 'cpu', 'cuda', 'triton' or None, got 'tpu'"):
        func(mu, lv, backend="tpu")


def test_unavailable_backend_names_the_reason(func):
    mu, lv = good()
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available for cpu tensors: "):
        func(mu, lv, backend="cuda")


def test_standard_normal_errors():
    with pytest.raises(ValueError, match="shape must contain non-negative sizes"):
        fv.standard_normal((2, -1), 1)
    with pytest.raises(TypeError, match="shape must be an int or a sequence of ints"):
        fv.standard_normal("3", 1)
    with pytest.raises(TypeError, match="shape must contain ints"):
        fv.standard_normal((2.5,), 1)
    with pytest.raises(TypeError, match="seed must be an int"):
        fv.standard_normal((2,), None)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*64\)"):
        fv.standard_normal((2,), 1, offset=-1)
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
        fv.standard_normal((2,), 1, dtype=torch.int32)


PRIOR_FUNCS = {
    "reparameterize_kl": lambda mu, lv, prior: fv.reparameterize_kl(mu, lv, prior=prior),
    "gaussian_kl": lambda mu, lv, prior: fv.gaussian_kl(mu, lv, prior=prior),
    "sample_gaussian": lambda mu, lv, prior: fv.sample_gaussian(mu, lv, prior=prior, log_density="ratio"),
}


@pytest.mark.parametrize("name", list(PRIOR_FUNCS))
def test_bad_prior(name):
    fn = PRIOR_FUNCS[name]
    mu, lv = good()
    with pytest.raises(TypeError, match=r"^prior must be None or a pair \(prior_mu, prior_logvar\) of tensors, got Tensor"):
        fn(mu, lv, mu)
    with pytest.raises(TypeError, match=r"^prior must be None or a pair .* got tuple"):
        fn(mu, lv, (mu,))
    with pytest.raises(TypeError, match=r"^prior_logvar must be a torch.Tensor, got float"):
        fn(mu, lv, (mu, 1.0))
    with pytest.raises(ValueError, match=r"^prior_mu shape \(4, 3\) must match mu shape \(3, 4\)"):
        fn(mu, lv, (mu.t(), lv))
    with pytest.raises(ValueError, match=r"^prior_logvar shape \(4,\) must match mu shape \(3, 4\)"):
        fn(mu, lv, (mu, lv[0]))
    with pytest.raises(TypeError, match=r"^prior_mu dtype torch.float64 must match mu dtype torch.float32"):
        fn(mu, lv, (mu.double(), lv))
    with pytest.raises(TypeError, match=r"^prior_logvar must be float32, float64, float16 or bfloat16, got torch.int64"):
        fn(mu, lv, (mu, lv.long()))
    with pytest.raises(ValueError, match=r"^prior_logvar is on meta but mu is on cpu; they must be on one device"):
        fn(mu, lv, (mu, lv.to("meta")))


def test_bad_log_density_and_path_gradient():
    mu, lv = good()
    for bad in ("p", "log_q", 1):
        with pytest.raises(ValueError, match=r"^log_density must be None, 'q' or 'ratio', got"):
            fv.sample_gaussian(mu, lv, log_density=bad)
    with pytest.raises(TypeError, match=r"^path_gradient must be a bool, got int"):
        fv.sample_gaussian(mu, lv, log_density="q", path_gradient=1)
    with pytest.raises(ValueError, match=r"^reduction must be one of"):
        fv.sample_gaussian(mu, lv, kl="mean")
    with pytest.raises(ValueError, match=r"^num_samples must be None or an int >= 1, got 0"):
        fv.sample_gaussian(mu, lv, num_samples=0)


def test_gaussian_log_prob_names_x():
    mu, lv = good()
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, got list"):
        fv.gaussian_log_prob([1.0], mu, lv)
    with pytest.raises(ValueError, match=r"^mu shape \(4, 3\) must match x shape \(3, 4\)"):
        fv.gaussian_log_prob(mu, mu.t(), lv)
    with pytest.raises(TypeError, match=r"^logvar dtype torch.float16 must match x dtype torch.float32"):
        fv.gaussian_log_prob(mu, mu, lv.half())
    with pytest.raises(ValueError, match=r"^x must be at least 1-D"):
        fv.gaussian_log_prob(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
    for bad in ("mean", None):
        with pytest.raises(ValueError, match=r"^reduction must be one of 'none', 'per_sample', 'sum', 'batchmean'"):
            fv.gaussian_log_prob(mu, mu, lv, reduction=bad)
    with pytest.raises(ValueError, match=r"^logvar_clamp must have lo <= hi"):
        fv.gaussian_log_prob(mu, mu, lv, logvar_clamp=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"^backend must be one of 'reference', 'cpu', 'cuda', 'triton' or None"):
        fv.gaussian_log_prob(mu, mu, lv, backend="tpu")
