"""mlx-sbd: Set Block Decoding for Llama/Qwen models with MLX."""

from .decode import SBDCache, make_prompt_cache
from .generate import GenerationResponse, generate, stream_generate
from .loading import load
from .model import MASK_ID, SBDModel

__version__ = "0.1.0"
__all__ = [
    "load",
    "generate",
    "stream_generate",
    "GenerationResponse",
    "make_prompt_cache",
    "SBDCache",
    "SBDModel",
    "MASK_ID",
    "__version__",
]
