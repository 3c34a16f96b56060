"""Tokenizers: characters, byte-level BPE (trained here), and the formats of others.

>>> from scratchlm.tokenizer import BPETokenizer, load_tokenizer
>>> tok = BPETokenizer.train("the cat sat on the mat. " * 50, vocab_size=300)
>>> tok.decode(tok.encode("the mat<|endoftext|>"))
'the mat<|endoftext|>'

- ``CharTokenizer``: one id per character (char.py)
- ``BPETokenizer``: byte-level BPE, trained by ``bpe_train.py``, encoded by tiktoken
  with a pure-Python reference (bpe.py); saved as Hugging Face tokenizer.json
- ``SentencePieceTokenizer``: Llama 2's tokenizer.model (spm.py)
- ``load_tokenizer(dir)``: whichever of these a directory holds (load.py), reading the
  file formats of others: Hugging Face tokenizer.json (hf_json.py, with bytes_map.py),
  tiktoken rank files (tiktoken_files.py)

Imports go one way (minbpe's style): base <- bytes_map, files <- hf_json <- bpe, char,
spm <- tiktoken_files <- load; nothing in the package imports load.py back.

See docs/tokenization.md for the guide.
"""

from .base import Tokenizer, TokenizerError
from .bpe import BPETokenizer
from .bpe_train import PATTERNS
from .char import CharTokenizer
from .load import check_vocab_fits, load_tokenizer
from .spm import SentencePieceTokenizer
from .tiktoken_files import bpe_from_tiktoken

__all__ = ["Tokenizer", "TokenizerError", "CharTokenizer", "BPETokenizer", "SentencePieceTokenizer",
           "PATTERNS", "load_tokenizer", "check_vocab_fits", "bpe_from_tiktoken"]
