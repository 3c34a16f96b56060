"""GGUF options for `scratchlm export` (hooks for the export command in cli/convert.py).

The export command is one parser; this module adds what ``--format gguf`` needs and runs it:

    scratchlm export MODEL out.gguf --format gguf [--quant f16|bf16|q8_0|q4_0|...]

Hooks (one line each, in the export command): ``add_export_options(p)`` after its own
arguments, "gguf" among ``--format``'s choices, and ``return export_gguf(args)`` when
``args.format == "gguf"``. Nothing is registered here by itself (no ``add_commands``).
"""

from __future__ import annotations

# gguf_io.save.WEIGHT_TYPES, written out so that building the parser imports no torch
# (tests/test_gguf.py checks the two agree).
QUANT_CHOICES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def add_export_options(p) -> None:
    p.add_argument("--quant", default="f16", choices=QUANT_CHOICES,
                   help="GGUF only: the matrices' type (norms stay f32; default f16)")


def export_gguf(args) -> int:
    from ..gguf_io import save_gguf
    from ..gguf_io.modelfile import write_modelfile
    from ..gguf_io.save import check_exportable
    from ..load import load_any
    model, tokenizer = load_any(args.model_dir)
    path = save_gguf(model, tokenizer, args.out_dir, dtype=getattr(args, "quant", "f16"))
    size = path.stat().st_size / 1e6
    arch = check_exportable(model.config).name
    print(f"wrote {path} (GGUF {arch}, {getattr(args, 'quant', 'f16')}, {size:.0f} MB"
          f"{', tokenizer' if tokenizer is not None else ', no tokenizer'})")
    if tokenizer is not None:  # Ollama: `ollama create NAME -f out.Modelfile`
        modelfile = write_modelfile(path, tokenizer, model_dir=args.model_dir)
        print(f"wrote {modelfile} (for Ollama: ollama create NAME -f {modelfile})")
    return 0
