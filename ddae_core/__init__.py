"""ddae_core: denoising diffusion autoencoders as self-supervised learners (library part).

Imports none of Prefect, MLflow or DVC; usable alone to train a diffusion model and read its features.
"""
