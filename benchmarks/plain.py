"""The plain PyTorch code a user would write: the baselines of every benchmark script."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def reparameterize_kl_eager(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = mu + exp(0.5*logvar) * randn; KL batch mean, as in most VAE code.

    ``mu``, ``logvar``: ``[B, ...]`` of one shape. Returns ``(z, kl)``: z of mu's shape,
    kl a scalar of mu's dtype.
    """
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1) / mu.shape[0]
    return z, kl


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class PlainMLPVAE(nn.Module):
    """The textbook MLP VAE with a Bernoulli decoder: ``nn.Linear`` + tanh layers,
    ``randn_like`` reparameterization, KL in closed form, BCE with logits.

    Same layers, in the same order, as ``fused_vae.models.MLPVAE(input_shape,
    latent_dim, hidden, activation="tanh", likelihood="bernoulli")``, so
    :meth:`copy_from` can load that model's weights.

    Args:
        input_dim: pixels per example (inputs ``[B, ...]`` are flattened).
        latent_dim: latent units.
        hidden: encoder hidden widths (the decoder mirrors them).
    """

    def __init__(self, input_dim: int, latent_dim: int = 50, hidden=(200, 200)):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp([input_dim, *hidden, 2 * latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden), input_dim])

    def copy_from(self, model: nn.Module) -> "PlainMLPVAE":
        """Copies the weights of a fused_vae ``MLPVAE`` of the same sizes (parameter order).

        Raises:
            ValueError: the parameter shapes differ.
        """
        mine, theirs = list(self.parameters()), list(model.parameters())
        if [p.shape for p in mine] != [p.shape for p in theirs]:
            raise ValueError("copy_from needs a model with the same layer sizes")
        with torch.no_grad():
            for dst, src in zip(mine, theirs):
                dst.copy_(src)
        return self

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The negative ELBO averaged over the batch ``x`` (``[B, ...]`` in [0, 1]), a
        float32 scalar. ``eps`` (``[B, latent_dim]``) replaces ``randn_like`` when given."""
        x = x.flatten(1)
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar)
        z = mu + std * (torch.randn_like(std) if eps is None else eps)
        kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1, dim=1)
        recon = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(1)
        return (recon + kl).mean()


_LOG_2PI = math.log(2 * math.pi)


def plain_loss(plain: PlainMLPVAE, x: torch.Tensor, k: int, objective: str, eps: torch.Tensor | None = None):
    """The K-sample loss of ``plain`` for the batch ``x`` (``[B, ...]`` in [0, 1]) as plain
    PyTorch code writes it, a float32 scalar: ``objective="elbo"`` the mean of K
    single-sample ELBOs with the closed-form KL, ``"iwae"`` minus the importance-weighted
    bound L_K (logsumexp over the K samples of log p(x|z) + log p(z) - log q(z|x)).
    ``eps`` (``[K, B, latent_dim]``) replaces ``torch.randn`` when given."""
    x = x.flatten(1)
    mu, logvar = plain.encoder(x).chunk(2, dim=-1)
    std = torch.exp(0.5 * logvar)
    if eps is None:
        eps = torch.randn(k, *mu.shape, dtype=mu.dtype, device=mu.device)
    z = mu + std * eps  # [K, B, L]
    logits = plain.decoder(z)
    recon = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)  # [K, B]
    if objective == "elbo":
        kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1, dim=1)
        return (recon.mean(0) + kl).mean()
    log_pz = -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)
    log_qz = -0.5 * (eps.pow(2) + logvar + _LOG_2PI).sum(-1)
    return -(torch.logsumexp(-recon + log_pz - log_qz, dim=0) - math.log(k)).mean()


def _normal_log_density(x, mu, logvar):
    """log N(x; mu, exp(logvar)) per element, as a user writes it."""
    return -0.5 * ((x - mu).pow(2) * torch.exp(-logvar) + logvar + _LOG_2PI)


def plain_two_layer_loss(model, x: torch.Tensor, k: int, objective: str) -> torch.Tensor:
    """The K-sample loss of the IWAE paper's two-stochastic-layer net as plain PyTorch code
    writes it, on the layers of a ``fused_vae.models.IWAETwoLayerVAE`` (its ``encoder`` q(h1|x),
    ``encoder2`` q(h2|h1), ``decoder2`` p(h1|h2), ``decoder`` p(x|h1)): ``torch.randn`` noise,
    the Gaussian log densities written out, the closed-form KL of h2 for the ELBO, logsumexp
    over the K samples for IWAE. A float32 scalar."""
    mu1, lv1 = model.encoder(x).chunk(2, dim=-1)
    eps1 = torch.randn(k, *mu1.shape, dtype=mu1.dtype, device=mu1.device)
    h1 = mu1 + torch.exp(0.5 * lv1) * eps1  # [K, B, 100]
    mu2, lv2 = model.encoder2(h1).chunk(2, dim=-1)
    eps2 = torch.randn_like(mu2)
    h2 = mu2 + torch.exp(0.5 * lv2) * eps2  # [K, B, 50]
    pm1, plv1 = model.decoder2(h2).chunk(2, dim=-1)
    logits = model.decoder(h1)
    target = x.flatten(1).expand_as(logits)
    log_px = -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)  # [K, B]
    log_q1 = (-0.5 * eps1.pow(2) - 0.5 * lv1 - 0.5 * _LOG_2PI).sum(-1)
    log_p1 = _normal_log_density(h1, pm1, plv1).sum(-1)
    if objective == "elbo":
        kl2 = 0.5 * torch.sum(mu2.pow(2) + lv2.exp() - lv2 - 1, dim=-1)
        return -(log_px + log_p1 - log_q1 - kl2).mean()
    log_q2 = (-0.5 * eps2.pow(2) - 0.5 * lv2 - 0.5 * _LOG_2PI).sum(-1)
    log_p2 = (-0.5 * h2.pow(2) - 0.5 * _LOG_2PI).sum(-1)
    log_w = log_px + log_p1 + log_p2 - log_q1 - log_q2
    return -(torch.logsumexp(log_w, dim=0) - math.log(k)).mean()


def plain_topdown_loss(model, x: torch.Tensor, k: int, objective: str) -> torch.Tensor:
    """The K-sample loss of a top-down hierarchical VAE as plain PyTorch code (VDVAE's style)
    writes it, on the layers of a ``fused_vae.models.TopDownVAE`` (its bottom-up ``encoder``,
    each block's ``prior``, ``posterior``, ``merge`` and ``up``, the ``decoder``): per layer
    ``torch.randn`` noise, the sample, the analytic KL to the learned prior summed per example,
    and for IWAE each sample's log q - log p; the top layer draws the K samples. A float32 scalar."""
    b = x.shape[0]
    feats = model.encoder(x)
    state = model.top_state.expand(b, *model.top_state.shape[1:])
    kl_total, ratio_total, drawn = 0.0, 0.0, 1
    for l in reversed(range(len(model.blocks))):
        block = model.blocks[l]
        d = feats[l] if drawn == 1 else feats[l].unsqueeze(0).expand(drawn, *feats[l].shape).flatten(0, 1)
        pm, plv = block.prior(state).chunk(2, dim=1)
        mu, lv = block.posterior(torch.cat([d, state], dim=1)).chunk(2, dim=1)
        n = k if drawn == 1 else 1
        eps = torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device)
        z = mu + torch.exp(0.5 * lv) * eps  # [n, N, ...]
        kl = (-0.5 + 0.5 * (plv - lv) + 0.5 * (lv.exp() + (mu - pm).pow(2)) / plv.exp()).flatten(1).sum(-1)
        kl_total = kl_total + (kl if drawn == 1 else kl.reshape(drawn, b).mean(0))
        if objective == "iwae":
            log_q = (-0.5 * eps.pow(2) - 0.5 * lv).flatten(2).sum(-1)
            log_p = (-0.5 * (z - pm).pow(2) / plv.exp() - 0.5 * plv).flatten(2).sum(-1)
            ratio_total = ratio_total + (log_q - log_p).reshape(k, b)
        if drawn == 1:
            z = z.flatten(0, 1)
            state = state.unsqueeze(0).expand(n, *state.shape).flatten(0, 1)
            drawn = n
        else:
            z = z[0]
        state = block.up(state + block.merge(torch.cat([state, z], dim=1)))
    logits = model.decoder(state).reshape(k, b, -1)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.flatten(1).expand_as(logits), reduction="none").sum(-1)
    if objective == "elbo":
        return -(log_px.mean(0) - kl_total).mean()
    return -(torch.logsumexp(log_px - ratio_total, dim=0) - math.log(k)).mean()


