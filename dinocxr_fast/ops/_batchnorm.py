"""BatchNorm state as the fused ops write it (the cpp and cuda backends of conv_bn_act and pcm)."""
from __future__ import annotations


def update_running_stats(running_mean, running_var, new_mean, new_var) -> None:
    """Write a fused kernel's new running statistics the way F.batch_norm's own update is written:
    invisible to autograd (through ``.data``, which does not bump the version counter). The same
    BatchNorm may already have run on the vendor path in this graph (another crop size, another
    backend choice), and F.batch_norm saves the running statistics for its backward: a tracked
    in-place write here would fail that backward ("modified by an inplace operation")."""
    running_mean.data.copy_(new_mean)
    running_var.data.copy_(new_var)
