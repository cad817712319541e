"""UNet2DModel and its building blocks, state-dict compatible with diffusers 0.42.1."""

from .attention import Attention
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from .modeling_utils import ModelMixin
from .resnet import Downsample2D, FirDownsample2D, FirUpsample2D, ResnetBlock2D, Upsample2D
from .unet_2d import UNet2DModel, UNet2DOutput

__all__ = [
    "Attention",
    "Downsample2D",
    "FirDownsample2D",
    "FirUpsample2D",
    "GaussianFourierProjection",
    "ModelMixin",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Timesteps",
    "UNet2DModel",
    "UNet2DOutput",
    "Upsample2D",
]
