"""Drop-in integrations of the fused ops into other libraries.

Each submodule imports its library only when used, so ``import fused_vae`` never pulls
them in. ``fused_vae.integrations.diffusers``: the fused posterior for diffusers' VAEs.
"""
