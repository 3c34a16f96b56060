"""GGUF in and out: llama.cpp's single-file format, read into our Transformer and written back.

- ``load_gguf(path)`` -> (Transformer, tokenizer): metadata -> ModelConfig, every tensor
  dequantized into place (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K), the
  tokenizer rebuilt from the metadata (load.py);
- ``load_gguf(path, layout="int4" | "int8")``: the decode layers of decode_weights built from
  the quantized blocks, tensor by tensor, with no float copy (quant.py);
- ``save_gguf(model, tokenizer, path, dtype="f16")``: a file llama.cpp / Ollama load (save.py);
- ``resolve_named_model("smollm2-135m-instruct")``: a real model that a package ships.

The pieces: container.py (the file format), arch.py (the architecture table, the Q/K row
order), vocab.py (tokenizers <-> metadata). See docs/gguf.md for the guide.
(The package is not called ``gguf``: that name belongs to the PyPI package we read blocks with.)
"""

from .arch import ARCHITECTURES, permute_rows, unpermute_rows
from .container import GGUFError, GGUFFile
from .load import NAMED_MODELS, is_gguf_file, load_gguf, resolve_named_model
from .save import WEIGHT_TYPES, save_gguf

__all__ = ["ARCHITECTURES", "GGUFError", "GGUFFile", "NAMED_MODELS", "WEIGHT_TYPES", "is_gguf_file",
           "load_gguf", "permute_rows", "resolve_named_model", "save_gguf", "unpermute_rows"]
