"""GGUF in and out for the newer families: llama.cpp's qwen2, qwen3 and gemma3 architectures.

Files are written here from random transformers models (Qwen2 with its q/k/v biases,
Qwen3 with QK-norm and a head_dim apart from d_model / n_heads, Gemma 3 text with a window
shorter than the test sequence and local and global layers) with the ``gguf`` package's
writer in llama.cpp's layout: its converter's metadata keys, the tensor names of the
package's own ``TensorNameMap`` (not our table), no Q/K permutation (these architectures
use llama.cpp's NEOX rotation) and Gemma's norms stored as 1 + weight. Our loader must give
the logits of transformers reading the same file (its own GGUF loader), and of the model the
file was made from. Our own export of each family (``scratchlm export --format gguf``) reads
back exactly, reads in transformers as the same model and tokenizer, and runs in llama.cpp
(llama-cpp-python) with our logits, tokens and greedy continuations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from scratchlm import ModelConfig, Transformer  # noqa: E402
from scratchlm.gguf_io import GGUFError, GGUFFile, load_gguf, save_gguf  # noqa: E402
from scratchlm.gguf_io.vocab import PRE_TOKENIZERS  # noqa: E402
from scratchlm.tokenizer import BPETokenizer  # noqa: E402
from test_gguf import (  # noqa: E402
    IDS,
    _rewrite,
    add_hf_hyperparameters,
    llama_cpp_greedy,
    llama_cpp_vocab,
    logits,
    transformers_from_gguf,
)

FAMILIES = ["qwen2", "qwen3", "gemma3"]
WINDOW = 4  # Gemma 3's sliding window in these tests: shorter than IDS (12 tokens)
# llama.cpp's gemma3 fixes the layer pattern (every sixth layer global): 7 layers give local
# layers on both sides of a global one.
GEMMA_LAYERS = ["global" if i % 6 == 5 else "local" for i in range(7)]
# transformers' GGUF loader reads neither qwen3.attention.key_length nor Gemma's score scale:
# it takes its config classes' defaults (Qwen3 head_dim 128, Gemma 3 query_pre_attn_scalar
# 256). The test models have those sizes, as the real ones do; both differ from d_model / n_heads.
QWEN3_HEAD, GEMMA_HEAD = 128, 256
TEXTS = ["Hello, world! It's 2024.", "x  \n 7 apples", "naïve café 日本語", " leading space", "the cat sat on the mat"]


# ---- transformers models and llama.cpp-layout files (independent of scratchlm's writer) -----------
def randomize(model: torch.nn.Module, plus_one: bool, seed: int = 0, std: float = 0.3,
              emb_std: float = 0.1) -> torch.nn.Module:
    """Every weight random, norms around their identity (1, or 0 for Gemma's 1 + weight),
    biases non-zero: nothing is left at an initial value a mapping mistake could hide behind.
    The blocks outweigh the embeddings, so greedy decoding does not just repeat a token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name:
                p.copy_(noise + (0.0 if plus_one else 1.0))
            elif "embed" in name or "tok_emb" in name:
                p.copy_(noise / std * emb_std)
            else:
                p.copy_(noise)
    return model.eval()


def hf_model(family: str, tied: bool = True, **overrides):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied,
                  rms_norm_eps=1e-6, rope_theta=1_000_000.0) | overrides
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_hidden_layers=2, **common))
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_hidden_layers=2, head_dim=QWEN3_HEAD, **common))
    else:
        config = transformers.Gemma3TextConfig(
            **(common | dict(num_attention_heads=2, num_key_value_heads=1)), num_hidden_layers=len(GEMMA_LAYERS),
            head_dim=GEMMA_HEAD, query_pre_attn_scalar=GEMMA_HEAD, sliding_window=WINDOW, rope_local_base_freq=10000.0,
            layer_types=["full_attention" if t == "global" else "sliding_attention" for t in GEMMA_LAYERS],
            final_logit_softcapping=None, attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh")
        model = transformers.Gemma3ForCausalLM(config)
    return randomize(model, plus_one=family == "gemma3")


def write_family_gguf(hf, family: str, path, qtype=gguf.GGMLQuantizationType.F32):
    """``hf`` as llama.cpp's convert_hf_to_gguf.py writes it for ``family``."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch=family)
    add_hf_hyperparameters(w, c)
    if family in ("qwen3", "gemma3"):  # the converter writes the head size when config.json has one
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if family == "gemma3":
        w.add_sliding_window(c.sliding_window)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32
                    else gguf.LlamaFileType.MOSTLY_F16)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], c.num_hidden_layers)
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        t = t.detach().float()
        if family == "gemma3" and key.endswith("norm.weight"):
            t = t + 1  # Gemma3Model.modify_tensors: llama.cpp multiplies by the stored weight
        t = np.ascontiguousarray(t.numpy())
        if t.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            t = t.astype(np.float16)
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_reads(family: str) -> bool:
    """Whether the installed transformers' GGUF loader knows the architecture."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return family in GGUF_CONFIG_MAPPING


# ---- reading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_files_match_transformers(tmp_path, family):
    hf = hf_model(family)
    path = write_family_gguf(hf, family, tmp_path / f"{family}.gguf")
    ours, tok = load_gguf(path)
    assert tok is None
    c = ours.config
    if family == "qwen2":
        assert c.qkv_bias and not c.bias
    if family == "qwen3":
        assert c.qk_norm == "head" and c.head_dim == QWEN3_HEAD != c.d_model // c.n_heads
    if family == "gemma3":
        assert c.layer_types == GEMMA_LAYERS and c.sliding_window == WINDOW < IDS.shape[1]
        assert c.norm_plus_one and c.scale_embeddings and c.mlp == "geglu" and c.query_pre_attn_scalar == GEMMA_HEAD
    # The model the file was made from, and (where it reads the architecture) transformers'
    # own GGUF loader on the same file.
    torch.testing.assert_close(logits(ours, IDS), logits(hf, IDS), atol=1e-4, rtol=0)
    if transformers_reads(family):
        torch.testing.assert_close(logits(ours, IDS), logits(transformers_from_gguf(path), IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_untied_file(tmp_path, family):
    hf = hf_model(family, tied=False)
    path = write_family_gguf(hf, family, tmp_path / "m.gguf", gguf.GGMLQuantizationType.F16)
    ours, _ = load_gguf(path, dtype=torch.float32)
    assert not ours.config.tie_embeddings
    with torch.no_grad():  # the same weights rounded to f16 (norms and biases stay f32)
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    torch.testing.assert_close(logits(ours, IDS), logits(hf, IDS), atol=1e-4, rtol=0)


# ---- writing: our models of each family -----------------------------------------------------------------
def scratch_model(family: str, vocab_size: int) -> Transformer:
    if family == "qwen2":  # Qwen2.5's shape, tiny
        config = ModelConfig.preset("llama-tiny", qkv_bias=True, norm_eps=1e-6, rope_theta=1e6, tie_embeddings=True)
    elif family == "qwen3":
        config = ModelConfig.preset("qwen3-tiny", head_dim=QWEN3_HEAD)
    else:
        config = ModelConfig.preset("gemma3-tiny", n_layers=len(GEMMA_LAYERS), layer_types=GEMMA_LAYERS,
                                    sliding_window=WINDOW, head_dim=GEMMA_HEAD, query_pre_attn_scalar=float(GEMMA_HEAD))
    torch.manual_seed(0)
    return randomize(Transformer(config.replace(vocab_size=vocab_size)), plus_one=family == "gemma3")


def tokenizer_for(family: str, tmp_path):
    """Qwen's byte-level BPE (its "qwen2" pre-split) or Gemma's SentencePiece, trained here."""
    from test_tokenizer import corpus

    if family != "gemma3":
        return BPETokenizer.train(corpus(), vocab_size=400, pattern=PRE_TOKENIZERS["qwen2"],
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    spm = pytest.importorskip("sentencepiece")
    from scratchlm.tokenizer import SentencePieceTokenizer

    (tmp_path / "corpus.txt").write_text("\n".join(t for t in corpus() if t))
    spm.SentencePieceTrainer.train(  # Gemma's settings: byte fallback, spaces kept, no dummy prefix
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spm"), vocab_size=500, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, character_coverage=0.9995, minloglevel=2)
    return SentencePieceTokenizer.load(tmp_path / "spm.model")


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(family, our model, tokenizer, the f32 GGUF that `scratchlm export --format gguf` wrote)."""
    from scratchlm.checkpoint import save_model
    from scratchlm.cli import main

    family, tmp = request.param, tmp_path_factory.mktemp(request.param)
    tok = tokenizer_for(family, tmp)
    model = scratch_model(family, vocab_size=tok.vocab_size)  # no rows beyond the tokenizer's
    save_model(tmp / "run", model, tok)
    out = tmp / f"{family}.gguf"
    assert main(["export", str(tmp / "run"), str(out), "--format", "gguf", "--quant", "f32"]) == 0
    return family, model, tok, out


def test_export_reads_back_exactly(exported):
    family, model, tok, path = exported
    with GGUFFile(path) as f:
        assert f.metadata["general.architecture"] == family
        if family == "gemma3":  # llama.cpp's converter convention: the norm multiplies by the stored value
            stored = f.read("blk.0.attn_q_norm.weight")
            assert torch.equal(stored, 1 + model.blocks[0].attn.q_norm.weight.detach())
            assert f.metadata["gemma3.attention.sliding_window"] == WINDOW
        if family == "qwen2":
            assert "blk.0.attn_q.bias" in f.tensors and "blk.0.attn_output.bias" not in f.tensors
    again, tok2 = load_gguf(path)
    assert again.config == model.config
    torch.testing.assert_close(logits(again, IDS), logits(model, IDS), atol=0, rtol=0)
    if transformers_reads(family):  # and a second reader agrees with our writer
        torch.testing.assert_close(logits(transformers_from_gguf(path), IDS), logits(model, IDS), atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text


# llama.cpp in a child process (a wheel built for another CPU dies of SIGILL; see test_gguf.py):
# the logits of every prompt position, with an f32 KV cache (type 0) so that only the
# arithmetic differs.
LLAMA_CPP_LOGITS = r"""
import json, sys, llama_cpp
path, ids = sys.argv[1], json.loads(sys.argv[2])
runner = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=2, logits_all=True, type_k=0, type_v=0, verbose=False)
runner.eval(ids)
print(json.dumps(runner.scores[:len(ids)].tolist()))
"""


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    import json
    import signal
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOGITS, str(path), json.dumps(ids)],
                         capture_output=True, text=True, timeout=300)
    if run.returncode == -signal.SIGILL:
        pytest.skip("llama-cpp-python was built for another CPU (illegal instruction)")
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))


def test_llama_cpp_runs_our_export(exported):
    from scratchlm.generate import generate

    family, model, tok, path = exported
    vocab = llama_cpp_vocab(path)
    prompts = [tok.encode(text) for text in ("the cat sat on the mat", "def f(x):\n    return 12 + x")]
    for text in TEXTS:  # Qwen: llama.cpp's "qwen2" pre-tokenizer splits text as our regex does
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    # Every position's logits: the prompt is longer than Gemma's window, so its local layers
    # drop keys (all layers global would be off by ~4, a local rope base of 1e6 by ~0.5).
    # ggml's GELU reads an f16 table: Gemma's GeGLU is off by ~1e-3 there, the others by ~1e-5.
    ids = prompts[1]
    torch.testing.assert_close(llama_cpp_logits(path, ids), logits(model, torch.tensor([ids]))[0],
                               atol=5e-3 if family == "gemma3" else 1e-4, rtol=0)
    theirs = llama_cpp_greedy(path, prompts, 10)
    for ids, got in zip(prompts, theirs):
        expected = generate(model, tok, [ids], max_new_tokens=10, ignore_eos=True)[0].token_ids
        if got != expected:  # allowed only at a near tie of our two best logits
            n = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
            row = logits(model, torch.tensor([ids + expected[:n]]))[0, -1]
            gap = float(row.max() - row[got[n]])
            assert gap < 1e-2, f"{family}: llama.cpp differs at new token {n}: {got} vs {expected} (gap {gap:.4f})"


# ---- refusals: one clear line, nothing written ---------------------------------------------------------
def test_export_refuses_what_llama_cpp_would_run_differently(tmp_path):
    out = tmp_path / "m.gguf"
    gemma = Transformer(ModelConfig.preset("gemma3-tiny"))  # local, local, global: not llama.cpp's pattern
    with pytest.raises(GGUFError, match="llama.cpp would run this model differently: layer_types") as e:
        save_gguf(gemma, None, out)
    assert "\n" not in str(e.value)
    scaled = Transformer(ModelConfig.preset("gemma3-tiny", n_layers=6, layer_types=GEMMA_LAYERS[:6],
                                            query_pre_attn_scalar=64.0))
    with pytest.raises(GGUFError, match="query_pre_attn_scalar=64.0"):
        save_gguf(scaled, None, out)
    with pytest.raises(GGUFError, match="no llama.cpp architecture has this model's shape.*norm_placement='post'"):
        save_gguf(Transformer(ModelConfig.preset("olmo2-tiny")), None, out)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_and_features(tmp_path):
    path = write_family_gguf(hf_model("qwen3"), "qwen3", tmp_path / "q.gguf")
    with pytest.raises(GGUFError) as e:
        load_gguf(_rewrite(path, tmp_path / "moe.gguf", set_key=("general.architecture", "qwen3moe")))
    assert str(e.value) == (f"{tmp_path / 'moe.gguf'}: architecture 'qwen3moe' is not supported "
                            "(scratchlm reads: llama, qwen2, qwen3, gemma3)")
    # Qwen3 with attention biases: llama.cpp's qwen3 has no place for them, nor has our table
    biased = write_family_gguf(hf_model("qwen3", attention_bias=True), "qwen3", tmp_path / "b.gguf")
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.attn_k.bias' \(and 7 more\) has no place in a scratchlm qwen3"):
        load_gguf(biased)
    gemma = write_family_gguf(hf_model("gemma3"), "gemma3", tmp_path / "g.gguf")
    with pytest.raises(GGUFError, match="no 'gemma3.attention.sliding_window'"):
        load_gguf(_rewrite(gemma, tmp_path / "nowindow.gguf", drop_key="gemma3.attention.sliding_window"))
    capped = _add_key(gemma, tmp_path / "capped.gguf", "gemma3.final_logit_softcapping", 30.0)
    with pytest.raises(GGUFError, match="final_logit_softcapping = 30.0: scratchlm does not read final logit soft-capping"):
        load_gguf(capped)
    with pytest.raises(GGUFError, match="'linear' rope scaling"):
        load_gguf(_add_key(_add_key(gemma, tmp_path / "a.gguf", "gemma3.rope.scaling.type", "linear"),
                           tmp_path / "b.gguf", "gemma3.rope.scaling.factor", 8.0))


def _add_key(path, out, key: str, value):
    """A copy of ``path`` with one more metadata key (a string or an f32)."""
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(out), arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
