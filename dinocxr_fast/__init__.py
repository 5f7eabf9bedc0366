"""dinocxr_fast: DINO-CXR self-supervised pretraining of ViTAEv2 on chest X-rays, made fast."""
from __future__ import annotations

__version__ = "0.1.0"
