"""SSN model package: open_clip backbone wrapper, SSN head, retrieval methods and losses."""
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
from .loss import LOSSES, SSNLoss, create_loss, register_loss, ssn_loss, ssn_loss_terms
from .retrievers import RETRIEVERS, Retriever, get_retriever, register_retriever
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
    "ssn_loss", "ssn_loss_terms", "SSNLoss", "LOSSES", "create_loss", "register_loss",
    "Retriever", "RETRIEVERS", "get_retriever", "register_retriever", "SSNHead", "masked_mean", "RETRIEVAL_METHODS",
    "CheckpointMismatchError", "SSNModel", "build_ssn_model", "check_model_config", "complete_model_config",
    "ssn_model_from_checkpoint",
]
