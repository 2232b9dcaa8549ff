"""SSN model package: open_clip backbone wrapper, SSN head and loss."""
from .backbone import (
    CLIPBackbone,
    ImageFeatures,
    TextFeatures,
    create_backbone,
    list_shipped_configs,
    parse_pretrained,
    resolve_quick_gelu,
    text_mask_from_ids,
)
from .loss import ssn_loss, ssn_loss_terms
from .ssn_head import SSNHead, masked_mean
from .ssn_model import (
    RETRIEVAL_METHODS,
    CheckpointMismatchError,
    SSNModel,
    build_ssn_model,
    check_model_config,
    complete_model_config,
    ssn_model_from_checkpoint,
)

__all__ = [
    "CLIPBackbone", "ImageFeatures", "TextFeatures", "create_backbone", "list_shipped_configs", "parse_pretrained",
    "resolve_quick_gelu", "text_mask_from_ids",
    "ssn_loss", "ssn_loss_terms", "SSNHead", "masked_mean", "RETRIEVAL_METHODS",
    "CheckpointMismatchError", "SSNModel", "build_ssn_model", "check_model_config", "complete_model_config",
    "ssn_model_from_checkpoint",
]
