"""The diffusers drop-in against the real diffusers package (small models, no downloads).

diffusers' own DiagonalGaussianDistribution is the reference: its randn_tensor is swapped
for fused_vae's noise stream with the seed the fused posterior used, so samples, KLs and
gradients are compared value for value.
"""

from __future__ import annotations

import copy
import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_vae as fv
import fused_vae.integrations.diffusers as fvd

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune_autoencoderkl.py"
BENCHMARK = ROOT / "benchmarks" / "bench_diffusers.py"

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
# Latents of AutoencoderKL ([B, 2C, H, W]) and of the video VAEs ([B, 2C, T, H, W]).
EPS_TOL = 2e-6
SHAPES = [(2, 8, 5, 6), (2, 8, 3, 4, 5)]


@pytest.fixture
def vae_module():
    """diffusers.models.autoencoders.vae, left unpatched after each test."""
    pytest.importorskip("diffusers")
    from diffusers.models.autoencoders import vae

    yield vae
    fvd.unpatch()


@pytest.fixture
def fused_noise(vae_module, monkeypatch):
    """Makes diffusers' original sample() draw fused_vae's eps for the generator's seed."""

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        seed = fvd.seed_from_generator(generator)
        return fv.standard_normal(tuple(shape), seed, device=device, dtype=dtype)

    monkeypatch.setattr(vae_module, "randn_tensor", randn_tensor)


def make_parameters(shape, dtype, seed=0):
    """Fresh [B, 2C, ...] parameters; some logvar entries outside diffusers' (-30, 20)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    logvar = p[:, shape[1] // 2 :]  # a view: writes land in p
    flat = torch.arange(logvar.numel()).reshape(logvar.shape)
    logvar[flat % 7 == 0] = -45.0
    logvar[flat % 11 == 3] = 26.0
    return p.to(dtype).requires_grad_(True)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def assert_close_to_noise(got, want, std, dtype):
    """z and its logvar gradient carry eps, which every backend computes in float32 to a
    few ulps: allow EPS_TOL relative to the eps term (std * |eps| <= 6 * std)."""
    tol = TOL[dtype]
    bound = tol["atol"] + tol["rtol"] * want.abs() + EPS_TOL * 6.0 * std
    excess = (got.double() - want.double()).abs() - bound
    assert excess.max() <= 0, f"{(excess > 0).sum()} elements off, worst by {excess.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=["4d", "5d"])
def test_sample_kl_values_and_gradients_match_diffusers(vae_module, fused_noise, shape, dtype):
    """Against diffusers' original run in float64 on the same (rounded) parameters."""
    original = vae_module.DiagonalGaussianDistribution
    p_fused = make_parameters(shape, dtype)
    p_ref = p_fused.detach().double().requires_grad_(True)
    fused = fvd.DiagonalGaussianDistribution(p_fused)
    ref = original(p_ref)
    z_fused, kl_fused = fused.sample(generator=generator(5)), fused.kl()
    z_ref, kl_ref = ref.sample(generator=generator(5)), ref.kl()

    native = original(p_fused.detach())  # diffusers in the parameters' own dtype
    assert z_fused.dtype == native.sample(generator=generator(0)).dtype == dtype and z_fused.shape == z_ref.shape
    assert kl_fused.dtype == native.kl().dtype == dtype and kl_fused.shape == kl_ref.shape

    std = ref.std.detach()
    assert_close_to_noise(z_fused, z_ref, std, dtype)
    torch.testing.assert_close(kl_fused.double(), kl_ref, **TOL[dtype])

    w_z = torch.randn(z_ref.shape, dtype=torch.float64)
    w_kl = torch.randn(kl_ref.shape, dtype=torch.float64)
    # z and the cached KL share one fused node: keep it for the KL's gradient.
    (gz_fused,) = torch.autograd.grad((z_fused.double() * w_z).sum(), [p_fused], retain_graph=True)
    (gz_ref,) = torch.autograd.grad((z_ref * w_z).sum(), [p_ref], retain_graph=True)
    (gkl_fused,) = torch.autograd.grad((kl_fused.double() * w_kl).sum(), [p_fused])
    (gkl_ref,) = torch.autograd.grad((kl_ref * w_kl).sum(), [p_ref])
    assert_close_to_noise(gz_fused, gz_ref, torch.cat([torch.zeros_like(std), std * w_z.abs()], dim=1), dtype)
    torch.testing.assert_close(gkl_fused.double(), gkl_ref, **TOL[dtype])


