"""The fused posterior for diffusers' VAEs, and a patch that puts it under every model.

    import fused_vae.integrations.diffusers as fvd
    fvd.patch()     # every later DiagonalGaussianDistribution samples and takes its KL fused

``DiagonalGaussianDistribution`` here has the constructor, methods and attributes of
``diffusers.models.autoencoders.vae.DiagonalGaussianDistribution``: ``parameters``
(``[B, 2C, ...]``) is chunked on dim 1 into ``mean`` and ``logvar``, logvar is clamped to
(-30, 20) (zero gradient outside), ``kl()`` sums over dims [1, 2, 3]. The differences:
``sample()`` and ``kl()`` run ``fv.reparameterize_kl`` / ``fv.gaussian_kl`` (one pass
each way, eps regenerated in the backward instead of stored), the KL computed alongside
a sample is reused by the next ``kl()``, and ``logvar``, ``std`` and ``var`` are computed
when read instead of kept alive. Samples follow fused_vae's Philox stream, so they equal
diffusers' in distribution, not bit for bit.

``patch()`` makes diffusers' class build this one: its ``__init__`` turns each new
instance into a subclass of diffusers' class carrying this module's methods. All
diffusers modules that imported the name share that one class object, so every model
(AutoencoderKL, the video and audio VAEs) is reached, modules imported after the patch
included. ``unpatch()`` leaves diffusers' class exactly as it was. This module imports
diffusers only inside ``patch()``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

import fused_vae as fv
from fused_vae._validation import draw_seed

__all__ = ["DiagonalGaussianDistribution", "is_patched", "patch", "patched", "seed_from_generator", "unpatch"]

LOGVAR_CLAMP = (-30.0, 20.0)
KL_DIMS = [1, 2, 3]
_LOG_TWO_PI = math.log(2.0 * math.pi)
_INSTALL_HINT = "pip install 'fused_vae[diffusers]'"


def seed_from_generator(generator: torch.Generator | None) -> torch.Tensor | None:
    """One int64 seed drawn from ``generator`` on its device (0-d tensor), or None.

    None lets the fused op draw its seed from torch's default generator, so
    ``torch.manual_seed`` makes unseeded samples reproducible too.
    """
    if generator is None:
        return None
    return draw_seed(generator.device, generator)


def _row_seeds(generator: Sequence[torch.Generator], batch: int) -> list[torch.Tensor]:
    if len(generator) != batch:
        raise ValueError(f"generator is a list of {len(generator)} generators; it must hold one per batch row ({batch})")
    return [seed_from_generator(g) for g in generator]


def _is_kl_rank(t: torch.Tensor) -> bool:
    return t.dim() > max(KL_DIMS)


def _sum_kl_dims(kl_elements: torch.Tensor) -> torch.Tensor:
    return torch.sum(kl_elements, dim=KL_DIMS)


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior ``N(mean, exp(logvar))`` computed with fused ops.

    Args:
        parameters: ``[B, 2C, ...]`` float tensor (4-D image or 5-D video latents);
            chunked on dim 1 into ``mean`` and (unclamped) logvar, both views.
        deterministic: if True, ``std`` and ``var`` are zeros, ``sample()`` returns a copy
            of ``mean`` and ``kl()`` / ``nll()`` return ``torch.Tensor([0.0])``.

    Attributes ``parameters``, ``mean``, ``deterministic`` are stored; ``logvar``
    (clamped to (-30, 20)), ``std`` and ``var`` are computed when read.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self._raw_logvar = torch.chunk(parameters, 2, dim=1)
        self._logvar_clamp: tuple[float, float] | None = LOGVAR_CLAMP
        self.deterministic = deterministic
        self._kl_cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def logvar(self) -> torch.Tensor:
        """log-variance, mean's shape and dtype, clamped to (-30, 20)."""
        if self._logvar_clamp is None:
            return self._raw_logvar
        return torch.clamp(self._raw_logvar, *self._logvar_clamp)

    @logvar.setter
    def logvar(self, value: torch.Tensor) -> None:
        # An assigned logvar is used as given, as diffusers' plain attribute would be.
        self._raw_logvar = value
        self._logvar_clamp = None

    @property
    def std(self) -> torch.Tensor:
        """``exp(0.5 * logvar)`` (zeros when deterministic), mean's shape and dtype."""
        if self.deterministic:
            return self._zeros()
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """``exp(logvar)`` (zeros when deterministic), mean's shape and dtype."""
        if self.deterministic:
            return self._zeros()
        return torch.exp(self.logvar)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.mean, device=self.parameters.device, dtype=self.parameters.dtype)

    def _cache_key(self) -> tuple | None:
        # The cached KL is reusable only for the same tensors, unmodified in place, and
        # under the same autograd mode (a KL made under no_grad has no graph). Inference
        # tensors have no version counter: no caching for them.
        mean, raw_logvar = self.mean, self._raw_logvar
        if mean.is_inference() or raw_logvar.is_inference():
            return None
        return (
            mean,
            raw_logvar,
            mean._version,
            raw_logvar._version,
            self._logvar_clamp,
            torch.is_grad_enabled(),
        )

    def _cache_matches(self, key: tuple) -> bool:
        now = self._cache_key()
        return now is not None and all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(key, now))

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """A sample ``mean + std * eps``, mean's shape, dtype and device.

        Args:
            generator: a ``torch.Generator`` (the fused op's seed is one int64 drawn from
                it, so equal generator states give equal samples), a list with one
                generator per batch row, or None (torch's default generator).

        Raises:
            ValueError: a list of generators whose length is not the batch size.
        """
        if self.deterministic:
            return self.mean.clone()
        if isinstance(generator, (list, tuple)) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, (list, tuple)):
            seeds = _row_seeds(generator, self.mean.shape[0])
            rows = [self._fused_sample(self.mean[i : i + 1], self._raw_logvar[i : i + 1], s) for i, s in enumerate(seeds)]
            z = torch.cat([r[0] for r in rows])
            kl = torch.cat([r[1] for r in rows]) if rows and rows[0][1] is not None else None
        else:
            z, kl = self._fused_sample(self.mean, self._raw_logvar, seed_from_generator(generator))
        key = self._cache_key()
        self._kl_cache = (key, kl) if kl is not None and key is not None else None
        return z

    def _fused_sample(self, mean, raw_logvar, seed) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not _is_kl_rank(mean):
            # kl() over dims [1, 2, 3] is undefined here: sample only.
            z = fv.reparameterize(mean, raw_logvar, seed=seed, logvar_clamp=self._logvar_clamp)
            return z, None
        if mean.dim() == 4:
            z, kl = fv.reparameterize_kl(
                mean, raw_logvar, reduction="per_sample", seed=seed, logvar_clamp=self._logvar_clamp
            )
            return z, kl.to(mean.dtype)
        z, kl_elements = fv.reparameterize_kl(
            mean, raw_logvar, reduction="none", seed=seed, logvar_clamp=self._logvar_clamp
        )
        return z, _sum_kl_dims(kl_elements)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || N(0, I)), or KL(self || other), summed over dims [1, 2, 3].

        Returns ``[B]`` for 4-D latents (``[B, W]`` for 5-D, as diffusers), mean's dtype;
        ``torch.Tensor([0.0])`` when deterministic. The first call after ``sample()``
        returns the KL that the sampling pass computed; other calls run one fused pass.
        That KL and the sample are outputs of one autograd node: backpropagating them in
        two separate ``backward()`` calls needs ``retain_graph=True`` in the first (one
        loss holding both, the usual case, needs nothing).
        ``other``: this module's posterior of the same shape, dtype and clamp runs one fused
        pass too (the KL to a learned prior, both logvars clamped); any other object with
        ``mean``, ``var``, ``logvar`` uses diffusers' formula.
        """
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is not None:
            if self._fusable_prior(other):  # KL(self || other) with both logvars clamped, one fused pass
                return self._reduced(fv.gaussian_kl, prior=(other.mean, other._raw_logvar))
            return 0.5 * torch.sum(
                torch.pow(self.mean - other.mean, 2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar,
                dim=KL_DIMS,
            )
        cached, self._kl_cache = self._kl_cache, None
        if cached is not None and self._cache_matches(cached[0]):
            return cached[1]
        return self._reduced(fv.gaussian_kl)

    def _fusable_prior(self, other) -> bool:
        """Whether ``kl(other)`` can run fused: ``other`` is this module's posterior with the same
        (-30, 20) clamp, of the same shape, dtype and device, and not deterministic."""
        return (isinstance(other, DiagonalGaussianDistribution) and not other.deterministic
                and other._logvar_clamp == self._logvar_clamp and other.mean.shape == self.mean.shape
                and other.mean.dtype == self.mean.dtype and other.mean.device == self.mean.device)

    def _reduced(self, fn, **kwargs) -> torch.Tensor:
        """``fn(mean, raw logvar, ...)`` (the fused KL) summed over dims [1, 2, 3] in mean's dtype:
        reduced by the op for 4-D latents, summed here from the elementwise values otherwise."""
        if self.mean.dim() == 4:
            out = fn(self.mean, self._raw_logvar, reduction="per_sample", logvar_clamp=self._logvar_clamp, **kwargs)
            return out.to(self.mean.dtype)
        return _sum_kl_dims(fn(self.mean, self._raw_logvar, reduction="none", logvar_clamp=self._logvar_clamp,
                               **kwargs))  # fmt: skip

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = KL_DIMS) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` summed over ``dims`` (diffusers' formula); one
        fused pass (``fv.gaussian_log_prob``) when ``dims`` are every dim after the batch and
        ``sample`` has mean's shape and dtype.

        Returns ``torch.Tensor([0.0])`` when deterministic.
        """
        if self.deterministic:
            return torch.Tensor([0.0])
        every_dim = sorted(d % self.mean.dim() for d in dims) == list(range(1, self.mean.dim()))
        if every_dim and isinstance(sample, torch.Tensor) and sample.shape == self.mean.shape \
                and sample.dtype == self.mean.dtype and sample.device == self.mean.device:
            lp = fv.gaussian_log_prob(sample, self.mean, self._raw_logvar, logvar_clamp=self._logvar_clamp)
            return (-lp).to(self.mean.dtype)
        logvar = self.logvar
        return 0.5 * torch.sum(
            _LOG_TWO_PI + logvar + torch.pow(sample - self.mean, 2) / torch.exp(logvar),
            dim=dims,
        )

    def mode(self) -> torch.Tensor:
        """The mode, ``mean`` itself."""
        return self.mean


