"""Small shared helpers: output containers and diffusers-compatible random tensors."""

from .outputs import BaseOutput
from .torch_utils import randn_tensor

__all__ = ["BaseOutput", "randn_tensor"]
