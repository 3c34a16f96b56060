"""Tokenizers: characters, byte-level BPE (trained here), and the formats of others.

>>> from scratchlm.tokenizer import BPETokenizer, load_tokenizer
>>> tok = BPETokenizer.train("the cat sat on the mat. " * 50, vocab_size=300)
>>> tok.decode(tok.encode("the mat<|endoftext|>"))
'the mat<|endoftext|>'

- ``CharTokenizer``: one id per character (char.py)
- ``BPETokenizer``: byte-level BPE, trained by ``bpe_train.py``, encoded by tiktoken
  with a pure-Python reference (bpe.py); saved as Hugging Face tokenizer.json
- ``SentencePieceTokenizer``: Llama 2's tokenizer.model (spm.py)
- ``load_tokenizer(dir)``: whichever of these a directory holds (formats.py)

See docs/tokenization.md for the guide.
"""

from .base import Tokenizer, TokenizerError
from .bpe import BPETokenizer
from .bpe_train import PATTERNS
from .char import CharTokenizer
from .formats import bpe_from_tiktoken, load_tokenizer
from .spm import SentencePieceTokenizer

__all__ = ["Tokenizer", "TokenizerError", "CharTokenizer", "BPETokenizer", "SentencePieceTokenizer",
           "PATTERNS", "load_tokenizer", "bpe_from_tiktoken"]
