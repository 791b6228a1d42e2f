"""mlx-sbd: Set Block Decoding for Llama/Qwen models with MLX."""

from .loading import load
from .model import MASK_ID, SBDModel

__version__ = "0.1.0"
__all__ = ["load", "SBDModel", "MASK_ID", "__version__"]
