"""Convolutional VAE for images of any size ``[C, H, W]``."""

from __future__ import annotations


from torch import nn

from .base import VAE, make_activation, model_spec
from .likelihoods import build_likelihood


class ConvVAE(VAE):
    """Conv encoder (3x3 stride-2 convs) -> dense -> (mu, logvar); the decoder mirrors it
    with transposed convs whose output padding restores the exact input size.

    No batch-dependent layers (no BatchNorm), so splitting a batch into micro-batches or
    across processes leaves the gradients unchanged.

    Args:
        input_shape: ``(C, H, W)``.
        latent_dim: latent units.
        channels: conv widths, each layer halves H and W (rounding up).
        hidden: width of the dense layer between the convs and the latent.
        activation, likelihood, sigma, learn_sigma, logvar_clamp, backend: as :class:`MLPVAE`.

    Raises:
        ValueError: input_shape is not (C, H, W), or bad sizes.
    """

    def __init__(
        self,
        input_shape,
        latent_dim: int = 32,
        channels=(32, 64),
        hidden: int = 256,
        activation: str = "silu",
        likelihood: str = "bernoulli",
        sigma: float = 1.0,
        learn_sigma: bool = False,
        logvar_clamp=None,
        backend: str | None = None,
    ):
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"ConvVAE needs image inputs (C, H, W), got input_shape={input_shape}")
        channels = [int(c) for c in channels]
        hidden = int(hidden[0] if isinstance(hidden, (list, tuple)) else hidden)
        if latent_dim < 1 or hidden < 1 or not channels or any(c < 1 for c in channels) or min(input_shape) < 1:
            raise ValueError(f"bad sizes: input_shape={input_shape}, latent_dim={latent_dim}, channels={channels}, hidden={hidden}")
        c, h, w = input_shape
        sizes = [(h, w)]
        enc: list[nn.Module] = []
        prev = c
        for ch in channels:
            enc += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), make_activation(activation)]
            prev = ch
            hh, ww = sizes[-1]
            sizes.append(((hh + 1) // 2, (ww + 1) // 2))
        fh, fw = sizes[-1]
        flat = prev * fh * fw
        encoder = nn.Sequential(
            *enc, nn.Flatten(), nn.Linear(flat, hidden), make_activation(activation), nn.Linear(hidden, 2 * latent_dim)
        )
        dec: list[nn.Module] = [
            nn.Linear(latent_dim, hidden),
            make_activation(activation),
            nn.Linear(hidden, flat),
            make_activation(activation),
            nn.Unflatten(1, (prev, fh, fw)),
        ]
        outs = list(reversed(channels[:-1])) + [c]
        for i, out_ch in enumerate(outs):
            (ih, iw), (th, tw) = sizes[-1 - i], sizes[-2 - i]
            op = (th - (2 * ih - 1), tw - (2 * iw - 1))
            dec.append(nn.ConvTranspose2d(prev, out_ch, 3, stride=2, padding=1, output_padding=op))
            if i < len(outs) - 1:
                dec.append(make_activation(activation))
            prev = out_ch
        spec = model_spec(
            "conv", input_shape, latent_dim, activation, likelihood, sigma, learn_sigma, logvar_clamp, channels=channels, hidden=hidden
        )
        super().__init__(
            encoder,
            nn.Sequential(*dec),
            build_likelihood(likelihood, sigma=sigma, learn_sigma=learn_sigma),
            input_shape,
            latent_dim,
            logvar_clamp=logvar_clamp,
            backend=backend,
            spec=spec,
        )
