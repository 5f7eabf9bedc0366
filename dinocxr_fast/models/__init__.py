"""ViTAEv2 backbones and the DINO head."""
from dinocxr_fast.models.head import DINOHead, MultiCropWrapper, WeightNormLinear
from dinocxr_fast.models.vitaev2 import (
    CONFIGS,
    ViTAEv2,
    ViTAEv2Config,
    convert_reference_state_dict,
    create_model,
    list_models,
)

__all__ = [
    "CONFIGS",
    "DINOHead",
    "MultiCropWrapper",
    "ViTAEv2",
    "ViTAEv2Config",
    "WeightNormLinear",
    "convert_reference_state_dict",
    "create_model",
    "list_models",
]
