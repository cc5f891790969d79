"""The small vision-language model (patch ViT + MLP projector + GPT decoder) as an ordered block list."""

from sysopt.models.decoder import MLP, DecoderBlock, LMHead, SelfAttention, TransformerBlock
from sysopt.models.vision import VisionEmbed, ViTBlock
from sysopt.models.vlm import VLM, ImageTextMerge, VLMConfig, vlm_loss

__all__ = [
    "MLP",
    "VLM",
    "DecoderBlock",
    "ImageTextMerge",
    "LMHead",
    "SelfAttention",
    "TransformerBlock",
    "VLMConfig",
    "ViTBlock",
    "VisionEmbed",
    "vlm_loss",
]
