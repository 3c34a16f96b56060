"""`scratchlm convert` (Hugging Face -> scratchlm) and `scratchlm export` (scratchlm -> Hugging Face).

Both write their output directory atomically and only over a model folder of ours (or an
empty one): a folder of other files, a regular file, or the input itself is refused in one
line, before anything is read or written.
"""

from __future__ import annotations

from .gguf import add_export_options, export_gguf


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("convert", help="Hugging Face directory or hub id -> scratchlm model directory",
                              description="Read GPT-2 or Llama weights (and tokenizer) from a Hugging Face "
                                          "directory or hub id and write a scratchlm model directory.")
    p.add_argument("source", help="Hugging Face model directory, hub id (owner/name), .gguf file or named model")
    p.add_argument("out_dir", help="scratchlm model directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="store the weights in this dtype")
    p.set_defaults(func=convert_command)

    p = subparsers.add_parser("export", help="scratchlm model directory -> Hugging Face directory",
                              description="Write a model directory in a format other tools load.")
    p.add_argument("model_dir", help="scratchlm model directory")
    p.add_argument("out_dir", help="directory to write")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: a directory transformers loads; gguf: one file llama.cpp and Ollama load")
    add_export_options(p)
    p.set_defaults(func=export_command)


def convert_command(args) -> int:
    import torch

    from ..atomic import MODEL_FILES, check_output
    from ..checkpoint import save_model
    from ..load import load_any

    check_output(args.out_dir, MODEL_FILES, inputs=[args.source])  # refuse before a long load
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_any(args.source, dtype=dtype)
    save_model(args.out_dir, model, tokenizer, inputs=[args.source])
    n = model.num_parameters()
    print(f"wrote {args.out_dir} ({n:,} parameters, {model.config.dtype}"
          f"{', tokenizer' if tokenizer is not None else ', no tokenizer'})")
    return 0


def export_command(args) -> int:
    if args.format == "gguf":
        return export_gguf(args)
    from ..atomic import MODEL_FILES, check_output
    from ..hf import hf_config_dict, save_hf
    from ..load import load_any

    check_output(args.out_dir, MODEL_FILES, inputs=[args.model_dir])
    model, tokenizer = load_any(args.model_dir)
    save_hf(args.out_dir, model, tokenizer, inputs=[args.model_dir])
    print(f"wrote {args.out_dir} (Hugging Face {hf_config_dict(model.config)['model_type']}"
          f"{', tokenizer' if tokenizer is not None else ''})")
    return 0
