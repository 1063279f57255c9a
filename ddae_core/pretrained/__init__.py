"""Pretrained diffusion models made by others: read (safetensors or weights-only), convert or wrap, tap."""