def plain_scheduler(optimizer, schedule: str, *, total_steps: int, steps_per_epoch: int, min_ratio: float = 0.1):
    """The trainer's learning-rate schedules (no warm-up) from torch's own schedulers, stepped once per
    optimizer step: ``cosine`` (to ``min_ratio`` x lr at ``total_steps``), ``constant``, or ``iwae``
    (the IWAE paper's: x 10^(-1/7) after 1, 3, 9, ... epochs, i.e. stage i from epoch (3^i - 1) / 2).

    Raises:
        ValueError: another schedule.
    """
    if schedule == "cosine":
        lr = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=lr * min_ratio)
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if schedule == "iwae":
        milestones = [steps_per_epoch * (3**i - 1) // 2 for i in range(1, 12)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=10 ** (-1 / 7))
    raise ValueError(f"schedule must be cosine, constant or iwae, got {schedule!r}")


class PlainLoop:
    """The training loop a user would write around ``model``, one step per :meth:`step`: shuffled
    batches of ``batch_size`` from ``train_x`` (``[N, ...]`` in [0, 1]; a new ``randperm`` each
    epoch, the last partial batch dropped), ``torch.bernoulli`` binarization when
    ``dynamic_binarize``, ``loss`` (:func:`plain_loss` of a :class:`PlainMLPVAE`, or
    :func:`plain_two_layer_loss` / :func:`plain_topdown_loss` of the hierarchical nets;
    ``torch.compile``-d when ``compile_loss``),
    backward, gradient-norm clipping (when ``grad_clip`` > 0), fused AdamW (no weight decay)
    and :func:`plain_scheduler` over ``total_steps``.

    The attributes ``binarize``, ``clip`` and ``update`` (the optimizer and LR steps) switch
    those parts on and off (benchmarks/trainer_breakdown.py times them).
    """

    def __init__(self, model: nn.Module, train_x: torch.Tensor, *, total_steps: int, batch_size: int,
                 objective: str = "elbo", k: int = 1, lr: float = 1e-3, adam_eps: float = 1e-8,
                 grad_clip: float = 100.0, schedule: str = "cosine", dynamic_binarize: bool = False,
                 compile_loss: bool = False, loss=plain_loss):
        self.model, self.train_x, self.batch_size, self.objective, self.k = model, train_x, batch_size, objective, k
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=adam_eps, weight_decay=0.0, fused=True)
        self.per_epoch = train_x.shape[0] // batch_size
        self.sched = plain_scheduler(self.opt, schedule, total_steps=total_steps, steps_per_epoch=self.per_epoch)
        self.loss_fn = torch.compile(loss) if compile_loss else loss
        self.binarize, self.clip, self.update = dynamic_binarize, grad_clip > 0, True
        self.steps_done, self.order = 0, None

    def step(self) -> torch.Tensor:
        """One optimizer step; returns its loss (a float32 scalar, not read back)."""
        bsz = self.batch_size
        if self.steps_done % self.per_epoch == 0:
            self.order = torch.randperm(self.train_x.shape[0])
        i = self.steps_done % self.per_epoch
        x = self.train_x[self.order[i * bsz:(i + 1) * bsz]]
        if self.binarize:
            x = torch.bernoulli(x)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, x, self.k, self.objective)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.update:
            self.opt.step()
            self.sched.step()
        self.steps_done += 1
        return loss


def train_plain(model: nn.Module, train_x: torch.Tensor, *, steps: int, batch_size: int, log_every: int = 50,
                **loop_kwargs) -> list[tuple[int, float]]:
    """``steps`` steps of :class:`PlainLoop` (``batch_size`` and ``loop_kwargs`` are its
    arguments; ``total_steps=steps``); every ``log_every`` steps it reads the loss back, as a
    loop that prints it would.

    Returns ``[(step, seconds since the loop started), ...]`` at every ``log_every``-th step
    and the last (``time.perf_counter``).

    Raises:
        FloatingPointError: the loss became NaN/Inf.
    """
    loop = PlainLoop(model, train_x, total_steps=steps, batch_size=batch_size, **loop_kwargs)
    marks = []
    t0 = time.perf_counter()
    for step in range(steps):
        loss = loop.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"plain loop: non-finite loss at step {step + 1}")
            marks.append((step + 1, time.perf_counter() - t0))
    return marks