def test_kl_has_diffusers_dims_for_video_latents(vae_module):
    p = make_parameters((2, 6, 3, 4, 5), torch.float64)
    kl = fvd.DiagonalGaussianDistribution(p).kl()
    assert kl.shape == (2, 5)  # diffusers sums dims [1, 2, 3] only
    torch.testing.assert_close(kl, vae_module.DiagonalGaussianDistribution(p).kl(), **TOL[torch.float64])


def test_clamp_gives_zero_logvar_gradient_outside(vae_module):
    p = make_parameters((2, 8, 4, 4), torch.float64)
    posterior = fvd.DiagonalGaussianDistribution(p)
    z = posterior.sample(generator=generator(1))
    (g,) = torch.autograd.grad(z.sum() + posterior.kl().sum(), [p])
    raw_logvar = p.detach()[:, 4:]
    g_logvar = g[:, 4:]
    outside = (raw_logvar < -30.0) | (raw_logvar > 20.0)
    assert outside.any() and (~outside).any()
    assert torch.all(g_logvar[outside] == 0)
    assert torch.all(g_logvar[~outside] != 0)
    torch.testing.assert_close(posterior.logvar, raw_logvar.clamp(-30.0, 20.0), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=["4d", "5d"])
def test_kl_to_other_nll_mode_and_attributes_match_diffusers(vae_module, shape):
    original = vae_module.DiagonalGaussianDistribution
    p, q = make_parameters(shape, torch.float64, 0), make_parameters(shape, torch.float64, 1)
    fused, fused_other = fvd.DiagonalGaussianDistribution(p), fvd.DiagonalGaussianDistribution(q)
    ref, ref_other = original(p), original(q)
    x = torch.randn(fused.mean.shape, dtype=torch.float64)
    pairs = [
        (fused.kl(fused_other), ref.kl(ref_other)),
        (fused.kl(ref_other), ref.kl(ref_other)),
        (fused.nll(x), ref.nll(x)),
        (fused.nll(x, dims=list(range(1, len(shape)))), ref.nll(x, dims=list(range(1, len(shape))))),
        (fused.nll(x, dims=[1, 2]), ref.nll(x, dims=[1, 2])),
        (fused.mode(), ref.mode()),
        (fused.mean, ref.mean),
        (fused.logvar, ref.logvar),
        (fused.std, ref.std),
        (fused.var, ref.var),
    ]
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert fused.parameters is p and fused.deterministic is False
    assert fused.mode() is fused.mean
    # the fused kl(other) and nll() have diffusers' gradients, the clamps' zeros included
    p2, q2 = (t.detach().clone().requires_grad_() for t in (p, q))
    p3, q3 = (t.detach().clone().requires_grad_() for t in (p, q))
    a, b = fvd.DiagonalGaussianDistribution(p2), fvd.DiagonalGaussianDistribution(q2)
    c, d = original(p3), original(q3)
    every = list(range(1, len(shape)))
    torch.autograd.backward([a.kl(b).sum(), a.nll(x, dims=every).sum()])
    torch.autograd.backward([c.kl(d).sum(), c.nll(x, dims=every).sum()])
    torch.testing.assert_close(p2.grad, p3.grad, **TOL[torch.float64])
    torch.testing.assert_close(q2.grad, q3.grad, **TOL[torch.float64])


