"""scratchlm: GPT-2 and Llama 2/3 built from their parts, trained, sampled and served."""

from .config import ModelConfig
from .model import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache"]
__version__ = "0.1.0"
