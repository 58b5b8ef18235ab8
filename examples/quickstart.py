"""A complete VAE training step with fused_vae, runnable as it is (README's Quickstart).

A small MLP VAE learns synthetic 64-pixel "images" (random mixtures of a few fixed
patterns, values in [0, 1]); the only fused_vae line in the step is
``fv.reparameterize_kl``, which samples ``z`` and takes the KL to N(0, I) in one fused
pass (one fused backward pass too). It downloads nothing and runs in a few seconds on a CPU.

    python examples/quickstart.py            # 300 steps
    python examples/quickstart.py --steps 50
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fused_vae as fv

B, D, LATENT = 128, 64, 8  # batch, pixels per image, latent dimensions


def synthetic_batch(patterns: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[B, D]`` values in [0, 1]: each row a random, mostly one-sided mixture of the
    ``[P, D]`` binary patterns."""
    weights = (4.0 * torch.randn(B, patterns.shape[0], generator=generator)).softmax(dim=1)
    return weights @ patterns


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # layers this small only lose time to threads on a busy machine
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    patterns = (torch.rand(6, D, generator=g) < 0.5).float()
    encoder = nn.Sequential(nn.Linear(D, 128), nn.Tanh(), nn.Linear(128, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, 128), nn.Tanh(), nn.Linear(128, D))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)

    for step in range(1, args.steps + 1):
        x = synthetic_batch(patterns, g)
        mu, logvar = encoder(x).chunk(2, dim=-1)  # [B, LATENT] each
        z, kl = fv.reparameterize_kl(mu, logvar)  # z: [B, LATENT]; kl: scalar, sum / B
        recon = F.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum") / B
        loss = recon + args.beta * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # one fused backward kernel for z and the KL
        optimizer.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  -ELBO {recon.item() + kl.item():8.3f}  (recon {recon.item():.3f}, KL {kl.item():.3f})")

    print("backend used:", fv.backend_for(x.device))


if __name__ == "__main__":
    main()