def test_std_and_var_are_not_stored():
    posterior = fvd.DiagonalGaussianDistribution(make_parameters((2, 4, 3, 3), torch.float32))
    stored = [v for v in vars(posterior).values() if isinstance(v, torch.Tensor)]
    assert len(stored) == 3  # parameters and its two chunks (views, no new memory)
    assert all(t.untyped_storage().data_ptr() == posterior.parameters.untyped_storage().data_ptr() for t in stored)


def test_deterministic_matches_diffusers(vae_module):
    p = make_parameters((2, 8, 4, 4), torch.float32)
    fused = fvd.DiagonalGaussianDistribution(p, deterministic=True)
    ref = vae_module.DiagonalGaussianDistribution(p, deterministic=True)
    z = fused.sample(generator=generator(0))
    torch.testing.assert_close(z, ref.sample(generator=generator(0)), rtol=0, atol=0)
    torch.testing.assert_close(z, p[:, :4], rtol=0, atol=0)
    for got, want in [(fused.kl(), ref.kl()), (fused.nll(z), ref.nll(z)), (fused.std, ref.std), (fused.var, ref.var)]:
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_generator_gives_reproducible_samples():
    p = make_parameters((3, 8, 4, 4), torch.float32)
    posterior = fvd.DiagonalGaussianDistribution(p)
    g = generator(11)
    expected_seed = fvd.seed_from_generator(generator(11))
    z1 = posterior.sample(generator=g)
    z2 = posterior.sample(generator=g)  # the generator moved on: fresh noise
    assert not torch.equal(z1, z2)
    torch.testing.assert_close(posterior.sample(generator=generator(11)), z1, rtol=0, atol=0)
    eps = fv.standard_normal(posterior.mean.shape, expected_seed)
    torch.testing.assert_close(z1, posterior.mean + posterior.std * eps, **TOL[torch.float32])

    torch.manual_seed(3)
    z3 = posterior.sample()
    torch.manual_seed(3)
    torch.testing.assert_close(posterior.sample(), z3, rtol=0, atol=0)


def test_list_of_generators_seeds_each_row():
    p = make_parameters((3, 8, 4, 4), torch.float64)
    posterior = fvd.DiagonalGaussianDistribution(p)
    z = posterior.sample(generator=[generator(s) for s in (1, 2, 3)])
    for row, s in enumerate((1, 2, 3)):
        alone = fvd.DiagonalGaussianDistribution(p[row : row + 1]).sample(generator=generator(s))
        torch.testing.assert_close(z[row : row + 1], alone, rtol=0, atol=0)
    torch.testing.assert_close(posterior.kl(), fvd.DiagonalGaussianDistribution(p).kl(), **TOL[torch.float64])
    torch.testing.assert_close(
        posterior.sample(generator=[generator(4)]), posterior.sample(generator=generator(4)), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="generator"):
        posterior.sample(generator=[generator(1), generator(2)])


class Spy:
    """Counts calls of fused_vae's public ops (the posterior calls them through fv.*)."""

    def __init__(self, monkeypatch):
        self.calls = {"reparameterize_kl": 0, "gaussian_kl": 0, "reparameterize": 0, "gaussian_log_prob": 0}
        for name in self.calls:
            monkeypatch.setattr(fv, name, self._counting(name, getattr(fv, name)))

    def _counting(self, name, op):
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            return op(*args, **kwargs)

        return wrapper

    def take(self):
        calls, self.calls = self.calls, dict.fromkeys(self.calls, 0)
        return {k: v for k, v in calls.items() if v}


