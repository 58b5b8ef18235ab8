"""VAEs with several stochastic layers, every Gaussian term from the fused ops.

- :class:`IWAETwoLayerVAE` (``"mlp2"``): the IWAE paper's two-stochastic-layer MNIST net
  (Burda et al. 2015), bottom-up inference: q(h1|x) q(h2|h1), p(h2) = N(0, I), p(h1|h2)
  Gaussian, p(x|h1).
- :class:`TopDownVAE` (``"topdown"``, fully connected; ``"topdown-conv"``, convolutional):
  a top-down hierarchy (Ladder VAE, Sonderby et al. 2016; NVAE; VDVAE): a bottom-up pass
  makes features d_1..d_L of x; a top-down pass, from a learned state at the top, predicts
  each layer's prior p(z_l | z_>l) and combines its state with d_l into the posterior
  q(z_l | x, z_>l); the analytic KL of each layer to its learned prior comes out of the
  fused sampling op.

Both draw each layer's samples with one fused call that also returns what the objective
needs (the KL, ``log q - log p`` of each sample, ``log q``), and compute Gaussian
log-densities of given values with :func:`fused_vae.gaussian_log_prob`. With K samples the
first layer drawn takes ``num_samples=K``; the layers after it are drawn per sample (their
parameters are ``[K * B, ...]``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .. import api
from .base import LOSS_STATS, VAE, ObjectiveTerms, make_activation, model_spec
from .distributions import DiagonalGaussian
from .likelihoods import build_likelihood
from .losses import weighted_loss
from .mlp import mlp


class LayerTerms(NamedTuple):
    """One pass of a hierarchical model over K samples of each example.

    ``nll``: ``-log p(x | z)``, ``[K, B]``; ``kl``: each layer's term of the ELBO, ``[L, K, B]``
    (the analytic KL to the layer's prior where it has one, else the one-sample estimate
    ``log q - log p``); ``log_ratio``: each layer's ``log q(z_l | ...) - log p(z_l | ...)`` of
    the samples, ``[L, K, B]`` (None where not asked for)."""

    nll: torch.Tensor
    kl: torch.Tensor
    log_ratio: torch.Tensor | None


def check_latent_dims(latent_dims, layers: int | None = None) -> list[int]:
    """The latent sizes of a hierarchy, bottom layer first.

    Raises:
        ValueError: fewer than 2 layers (or not ``layers``), or a size < 1.
    """
    dims = [int(d) for d in latent_dims]
    if len(dims) < 2 or (layers is not None and len(dims) != layers) or any(d < 1 for d in dims):
        want = f"{layers}" if layers is not None else "at least 2"
        raise ValueError(f"latent_dims must be {want} sizes >= 1 (bottom layer first), got {dims}")
    return dims


class HierarchicalVAE(VAE):
    """What the hierarchical models share: the ELBO and IWAE objectives from a
    :class:`LayerTerms` pass, per-layer KL statistics and the IWAE estimate.

    Subclasses set ``layer_names`` and implement :meth:`_pass`, :meth:`reconstruct` and
    :meth:`generate`. ``free_bits`` floors each layer's batch-mean KL (nats per layer).
    """

    layer_names: tuple[str, ...] = ()

    @property
    def stat_names(self) -> tuple[str, ...]:
        return LOSS_STATS + tuple(f"kl_{name}" for name in self.layer_names)

    def _pass(self, x: torch.Tensor, k: int, seed, *, log_ratio: bool) -> LayerTerms:
        raise NotImplementedError

    def _objective_terms(self, x, beta, free_bits: float, seed, objective: str, k: int, *,
                         stats_grad: bool = True) -> ObjectiveTerms:
        iwae = objective == "iwae" and k > 1
        t = self._pass(x, k, seed, log_ratio=iwae)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (stats_grad or not iwae)):
            layer_kl = t.kl.flatten(1).mean(1)  # [L] batch means
            kl = layer_kl.sum()
            recon = t.nll.mean()
        if not iwae:
            kl_pen = layer_kl.clamp(min=free_bits).sum() if free_bits > 0 else kl
            return ObjectiveTerms(weighted_loss(recon, kl_pen, beta), recon, kl, kl_pen, None, layer_kl)
        loss = math.log(k) - torch.logsumexp(-t.nll - t.log_ratio.sum(0), dim=0).mean()
        return ObjectiveTerms(loss, recon, kl, kl, -loss, layer_kl)

    def elbo(self, x: torch.Tensor, *, seed=None) -> dict:
        t = self._pass(x, 1, seed, log_ratio=False)
        kl = t.kl.sum(0)[0].float()
        recon = t.nll[0]
        return {"elbo": -(recon + kl), "recon": recon, "kl": kl}

    def _posterior(self, x: torch.Tensor):
        return x

    def _log_weights(self, posterior, x: torch.Tensor, k: int, seed) -> torch.Tensor:
        t = self._pass(x, k, seed, log_ratio=True)
        return -t.nll - t.log_ratio.sum(0)


def _split(h: torch.Tensor, clamp, backend) -> DiagonalGaussian:
    """A diagonal Gaussian from a network output ``[N, 2 * D, ...]`` (mu, then logvar), float32."""
    mu, logvar = h.float().chunk(2, dim=1)
    return DiagonalGaussian(mu, logvar, logvar_clamp=clamp, backend=backend)


def _per_sample(t: torch.Tensor, k: int) -> torch.Tensor:
    """``[K * B]`` values as ``[K, B]``."""
    return t.reshape(k, -1)


class IWAETwoLayerVAE(HierarchicalVAE):
    """The IWAE paper's two-stochastic-layer net (Burda et al. 2015, Table 1 and appendix).

    Recognition ``x -> 200 -> 200 -> h1 (100)``, ``h1 -> 100 -> 100 -> h2 (50)``; generative
    ``p(h2) = N(0, I)``, ``h2 -> 100 -> 100 -> p(h1 | h2)`` (Gaussian), ``h1 -> 200 -> 200 ->
    p(x | h1)``; tanh between layers. The log weight of a sample is ``log p(x|h1) + log p(h1|h2)
    + log p(h2) - log q(h1|x) - log q(h2|h1)``: ``h1`` and ``log q(h1|x)`` come from one fused
    call (K samples), ``h2``, its KL to N(0, I) and ``log q(h2|h1) - log p(h2)`` from another,
    ``log p(h1|h2)`` from the fused log density. The ELBO's h2 term is the analytic KL, its h1
    term the one-sample ``log q(h1|x) - log p(h1|h2)``.

    Args:
        input_shape: shape of one example; inputs are flattened.
        latent_dims: ``[h1, h2]`` sizes (100, 50).
        hidden: widths between x and h1 (200, 200); upper_hidden: between h1 and h2 (100, 100).
        activation, likelihood, sigma, learn_sigma, logvar_clamp, backend: as
            :class:`~fused_vae.models.mlp.MLPVAE` (the clamp applies to every layer's logvars).

    Raises:
        ValueError: bad sizes, activation or likelihood.
    """

    layer_names = ("h1", "h2")

    def __init__(self, input_shape, latent_dims=(100, 50), hidden=(200, 200), upper_hidden=(100, 100),
                 activation: str = "tanh", likelihood: str = "bernoulli", sigma: float = 1.0,
                 learn_sigma: bool = False, logvar_clamp=None, backend: str | None = None):
        input_shape = tuple(int(s) for s in input_shape)
        h1, h2 = check_latent_dims(latent_dims, 2)
        hidden, upper = [int(h) for h in hidden], [int(h) for h in upper_hidden]
        if any(h < 1 for h in (*hidden, *upper)) or any(s < 1 for s in input_shape):
            raise ValueError(f"sizes must be >= 1: input_shape={input_shape}, hidden={hidden}, upper_hidden={upper}")
        d = math.prod(input_shape)
        spec = model_spec("mlp2", input_shape, h1, activation, likelihood, sigma, learn_sigma, logvar_clamp,
                          latent_dims=[h1, h2], hidden=hidden, upper_hidden=upper)
        spec.pop("latent_dim")
        super().__init__(
            nn.Sequential(nn.Flatten(), mlp([d, *hidden, 2 * h1], activation)),  # q(h1 | x)
            mlp([h1, *reversed(hidden), d], activation),  # p(x | h1)
            build_likelihood(likelihood, sigma=sigma, learn_sigma=learn_sigma),
            input_shape, h1, logvar_clamp=logvar_clamp, backend=backend, spec=spec,
        )  # fmt: skip
        self.latent_dims = [h1, h2]
        self.encoder2 = mlp([h1, *upper, 2 * h2], activation)  # q(h2 | h1)
        self.decoder2 = mlp([h2, *reversed(upper), 2 * h1], activation)  # p(h1 | h2)

    def _pass(self, x, k, seed, *, log_ratio):
        self._check_input(x)
        q1 = _split(self.encoder(x), self.logvar_clamp, self.backend)
        seed1, seed2 = _layer_seeds(seed, 2, x.device)
        h1, _, log_q1 = q1.sample_terms(seed=seed1, num_samples=k, log_density="q")  # [K, B, h1], [K, B]
        flat_h1 = h1.reshape(-1, self.latent_dims[0])
        q2 = _split(self.encoder2(flat_h1), self.logvar_clamp, self.backend)
        h2, kl2, ratio2 = q2.sample_terms(seed=seed2, kl="per_sample", log_density="ratio" if log_ratio else None)
        p1 = _split(self.decoder2(h2), self.logvar_clamp, self.backend)
        log_p1 = _per_sample(api.gaussian_log_prob(flat_h1, p1.mu, p1.logvar, logvar_clamp=self.logvar_clamp,
                                                   backend=self.backend), k)  # fmt: skip
        nll = self.likelihood.nll(self.decode(h1), x)
        ratio1 = log_q1 - log_p1  # log q(h1 | x) - log p(h1 | h2)
        kl = torch.stack([ratio1, _per_sample(kl2, k)])
        return LayerTerms(nll, kl, torch.stack([ratio1, _per_sample(ratio2, k)]) if log_ratio else None)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | h1 = the mode of q(h1|x)], ``[B, *input_shape]`` float32."""
        return self.likelihood.mean(self.decode(self.encode(x).mode()))

    def generate(self, n: int, *, seed: int = 0, device=None) -> torch.Tensor:
        """Means of p(x|h1) for ancestral draws h2 ~ N(0, I), h1 ~ p(h1|h2) (noise streams of ``seed``)."""
        device = device if device is not None else next(self.parameters()).device
        seed_h2, seed_h1 = _layer_seeds(seed, 2, device)
        h2 = api.standard_normal((n, self.latent_dims[1]), seed_h2, device=device)
        p1 = _split(self.decoder2(h2), self.logvar_clamp, self.backend)
        h1 = p1.sample(seed=seed_h1)
        return self.likelihood.mean(self.decode(h1))


_LAYER_SEED_STEP = 0x2545F4914F6CDD1D  # an odd 63-bit constant: layer l adds l times it to the seed


def _layer_seeds(seed, layers: int, device) -> list:
    """One noise seed per stochastic layer from a call's ``seed``: None stays None (each layer
    draws its own); an int in [0, 2**64) or a 0-d int64 tensor gives the seeds ``seed + l * C``
    (mod 2**64), the same for both forms, on the device for a tensor (no host work, capturable)."""
    if seed is None:
        return [None] * layers
    steps = [(l * _LAYER_SEED_STEP) % (1 << 63) for l in range(layers)]
    if isinstance(seed, torch.Tensor):
        base = seed.reshape(()).to(device)
        return [base if step == 0 else base + step for step in steps]
    return [(int(seed) + step) % (1 << 64) for step in steps]


class _TopDownBlocks(nn.Module):
    """The per-layer networks of a top-down hierarchy: ``prior`` (state -> prior parameters),
    ``posterior`` ((feature, state) -> posterior parameters) and ``merge`` ((state, z) -> the
    residual update of the state), plus ``up`` (state -> the next layer's state)."""

    def __init__(self, prior: nn.Module, posterior: nn.Module, merge: nn.Module, up: nn.Module):
        super().__init__()
        self.prior, self.posterior, self.merge, self.up = prior, posterior, merge, up


class TopDownVAE(HierarchicalVAE):
    """A top-down hierarchical VAE with ``L = len(latent_dims)`` stochastic layers.

    Bottom-up: ``d_1 = f_1(x)``, ``d_l = f_l(d_{l-1})``. Top-down, from a learned state
    ``s_L``, for ``l = L .. 1``: the prior ``p(z_l | z_>l) = N(prior_l(s_l))``, the posterior
    ``q(z_l | x, z_>l) = N(posterior_l([d_l, s_l]))``, a sample ``z_l`` and the KL to the
    prior from one fused call (``log q - log p`` of each sample as well, for the IWAE
    bound), then ``s_l <- s_l + merge_l([s_l, z_l])`` and ``s_{l-1} = up_l(s_l)``; the
    decoder maps ``s_0`` to p(x | z). The top prior is learned but does not depend on x.

    ``arch="mlp"``: states and features are vectors of ``hidden`` units; ``arch="conv"``:
    feature maps, layer l at 1 / 2^l of the image size with ``channels[l]`` channels
    (latents ``[latent_dims[l], H / 2^l, W / 2^l]``), 3x3 convolutions, stride-2 down and up.

    Args:
        input_shape: one example's shape (``(C, H, W)`` for conv).
        latent_dims: latent units (mlp) or channels (conv) per layer, bottom layer first.
        hidden: mlp: the width of every state and feature.
        channels: conv: channels of each layer's maps (one per layer).
        arch: ``"mlp"`` or ``"conv"``.
        activation, likelihood, sigma, learn_sigma, logvar_clamp, backend: as
            :class:`~fused_vae.models.mlp.MLPVAE` (the clamp applies to priors and posteriors).

    Raises:
        ValueError: bad sizes, arch, activation or likelihood.
    """

    def __init__(self, input_shape, latent_dims=(32, 16, 8), hidden=256, channels=(32, 64, 64), arch: str = "mlp",
                 activation: str = "silu", likelihood: str = "bernoulli", sigma: float = 1.0,
                 learn_sigma: bool = False, logvar_clamp=None, backend: str | None = None):
        input_shape = tuple(int(s) for s in input_shape)
        dims = check_latent_dims(latent_dims)
        hidden = int(hidden[0] if isinstance(hidden, (list, tuple)) else hidden)
        channels = [int(c) for c in channels]
        if arch not in ("mlp", "conv"):
            raise ValueError(f"arch must be 'mlp' or 'conv', got {arch!r}")
        if arch == "conv" and (len(input_shape) != 3 or len(channels) != len(dims)):
            raise ValueError(f"topdown-conv needs (C, H, W) inputs and one channel count per layer, got "
                             f"input_shape={input_shape}, channels={channels}, latent_dims={dims}")
        if hidden < 1 or any(c < 1 for c in channels) or any(s < 1 for s in input_shape):
            raise ValueError(f"sizes must be >= 1: input_shape={input_shape}, hidden={hidden}, channels={channels}")
        kind = "topdown" if arch == "mlp" else "topdown-conv"  # the conv kind is TopDownConvVAE, arch implied
        extra = dict(latent_dims=dims, hidden=hidden) if arch == "mlp" else dict(latent_dims=dims, channels=channels)
        spec = model_spec(kind, input_shape, dims[0], activation, likelihood, sigma, learn_sigma, logvar_clamp, **extra)
        spec.pop("latent_dim")
        build = self._mlp_parts if arch == "mlp" else self._conv_parts
        bottom_up, blocks, decoder, top_state, latent_shapes = build(input_shape, dims, hidden, channels, activation)
        super().__init__(bottom_up, decoder, build_likelihood(likelihood, sigma=sigma, learn_sigma=learn_sigma),
                         input_shape, dims[0], logvar_clamp=logvar_clamp, backend=backend, spec=spec)  # fmt: skip
        self.arch, self.latent_dims = arch, dims
        self.blocks = blocks  # bottom layer first
        self.top_state = nn.Parameter(top_state)
        self.latent_shapes = latent_shapes
        self.layer_names = tuple(f"z{l + 1}" for l in range(len(dims)))

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def _mlp_parts(input_shape, dims, hidden, channels, activation):
        d = math.prod(input_shape)
        act = lambda: make_activation(activation)  # noqa: E731
        ups = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), act(), nn.Linear(hidden, hidden))])
        ups.extend(nn.Sequential(act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, hidden))
                   for _ in dims[1:])  # fmt: skip
        blocks = nn.ModuleList(
            _TopDownBlocks(
                prior=nn.Sequential(act(), nn.Linear(hidden, 2 * z)),
                posterior=nn.Sequential(act(), nn.Linear(2 * hidden, hidden), act(), nn.Linear(hidden, 2 * z)),
                merge=nn.Sequential(nn.Linear(hidden + z, hidden), act(), nn.Linear(hidden, hidden)),
                up=nn.Identity(),
            )
            for z in dims
        )
        decoder = nn.Sequential(act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, d))
        return _BottomUp(ups), blocks, decoder, torch.zeros(1, hidden), [(z,) for z in dims]

    @staticmethod
    def _conv_parts(input_shape, dims, hidden, channels, activation):
        c, h, w = input_shape
        act = lambda: make_activation(activation)  # noqa: E731
        sizes = [(h, w)]
        for _ in dims:
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        ins = [c, *channels[:-1]]
        ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), act(), nn.Conv2d(o, o, 3, padding=1))
            for i, o in zip(ins, channels)
        )

        def up_to(layer: int) -> nn.Module:  # layer's state -> the state of the layer below (or the decoder's input)
            (ih, iw), (th, tw) = sizes[layer + 1], sizes[layer]
            out = channels[layer - 1] if layer > 0 else channels[0]
            op = (th - (2 * ih - 1), tw - (2 * iw - 1))
            return nn.Sequential(act(), nn.ConvTranspose2d(channels[layer], out, 3, stride=2, padding=1, output_padding=op))

        blocks = nn.ModuleList(
            _TopDownBlocks(
                prior=nn.Sequential(act(), nn.Conv2d(ch, 2 * z, 3, padding=1)),
                posterior=nn.Sequential(act(), nn.Conv2d(2 * ch, ch, 3, padding=1), act(), nn.Conv2d(ch, 2 * z, 3, padding=1)),
                merge=nn.Sequential(nn.Conv2d(ch + z, ch, 3, padding=1), act(), nn.Conv2d(ch, ch, 3, padding=1)),
                up=up_to(layer) if layer > 0 else nn.Identity(),
            )
            for layer, (z, ch) in enumerate(zip(dims, channels))
        )
        decoder = nn.Sequential(up_to(0), act(), nn.Conv2d(channels[0], c, 3, padding=1))
        top = torch.zeros(1, channels[-1], *sizes[len(dims)])
        return _BottomUp(ups), blocks, decoder, top, [(z, *sizes[l + 1]) for l, z in enumerate(dims)]

    # -- the passes --------------------------------------------------------------------------
    def _pass(self, x, k, seed, *, log_ratio):
        self._check_input(x)
        feats = self.encoder(x)  # d_1 .. d_L, each [B, ...]
        seeds = _layer_seeds(seed, len(self.blocks), x.device)
        state = self.top_state.expand(x.shape[0], *self.top_state.shape[1:])
        kls, ratios, drawn = [], [], 1
        for l in reversed(range(len(self.blocks))):
            block = self.blocks[l]
            d = feats[l]
            if drawn > 1:  # states are per sample: [K * B, ...]
                d = d.unsqueeze(0).expand(drawn, *d.shape).reshape(-1, *d.shape[1:])
            p = _split(block.prior(state), self.logvar_clamp, self.backend)
            q = _split(block.posterior(torch.cat([d, state], dim=1)), self.logvar_clamp, self.backend)
            n = k if drawn == 1 and k > 1 else None  # the top layer draws the K samples
            z, kl, ratio = q.sample_terms(seed=seeds[l], num_samples=n, kl="per_sample", prior=p,
                                          log_density="ratio" if log_ratio else None)  # fmt: skip
            if n is not None:
                z = z.reshape(-1, *z.shape[2:])
                kl = kl.unsqueeze(0).expand(k, -1).reshape(-1)
                ratio = ratio.reshape(-1) if ratio is not None else None
                state = state.unsqueeze(0).expand(k, *state.shape).reshape(-1, *state.shape[1:])
                drawn = k
            state = block.up(state + block.merge(torch.cat([state, z.to(state.dtype)], dim=1)))
            kls.append(_per_sample(kl.float(), k))
            if log_ratio:
                ratios.append(_per_sample(ratio, k))
        logits = self.decoder(state).reshape(k, x.shape[0], *self.input_shape)
        nll = self.likelihood.nll(logits, x)
        kl = torch.stack(kls[::-1])  # bottom layer first
        return LayerTerms(nll, kl, torch.stack(ratios[::-1]) if log_ratio else None)

    def _top_down(self, n: int, z_of_layer, feats=None) -> torch.Tensor:
        """The decoder's output after a top-down pass for ``n`` examples in which
        ``z_of_layer(l, dist)`` gives layer l's latent from its prior, or, with bottom-up
        features ``feats``, from its posterior."""
        state = self.top_state.expand(n, *self.top_state.shape[1:])
        for l in reversed(range(len(self.blocks))):
            block = self.blocks[l]
            h = block.prior(state) if feats is None else block.posterior(torch.cat([feats[l], state], dim=1))
            z = z_of_layer(l, _split(h, self.logvar_clamp, self.backend))
            state = block.up(state + block.merge(torch.cat([state, z.to(state.dtype)], dim=1)))
        return self.decoder(state).reshape(n, *self.input_shape)

    def generate(self, n: int, *, seed: int = 0, device=None) -> torch.Tensor:
        """Means of p(x | z) for ancestral draws from the learned priors, top layer first
        (one noise stream per layer from ``seed``): ``[n, *input_shape]``."""
        device = device if device is not None else next(self.parameters()).device
        seeds = _layer_seeds(seed, len(self.blocks), device)
        return self.likelihood.mean(self._top_down(n, lambda l, p: p.sample(seed=seeds[l])))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z] with every layer's z at its posterior mode (the posterior mean given the
        layers above), ``[B, *input_shape]`` float32."""
        self._check_input(x)
        return self.likelihood.mean(self._top_down(x.shape[0], lambda l, q: q.mode(), self.encoder(x)))

    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Reconstructions (every layer at its posterior mode) from bottom-up features taken
        along the straight line between two examples' (each ``[*input_shape]``): ``[steps, *input_shape]``."""
        feats = self.encoder(torch.stack([x_a, x_b]))
        t = torch.linspace(0.0, 1.0, steps, device=x_a.device)
        mixed = [(1 - t.view(-1, *[1] * (f.dim() - 1))) * f[0:1] + t.view(-1, *[1] * (f.dim() - 1)) * f[1:2]
                 for f in feats]  # fmt: skip
        return self.likelihood.mean(self._top_down(steps, lambda l, q: q.mode(), mixed))


class TopDownConvVAE(TopDownVAE):
    """:class:`TopDownVAE` with ``arch="conv"``: latents are feature maps, layer l at 1 / 2^l of
    the image size (``latent_dims`` channels each, ``channels`` channels in its blocks)."""

    def __init__(self, input_shape, latent_dims=(16, 8), channels=(32, 64), **kwargs):
        super().__init__(input_shape, latent_dims, channels=channels, arch="conv", **kwargs)


class _BottomUp(nn.Module):
    """Applies ``f_1, .., f_L`` in turn and returns every feature ``[d_1, .., d_L]``."""

    def __init__(self, stages: nn.ModuleList):
        super().__init__()
        self.stages = stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], x
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats
