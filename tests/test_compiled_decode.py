"""The compiled decode step (compiled_decode.py): one graph for a whole decode, no recompile
per step, the same greedy tokens as the uncompiled loop; and `generate --weights int4 / --compile`
through the CLI. A counting backend (the traced graph run eagerly) keeps these fast: inductor
would take minutes here."""

import pytest
import torch
import torch._dynamo

from scratchlm import ModelConfig, Transformer
from scratchlm.compiled_decode import compile_decode_step, decode_step
from scratchlm.errors import ScratchLMError
from scratchlm.generate import generate

GRAPHS: list = []  # one entry per graph the compiler hands to the backend


@torch._dynamo.register_backend(name="scratchlm_count_graphs")
def _count_graphs(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward  # run the traced graph as it is


def tiny(preset, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset(preset)).eval()
    with torch.no_grad():  # sharper random weights: greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture
def graphs():
    torch._dynamo.reset()
    GRAPHS.clear()
    yield GRAPHS
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "gemma3-tiny"])  # + a sliding window of 16
def test_one_compilation_for_twenty_steps_and_the_same_greedy_tokens(graphs, preset):
    model = tiny(preset)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # left-padded: the key mask is in play
    expected = generate(model, None, prompts, max_new_tokens=21, ignore_eos=True)
    compiled = generate(model, None, prompts, max_new_tokens=21, ignore_eos=True, compile="scratchlm_count_graphs")
    assert [c.token_ids for c in compiled] == [c.token_ids for c in expected]
    assert len(expected[0].token_ids) == 21  # the prefill + 20 compiled steps
    assert len(graphs) == 1  # traced once at the first step, reused by the other 19, no graph break
    # Another decode with the same batch size and lengths reuses the graph too.
    again = generate(model, None, [[1, 2, 3, 4, 5], [6, 7, 8]], max_new_tokens=21, compile="scratchlm_count_graphs")
    assert len(again[0].token_ids) == 21 and len(graphs) == 1


def test_a_compiled_step_recompiles_when_the_column_is_a_python_int(graphs):
    """The counter can fail: a step that takes the position as a Python int (what
    Transformer.forward's cache.length is) is a new graph for the next steps."""
    model = tiny("gpt-tiny")

    @torch.compile(backend="scratchlm_count_graphs", dynamic=False)
    def step(ids, column: int, positions, key_mask, k, v):
        return decode_step(model, ids, torch.tensor([column]), positions, key_mask, k, v)

    cache = model.new_cache(1, 8)
    positions, key_mask = torch.arange(8)[None], torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        for column in range(3):
            step(torch.tensor([[column + 1]]), column, positions, key_mask, cache.k, cache.v)
    assert len(graphs) == 3


def test_compiled_step_logits_match_the_cached_forward():
    model = tiny("llama-tiny")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    cache = model.new_cache(1, 16)
    positions, key_mask = torch.arange(16)[None], torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        for column in range(4, 8):
            # A second cache with the same past keys gives the usual cached step's logits.
            reference = model.new_cache(1, 16)
            for layer in range(len(cache.k)):
                reference.k[layer].copy_(cache.k[layer])
                reference.v[layer].copy_(cache.v[layer])
            reference.length = column
            expected = model(ids[:, column:column + 1], cache=reference)[:, -1]
            logits = decode_step(model, ids[:, column:column + 1], torch.tensor([column]), positions, key_mask,
                                 cache.k, cache.v)
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_compiled_decode_with_quantized_weights(graphs):
    from scratchlm.decode_weights import prepare_for_decode

    model = prepare_for_decode(tiny("llama-tiny"), "int4")
    expected = generate(model, None, [[1, 2, 3]], max_new_tokens=8, ignore_eos=True)
    compiled = generate(model, None, [[1, 2, 3]], max_new_tokens=8, ignore_eos=True, compile="scratchlm_count_graphs")
    assert compiled[0].token_ids == expected[0].token_ids and len(graphs) == 1


def test_compile_option_errors():
    model = tiny("gpt-tiny")
    with pytest.raises(ScratchLMError, match="needs the KV cache"):
        generate(model, None, [[1, 2]], max_new_tokens=2, use_cache=False, compile=True)
    with pytest.raises(ScratchLMError, match="compile must be"):
        generate(model, None, [[1, 2]], max_new_tokens=2, compile=3)
    with pytest.raises(ScratchLMError, match="backend name"):
        compile_decode_step(model, backend="")


@pytest.fixture
def model_dir(tmp_path):
    from scratchlm.checkpoint import save_model
    from scratchlm.tokenizer import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ", special_tokens={"<|endoftext|>": None})
    torch.manual_seed(0)
    save_model(tmp_path, Transformer(ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size)), tok)
    return tmp_path


def test_cli_int4_weights_and_compile(model_dir, capsys, monkeypatch, graphs):
    import scratchlm.decode_weights as decode_weights
    from scratchlm.cli import main
    from scratchlm.load import load_any

    layouts = []
    prepare = decode_weights.prepare_for_decode
    monkeypatch.setattr(decode_weights, "prepare_for_decode", lambda m, w, *a: layouts.append(w) or prepare(m, w, *a))
    model, tok = load_any(str(model_dir))
    expected = generate(prepare(model, "int4"), tok, "hello", max_new_tokens=6)[0].text

    assert main(["generate", str(model_dir), "hello", "--max-new-tokens", "6", "--weights", "int4"]) == 0
    assert capsys.readouterr().out == expected + "\n" and layouts == ["int4"]
    assert type(model.blocks[0].mlp.up_proj).__name__ == "Int4Linear"
    # a vocabulary of 28 is not whole tiles of 16 rows: the head keeps int8
    assert type(model.lm_head).__name__ == ("Int4Linear" if tok.vocab_size % 16 == 0 else "Int8Linear")
    assert main(["generate", str(model_dir), "hello", "--max-new-tokens", "6", "--weights", "int4",
                 "--compile", "--compile-backend", "scratchlm_count_graphs"]) == 0
    assert capsys.readouterr().out == expected + "\n" and len(graphs) == 1
    assert main(["generate", str(model_dir), "hello", "--compile", "--no-cache"]) == 2
    assert "needs the KV cache" in capsys.readouterr().err