@pytest.mark.parametrize("shape", SHAPES, ids=["4d", "5d"])
def test_sample_then_kl_is_one_fused_pass(monkeypatch, shape):
    spy = Spy(monkeypatch)
    p = make_parameters(shape, torch.float64)
    posterior = fvd.DiagonalGaussianDistribution(p)
    fresh = fvd.DiagonalGaussianDistribution(p.detach()).kl()
    spy.take()

    posterior.sample(generator=generator(0))
    kl = posterior.kl()
    assert spy.take() == {"reparameterize_kl": 1}
    torch.testing.assert_close(kl, fresh, **TOL[torch.float64])
    assert kl.grad_fn is not None

    # A second kl() is not handed the same tensor again: one fresh pass.
    torch.testing.assert_close(posterior.kl(), fresh, **TOL[torch.float64])
    assert spy.take() == {"gaussian_kl": 1}
    # kl() without sample(): one pass; kl(other) of a fused posterior: one pass with the prior;
    # of another object: diffusers' formula, no fused op; nll() over every dim: one pass.
    fvd.DiagonalGaussianDistribution(p).kl()
    assert spy.take() == {"gaussian_kl": 1}
    posterior.kl(fvd.DiagonalGaussianDistribution(p.detach()))
    assert spy.take() == {"gaussian_kl": 1}
    other = fvd.DiagonalGaussianDistribution(p.detach())
    other.logvar = other.logvar * 2  # an assigned logvar is used unclamped: another clamp than ours
    posterior.kl(other)
    assert spy.take() == {}
    posterior.nll(posterior.mean.detach(), dims=list(range(1, len(shape))))
    assert spy.take() == {"gaussian_log_prob": 1}


def test_cached_kl_is_not_reused_when_stale(monkeypatch):
    spy = Spy(monkeypatch)
    p = make_parameters((2, 8, 4, 4), torch.float64)
    posterior = fvd.DiagonalGaussianDistribution(p)
    with torch.no_grad():
        posterior.sample()
    kl = posterior.kl()  # grad mode changed: the cached KL has no graph
    assert kl.grad_fn is not None and spy.take() == {"reparameterize_kl": 1, "gaussian_kl": 1}

    params = p.detach().clone()
    posterior = fvd.DiagonalGaussianDistribution(params)
    posterior.sample()
    params[:, :4] += 1.0  # in place: the cached KL is stale
    torch.testing.assert_close(posterior.kl(), fvd.DiagonalGaussianDistribution(params).kl(), **TOL[torch.float64])

    posterior.sample()
    posterior.mean = posterior.mean * 2.0  # replaced
    torch.testing.assert_close(posterior.kl(), 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum([1, 2, 3]))


def test_patch_unpatch_round_trip_restores_diffusers(vae_module):
    original = vae_module.DiagonalGaussianDistribution
    before = dict(vars(original))
    assert not fvd.is_patched()

    fvd.patch()
    fvd.patch()  # idempotent
    assert fvd.is_patched()
    posterior = original(make_parameters((2, 8, 4, 4), torch.float32))
    assert isinstance(posterior, original) and isinstance(posterior, fvd.DiagonalGaussianDistribution)
    fvd.unpatch()
    fvd.unpatch()  # idempotent

    assert not fvd.is_patched()
    after = vars(original)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    plain = original(make_parameters((2, 8, 4, 4), torch.float32))
    assert type(plain) is original and "std" in vars(plain)
    # A posterior built while patched keeps working after unpatch().
    assert posterior.sample().shape == posterior.mean.shape
    assert posterior.kl().shape == (2,)


def test_context_manager_restores_previous_state(vae_module):
    original = vae_module.DiagonalGaussianDistribution
    p = make_parameters((2, 8, 4, 4), torch.float32)
    with fvd.patched():
        assert type(original(p)) is not original
    assert type(original(p)) is original
    fvd.patch()
    with fvd.patched():
        pass
    assert fvd.is_patched()  # was patched before the block: stays patched
    with pytest.raises(RuntimeError), fvd.patched():
        raise RuntimeError("boom")
    assert fvd.is_patched()


def test_user_subclasses_keep_their_own_code(vae_module):
    class Custom(vae_module.DiagonalGaussianDistribution):
        def mode(self):
            return self.mean * 0

    with fvd.patched():
        posterior = Custom(make_parameters((2, 8, 4, 4), torch.float32))
    assert type(posterior) is Custom and "std" in vars(posterior)


