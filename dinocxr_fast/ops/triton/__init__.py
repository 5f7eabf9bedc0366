"""Triton kernels and their launch helpers. Importing a submodule requires ``triton``."""