# --- patching diffusers -------------------------------------------------------------

_patch_state: dict = {"original": None, "original_init": None, "fused": None, "init": None}


def _diffusers_class() -> type:
    try:
        from diffusers.models.autoencoders import vae
    except ImportError as exc:
        raise ImportError(
            "fused_vae.integrations.diffusers.patch() needs diffusers, which could not be "
            f"imported ({exc}); install it with: {_INSTALL_HINT}"
        ) from exc
    return vae.DiagonalGaussianDistribution


def _fused_class(original: type) -> type:
    # Our methods first in the MRO; isinstance(posterior, original) still holds.
    return type(
        "FusedDiagonalGaussianDistribution",
        (DiagonalGaussianDistribution, original),
        {
            "__module__": __name__,
            "__doc__": "diffusers' DiagonalGaussianDistribution with fused sample() and kl().",
        },
    )


def _make_init(original: type, fused: type, original_init):
    def __init__(self, *args, **kwargs):
        # Only diffusers' own class is redirected; user subclasses keep their code.
        if type(self) is original:
            self.__class__ = fused
            DiagonalGaussianDistribution.__init__(self, *args, **kwargs)
        else:
            original_init(self, *args, **kwargs)

    __init__.__wrapped__ = original_init
    return __init__


def is_patched() -> bool:
    """Whether diffusers' DiagonalGaussianDistribution currently builds the fused one.

    False (without importing diffusers) when diffusers was never imported.
    """
    original = _patch_state["original"]
    return original is not None and original.__dict__.get("__init__") is _patch_state["init"]


