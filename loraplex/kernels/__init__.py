"""Triton kernels, each with its pure-PyTorch reference (`*_ref`) beside it."""