def test_patched_posterior_pickles_and_copies(vae_module):
    with fvd.patched():
        posterior = vae_module.DiagonalGaussianDistribution(make_parameters((2, 8, 4, 4), torch.float32).detach())
        for clone in (pickle.loads(pickle.dumps(posterior)), copy.deepcopy(posterior)):
            assert type(clone) is type(posterior)
            torch.testing.assert_close(clone.kl(), posterior.kl())


def load_script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example():
    return load_script(EXAMPLE)


def tiny_autoencoder_kl():
    torch.manual_seed(0)
    return load_example().small_autoencoder_kl(16, block_out_channels=(8, 16)).double()


def test_autoencoderkl_posterior_is_fused_with_equal_results(vae_module, fused_noise):
    vae = tiny_autoencoder_kl()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def run():
        vae.zero_grad()
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator(9))
        loss = (vae.decode(z).sample - x).pow(2).mean() + 1e-3 * posterior.kl().mean()
        loss.backward()
        return type(posterior), loss.detach(), [q.grad.clone() for q in vae.parameters()]

    kind_ref, loss_ref, grads_ref = run()
    with fvd.patched():
        kind, loss, grads_fused = run()
    assert kind_ref is vae_module.DiagonalGaussianDistribution
    assert issubclass(kind, fvd.DiagonalGaussianDistribution)
    # eps agrees to float32 ulps (see assert_close_to_noise); the decoder carries that on.
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    scale = max(g.abs().max().item() for g in grads_ref)
    for got, want in zip(grads_fused, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7 * scale)


def test_video_vae_posterior_is_fused_with_equal_kl(vae_module):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    video = torch.randn(2, 3, 5, 16, 32)
    with torch.no_grad():
        ref = vae.encode(video).latent_dist
        with fvd.patched():
            fused = vae.encode(video).latent_dist
    assert type(ref) is vae_module.DiagonalGaussianDistribution
    assert isinstance(fused, fvd.DiagonalGaussianDistribution) and fused.mean.dim() == 5
    # The patch relies on every diffusers module binding the one class object.
    bound = [getattr(m, "DiagonalGaussianDistribution", None) for n, m in list(sys.modules.items()) if n.startswith("diffusers.")]
    bound = [c for c in bound if c is not None]
    assert len(bound) >= 3 and all(c is vae_module.DiagonalGaussianDistribution for c in bound)
    assert fused.sample(generator=generator(0)).shape == ref.mean.shape
    torch.testing.assert_close(fused.kl(), ref.kl(), **TOL[torch.float32])
    torch.testing.assert_close(fused.mode(), ref.mode(), rtol=0, atol=0)


def test_finetune_example_lowers_the_loss(vae_module):
    losses = load_example().finetune(steps=12, batch_size=4, image_size=16, seed=0)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert not fvd.is_patched()  # the example leaves diffusers as it found it


def test_fused_posterior_keeps_nothing_alive_beyond_its_inputs(vae_module):
    """Autograd's saved tensors and the posterior's attributes, as the benchmark counts
    them: diffusers keeps logvar, std, var and eps; the fused posterior only its seed."""
    bench = load_script(BENCHMARK)
    params = make_parameters((2, 8, 4, 4), torch.float32)
    latent_bytes = params.numel() // 2 * params.element_size()
    held_diffusers = bench.held_bytes(vae_module.DiagonalGaussianDistribution, params, generator(0))
    held_fused = bench.held_bytes(fvd.DiagonalGaussianDistribution, params, generator(0))
    assert held_diffusers == 4 * latent_bytes
    assert held_fused <= 8  # the int64 seed


def test_importing_fused_vae_does_not_import_diffusers():
    code = (
        "import sys, fused_vae, fused_vae.integrations, fused_vae.integrations.diffusers; "
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_patch_without_diffusers_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now fails
    with pytest.raises(ImportError, match=r"fused_vae\[diffusers\]"):
        fvd.patch()
    with pytest.raises(ImportError, match=r"fused_vae\[diffusers\]"), fvd.patched():
        pass
