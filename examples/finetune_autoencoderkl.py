"""Fine-tune a small AutoencoderKL with fused_vae's posterior patched into diffusers.

The training loop is plain diffusers code; the only fused_vae lines are the import and
``fvd.patched()`` (or ``fvd.patch()`` once at the top of a script). The model is
randomly initialised and the images are synthetic (smooth colour blobs), so the script
downloads nothing; it runs in a few seconds on a CPU.

    python examples/finetune_autoencoderkl.py --steps 40
"""

from __future__ import annotations

import argparse
import math

import torch

import fused_vae.integrations.diffusers as fvd


def synthetic_images(batch_size: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch_size, 3, image_size, image_size]`` images in [-1, 1]: a Gaussian blob per
    channel at a random place, the kind of smooth content an autoencoder learns fast."""
    coords = torch.linspace(-1.0, 1.0, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centres = torch.rand(batch_size, 3, 2, 1, 1, generator=generator) * 1.6 - 0.8
    widths = torch.rand(batch_size, 3, 1, 1, generator=generator) * 0.3 + 0.2
    dist2 = (xx - centres[:, :, 0]) ** 2 + (yy - centres[:, :, 1]) ** 2
    return 2.0 * torch.exp(-dist2 / (2 * widths**2)) - 1.0


def small_autoencoder_kl(image_size: int, block_out_channels: tuple[int, int] = (16, 32)):
    """A randomly initialised AutoencoderKL with two down blocks (latents: image_size / 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )


def finetune(steps: int = 40, batch_size: int = 8, image_size: int = 32, kl_weight: float = 1e-4,
             lr: float = 2e-3, seed: int = 0, log_every: int = 0) -> list[float]:
    """Trains for ``steps`` steps; returns the loss (MSE + kl_weight * KL per sample) of each."""
    torch.manual_seed(seed)
    data_generator = torch.Generator().manual_seed(seed)
    vae = small_autoencoder_kl(image_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    losses = []
    with fvd.patched():  # the only fused_vae line in the loop's scope
        for step in range(steps):
            images = synthetic_images(batch_size, image_size, data_generator)
            posterior = vae.encode(images).latent_dist
            latents = posterior.sample()  # fused: z and its KL in one pass
            reconstruction = vae.decode(latents).sample
            kl = posterior.kl().mean()  # reuses the KL of the sampling pass
            loss = torch.nn.functional.mse_loss(reconstruction, images) + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"step {step:4d}  loss {loss.item():.4f}  kl/sample {kl.item():.1f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    losses = finetune(args.steps, args.batch_size, args.image_size, seed=args.seed, log_every=max(1, args.steps // 8))
    first, last = losses[0], losses[-1]
    print(f"loss {first:.4f} -> {last:.4f} ({'lower' if last < first else 'NOT lower'}) after {len(losses)} steps")
    if not math.isfinite(last):
        raise SystemExit("training diverged")


if __name__ == "__main__":
    main()