def patch() -> None:
    """Makes every diffusers model's ``DiagonalGaussianDistribution`` the fused one.

    Posteriors built afterwards (``vae.encode(x).latent_dist``) are instances of a
    subclass of diffusers' class whose ``sample``, ``kl``, ``nll``, ``mode`` and
    attributes are this module's. Calling it again is a no-op.

    Raises:
        ImportError: diffusers is not installed (names the ``fused_vae[diffusers]`` extra).
    """
    original = _diffusers_class()
    if is_patched():
        return
    if _patch_state["original"] is not original:
        _patch_state.update(original=original, fused=_fused_class(original))
        globals()["FusedDiagonalGaussianDistribution"] = _patch_state["fused"]  # so instances pickle
    original_init = original.__dict__["__init__"]
    _patch_state.update(original_init=original_init, init=_make_init(original, _patch_state["fused"], original_init))
    original.__init__ = _patch_state["init"]


def unpatch() -> None:
    """Restores diffusers' own ``DiagonalGaussianDistribution``; a no-op when not patched.

    Posteriors built while patched keep working (their class is unchanged).
    """
    if is_patched():
        _patch_state["original"].__init__ = _patch_state["original_init"]


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``with patched():`` patches diffusers inside the block and restores the previous
    state (patched or not) on exit. Raises what :func:`patch` raises."""
    was_patched = is_patched()
    patch()
    try:
        yield
    finally:
        if not was_patched:
            unpatch()
