"""Device code of dinocxr_fast: raw CUDA sources (``cuda/``) and Triton kernels (``triton/``).

Installed as ``dinocxr_fast.kernels``. Nothing here knows about autograd or dispatch; that lives in
``dinocxr_fast.ops``.
"""
