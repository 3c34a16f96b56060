"""generate() and stream(): greedy equals Hugging Face, batching, streaming, stops, sampling filters."""

import pytest
import torch
import torch.nn.functional as F

from scratchlm import ModelConfig, Transformer
from scratchlm.errors import ScratchLMError
from scratchlm.generate import Completion, generate, stream
from scratchlm.sampling import (
    NEG_INF,
    SamplingOptions,
    apply_repetition_penalty,
    draw,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

transformers = pytest.importorskip("transformers")


# ---- tiny models --------------------------------------------------------------------------
def hf_gpt2(vocab=96, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(vocab=96, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    """(hf_model, our_model) with the same random weights."""
    from scratchlm.hf import from_hf_model

    hf = hf_gpt2() if request.param == "gpt2" else hf_llama()
    # Sharpen the random weights so greedy choices are not near-ties.
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return hf, from_hf_model(hf).eval()


class ByteTok:
    """A byte-level stand-in tokenizer: id = byte value + 2 (0 = pad/bos, 1 = eot)."""

    vocab_size, eot_id, bos_id, special_tokens, chat_template = 258, 1, 0, {}, None

    def encode(self, text):
        return [b + 2 for b in text.encode("utf-8")]

    def decode_bytes(self, ids):
        return bytes(i - 2 for i in ids if i >= 2)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def byte_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("gpt-tiny").replace(vocab_size=258)).eval()


# ---- greedy equals Hugging Face ---------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_hf_generate(pair, use_cache):
    hf, ours = pair
    prompt = [5, 17, 42, 8, 3]
    expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=20, eos_token_id=None)[0, len(prompt):].tolist()
    [c] = generate(ours, None, [prompt], max_new_tokens=20, use_cache=use_cache)
    assert c.token_ids == expected
    assert c.finish_reason == "length" and c.prompt_tokens == 5 and c.completion_tokens == 20


def test_batch_of_different_lengths_equals_each_alone(pair):
    _, ours = pair
    prompts = [[5, 17, 42, 8, 3, 9, 11], [7], [30, 31, 32]]
    alone = [generate(ours, None, [p], max_new_tokens=12)[0].token_ids for p in prompts]
    batched = [c.token_ids for c in generate(ours, None, prompts, max_new_tokens=12)]
    assert batched == alone
    no_cache = [c.token_ids for c in generate(ours, None, prompts, max_new_tokens=12, use_cache=False)]
    assert no_cache == alone


@pytest.mark.parametrize("preset", ["gpt-tiny", "gemma3-tiny"])
def test_repeated_prompts_prefill_once_and_sample_as_each_apart(preset, monkeypatch):
    """A batch that repeats prompts (n samples of a prompt, a GRPO group) prefills each distinct
    prompt once: the same samples, seed for seed, as the prefill of every row."""
    import scratchlm.generate as gen

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=60, context_length=64)).eval()
    prompts = [list(range(1, 21))] * 3 + [[7, 8]] * 3 + [[9, 9, 9]]  # longer than gemma3-tiny's window of 16
    shared = generate(model, None, prompts, max_new_tokens=12, temperature=1.0, seed=3)

    def every_row(self):
        return self._pick(self._forward(0, self.length))

    monkeypatch.setattr(gen._Decoder, "first", torch.inference_mode()(every_row))
    apart = generate(model, None, prompts, max_new_tokens=12, temperature=1.0, seed=3)
    assert [c.token_ids for c in shared] == [c.token_ids for c in apart]
    assert shared[0].token_ids != shared[1].token_ids  # the repeats do sample apart


def test_batched_greedy_matches_hf_left_padded(pair):
    hf, ours = pair
    prompts = [[5, 17, 42, 8, 3], [7, 9]]
    ids = torch.tensor([[5, 17, 42, 8, 3], [0, 0, 0, 7, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                           eos_token_id=None)[:, 5:].tolist()
    assert [c.token_ids for c in generate(ours, None, prompts, max_new_tokens=10)] == expected


# ---- stops ---------------------------------------------------------------------------------
def test_stop_token_id_ends_the_row(pair):
    _, ours = pair
    full = generate(ours, None, [[5, 17, 42]], max_new_tokens=15)[0].token_ids
    stop_id = full[6]
    first = full.index(stop_id)
    [c] = generate(ours, None, [[5, 17, 42]], max_new_tokens=15, stop_token_ids=[stop_id])
    assert c.token_ids == full[:first] and c.finish_reason == "stop" and c.completion_tokens == first + 1


def test_stop_strings_cut_where_they_should():
    model, tok = byte_model(), ByteTok()
    full = generate(model, tok, "Hello", max_new_tokens=30, ignore_eos=True)[0]
    assert len(full.text) >= 10
    needle = full.text[5:8]
    cut = full.text.index(needle)
    c = generate(model, tok, "Hello", max_new_tokens=30, ignore_eos=True, stop=["\x00never", needle])[0]
    assert c.text == full.text[:cut]
    assert c.finish_reason == "stop"
    assert full.text.startswith(c.text)
    # The ids run up to the token that completed the stop string.
    assert tok.decode(c.token_ids).startswith(c.text + needle[:1]) or needle in tok.decode(c.token_ids)


def test_eot_ends_generation_and_is_not_in_output():
    model, tok = byte_model(), ByteTok()
    full = generate(model, tok, "abc", max_new_tokens=8, ignore_eos=True)[0]
    tok.eot_id = full.token_ids[3]  # pretend this generated token is the end of text
    first = full.token_ids.index(tok.eot_id)
    c = generate(model, tok, "abc", max_new_tokens=8)[0]
    assert c.token_ids == full.token_ids[:first] and c.finish_reason == "stop"
    assert c.text == tok.decode(full.token_ids[:first])
    assert c.completion_tokens == first + 1


# ---- streaming -----------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [None, ["e "], ["zz"]])
def test_stream_joined_equals_generate(stop):
    model, tok = byte_model(1), ByteTok()
    options = dict(max_new_tokens=25, temperature=0.9, seed=3, stop=stop, ignore_eos=True)
    c = generate(model, tok, "The cat", **options)[0]
    deltas = list(stream(model, tok, "The cat", **options))
    assert "".join(d.text for d in deltas) == c.text
    assert [d.token_id for d in deltas if d.token_id is not None] == c.token_ids
    assert [d.finish_reason for d in deltas][-1] == c.finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_stream_is_utf8_safe():
    """A character split over several tokens is handed out whole, once complete."""
    from scratchlm.generate import TextAssembler

    tok = ByteTok()
    text = "é€😀"
    asm = TextAssembler(tok, [])
    pieces = [asm.add(t)[0] for t in tok.encode(text)] + [asm.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:2] == ["", "é"]  # a 2-byte char: nothing after its first byte
    assert pieces[2:5] == ["", "", "€"] and pieces[5:9] == ["", "", "", "😀"]


def test_held_back_stop_prefix_is_released():
    from scratchlm.generate import TextAssembler

    tok = ByteTok()
    asm = TextAssembler(tok, ["END"])
    out = [asm.add(t)[0] for t in tok.encode("xEN")]
    assert "".join(out) == "x"  # "EN" might become "END": held back
    piece, hit = asm.add(tok.encode("d")[0])
    assert not hit and piece == "ENd"
    assert [asm.add(t)[1] for t in tok.encode("aEND")] == [False, False, False, True]
    assert asm.text == "xENda"


def test_text_assembler_equals_the_rule_written_out_on_random_streams():
    # Against the rule in its plainest form, on random byte streams over a small alphabet
    # (so stop strings and their starts occur often): the text handed out is the whole text
    # cut at the first stop string, the stop is reported at the token that completes it, and
    # nothing handed out before then could still be part of a stop string.
    from scratchlm.generate import TextAssembler

    tok = ByteTok()
    g = torch.Generator().manual_seed(0)
    alphabet = "ab\nc"
    for stops in (["ab"], ["bca", "\n\n"], ["aab", "b", "cc\na"], ["abca", "c"]):  # "c" ends first inside "abca"
        for _ in range(200):
            text = "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (12,), generator=g).tolist())
            ends = [i + len(st) for i in range(len(text)) for st in stops if text.startswith(st, i)]
            cut = min(ends, default=None)  # the token (character) that completes the first stop
            done = text[:cut] if cut else text  # the text when the first stop completes
            expected = done[:min(done.find(st) for st in stops if st in done)] if cut else text
            asm, out, hit_at = TextAssembler(tok, stops), [], None
            for k, t in enumerate(tok.encode(text)):
                piece, hit = asm.add(t)
                out.append(piece)
                assert not any(st in "".join(out) for st in stops)
                if hit:
                    hit_at = k + 1
                    break
            if hit_at is None:
                out.append(asm.flush())
            assert hit_at == cut and "".join(out) == expected, (stops, text)


# ---- sampling: seeds and filters ---------------------------------------------------------
def test_same_seed_same_sample_different_seed_differs():
    model = byte_model()
    a = generate(model, None, [[5, 6, 7]], max_new_tokens=30, temperature=1.0, seed=123)[0].token_ids
    b = generate(model, None, [[5, 6, 7]], max_new_tokens=30, temperature=1.0, seed=123)[0].token_ids
    c = generate(model, None, [[5, 6, 7]], max_new_tokens=30, temperature=1.0, seed=124)[0].token_ids
    assert a == b and a != c


PROBS = torch.tensor([0.05, 0.30, 0.10, 0.40, 0.15])  # a known distribution; sorted: 3, 1, 4, 2, 0


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


@pytest.mark.parametrize("k, expected", [(1, {3}), (2, {3, 1}), (3, {3, 1, 4}), (5, {0, 1, 2, 3, 4}), (9, {0, 1, 2, 3, 4})])
def test_top_k_keeps_the_k_most_likely(k, expected):
    assert kept(top_k_filter(PROBS.log(), k)) == expected


@pytest.mark.parametrize("p, expected", [(0.3, {3}), (0.4, {3}), (0.41, {3, 1}), (0.69, {3, 1}),
                                         (0.71, {3, 1, 4}), (0.9, {3, 1, 4, 2}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(PROBS.log(), p)) == expected


@pytest.mark.parametrize("m, expected", [(0.0, {0, 1, 2, 3, 4}), (0.2, {1, 2, 3, 4}), (0.3, {1, 3, 4}),
                                         (0.5, {1, 3}), (0.9, {3}), (1.0, {3})])
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(m, expected):
    assert kept(min_p_filter(PROBS.log(), m)) == expected


def test_filters_match_a_torch_reference_on_random_rows():
    torch.manual_seed(0)
    logits = torch.randn(8, 1000) * 3
    probs = logits.softmax(-1)
    # top-k: the k largest by a full sort
    ref_topk = logits >= logits.sort(-1, descending=True).values[:, 19:20]
    assert torch.equal(torch.isfinite(top_k_filter(logits, 20)), ref_topk)
    # top-p: walk each row's sorted probabilities in Python
    got = torch.isfinite(top_p_filter(logits, 0.8))
    for row in range(8):
        order = probs[row].argsort(descending=True).tolist()
        total, keep = 0.0, set()
        for i in order:
            keep.add(i)
            total += probs[row, i].item()
            if total >= 0.8:
                break
        assert set(torch.nonzero(got[row]).flatten().tolist()) == keep
    # min-p
    ref_minp = probs >= 0.05 * probs.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(min_p_filter(logits, 0.05)), ref_minp)


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked rows: the 256 most likely suffice; flat: the whole sort
def test_top_p_on_a_large_vocabulary_equals_sorting_it_all(scale):
    """top_p_filter sorts only the 256 most likely tokens where they hold p: the same set as
    sorting the whole row (a mutation keeping one more token, or one fewer, fails)."""
    torch.manual_seed(1)
    logits = torch.randn(3, 5000) * scale
    logits[1, :4000] = NEG_INF  # a row whose tail an earlier filter removed
    probs = logits.softmax(-1)
    for p in (0.5, 0.9, 0.99):
        ordered, order = probs.sort(-1, descending=True)
        keep_sorted = (ordered.cumsum(-1) - ordered) < p
        expected = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        got = torch.isfinite(top_p_filter(logits, p))
        assert torch.equal(got, expected), (scale, p)
        assert 1 <= int(got[0].sum()) < 5000


def test_filtered_logits_renormalize_to_the_kept_mass():
    got = F.softmax(top_p_filter(PROBS.log(), 0.71), -1)
    assert torch.allclose(got, torch.tensor([0, 0.30, 0, 0.40, 0.15]) / 0.85)


def test_samples_stay_inside_the_filtered_set():
    logits = PROBS.log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    for options, allowed in [(SamplingOptions(1.0, top_k=2), {1, 3}), (SamplingOptions(1.0, top_p=0.71), {1, 3, 4}),
                             (SamplingOptions(1.0, min_p=0.5), {1, 3}),
                             (SamplingOptions(1.0, top_k=3, top_p=0.5), {1, 3})]:
        drawn = sample_next(logits, options, g)
        assert set(drawn.tolist()) == allowed
    # With no filter, the frequencies follow the distribution.
    freq = torch.bincount(sample_next(logits, SamplingOptions(1.0), g), minlength=5).float() / 2000
    assert torch.allclose(freq, PROBS, atol=0.04)


def test_draw_follows_the_distribution_and_never_a_zero():
    """sampling.draw (the inverse of the running sum at one uniform a row) against the
    distribution it is given: a chi-square test on 40,000 draws (critical value 20.5 for 5
    degrees of freedom at p = 0.001), unnormalized rows, zero-probability tokens anywhere
    (first, between, last) never drawn, and a uniform that rounds up to the total."""
    probs = torch.tensor([0.0, 0.05, 0.30, 0.0, 0.10, 0.40, 0.15, 0.0]) * 3.0  # sum 3, not 1
    g = torch.Generator().manual_seed(5)
    drawn = draw(probs.repeat(40_000, 1), g)
    counts = torch.bincount(drawn, minlength=8).double()
    assert counts[[0, 3, 7]].sum() == 0
    expected = probs.double() / probs.sum() * 40_000
    kept = expected > 0
    chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    assert chi2 < 20.5, chi2
    # the same seed, the same draws; one row at a time, the same as a batch of rows
    assert torch.equal(draw(probs.repeat(5, 1), torch.Generator().manual_seed(1)),
                       draw(probs.repeat(5, 1), torch.Generator().manual_seed(1)))
    # a uniform of 1.0 (u * total rounded up to the total): the last token with mass, not past it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "rand", lambda *a, **k: torch.ones(a[0], a[1], dtype=torch.float64))
        assert draw(probs[None]).tolist() == [6]
        assert draw(torch.tensor([[0.0, 0.0, 2.0, 0.0]])).tolist() == [2]
    for bad in (torch.tensor([[0.0, 0.0]]), torch.tensor([[float("nan"), 1.0]]), torch.tensor([[float("inf"), 1.0]])):
        with pytest.raises(ScratchLMError, match="cannot sample"):
            draw(bad)


def test_temperature_reshapes_the_distribution():
    logits = PROBS.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(1)
    cold = torch.bincount(sample_next(logits, SamplingOptions(0.25), g), minlength=5).float() / 4000
    expected = F.softmax(PROBS.log() / 0.25, -1)
    assert torch.allclose(cold, expected, atol=0.03)


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    ids = torch.tensor([[3, 7, 7, 9], [1, 2, 3, 4]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_greedy_with_repetition_penalty_matches_hf(pair):
    hf, ours = pair
    prompt = [5, 17, 42, 8, 3]
    expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                           do_sample=False, max_new_tokens=15, eos_token_id=None,
                           repetition_penalty=1.5)[0, 5:].tolist()
    assert generate(ours, None, [prompt], max_new_tokens=15, repetition_penalty=1.5)[0].token_ids == expected


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.2), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(overflow="wrap"), "overflow")])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        generate(byte_model(), ByteTok(), "hi", **options)


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        generate(byte_model(), ByteTok(), "")
    with pytest.raises(ValueError, match="empty"):
        generate(byte_model(), None, [[]])
    with pytest.raises(ValueError, match="empty"):
        stream(byte_model(), ByteTok(), "")  # raised at the call, before iterating


def test_text_prompt_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="tokenizer"):
        generate(byte_model(), None, "hello")


def test_out_of_vocabulary_prompt_ids_are_a_clear_error():
    """forward does not check ids (no host sync): generate and stream check them on entry."""
    from scratchlm.errors import ScratchLMError

    model = byte_model()  # vocab 258
    for prompts in ([1, 258], [[1, 2], [3, 999]], torch.tensor([[4, -3]])):
        with pytest.raises(ScratchLMError, match=r"prompt \d: token id (258|999|-3) is outside the vocabulary"):
            generate(model, None, prompts, max_new_tokens=2)
    with pytest.raises(ScratchLMError, match="token id 300"):
        stream(model, None, [5, 300])  # at the call, before iterating

    class WideTok(ByteTok):  # a tokenizer with more ids than the model has
        def encode(self, text):
            return [b + 200 for b in text.encode("utf-8")]

    with pytest.raises(ScratchLMError, match="prompt 0: token id 304 is outside"):
        generate(model, WideTok(), "hi")


# ---- the shared pieces: left padding and the stop rule ---------------------------------------
def test_left_pad_lines_prompts_up_on_the_right():
    from scratchlm.generate import left_pad

    b = left_pad([[7, 8, 9], [4], [5, 6]], width=6)
    assert b.prompt_length == 3 and b.padded
    assert b.ids.tolist() == [[7, 8, 9, 0, 0, 0], [0, 0, 4, 0, 0, 0], [0, 5, 6, 0, 0, 0]]
    assert b.key_mask.tolist() == [[True] * 6, [False, False] + [True] * 4, [False] + [True] * 5]
    assert b.positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4]]
    even = left_pad([[1, 2], [3, 4]])
    assert not even.padded and even.ids.shape == (2, 2) and even.key_mask.all()
    # Padded rows through the model give each row's own logits (the mask and positions work).
    model = byte_model()
    with torch.no_grad():
        cache = model.new_cache(3, 3)
        cache.key_mask = b.key_mask[:, :3]
        logits = model(b.ids[:, :3], cache=cache, positions=b.positions[:, :3])[:, -1]
        for i, row in enumerate([[7, 8, 9], [4], [5, 6]]):
            torch.testing.assert_close(logits[i], model(torch.tensor([row]))[0, -1], atol=1e-5, rtol=0)


def test_stop_rule_order_and_reasons():
    """A stop id first (not part of the text), then a stop string (cut), then max tokens."""
    from scratchlm.generate import StopRule

    tok = ByteTok()  # eot_id 1
    ids = tok.encode("abcdef")

    def run(rule, tokens):
        out = []
        for t in tokens:
            text, reason = rule.add(t)
            out.append(text)
            if reason:
                return "".join(out), reason, rule.produced
        return "".join(out), None, rule.produced

    assert run(StopRule(tok, 4), ids) == ("abcd", "length", 4)
    assert run(StopRule(tok, 10, stop=["cd"]), ids) == ("ab", "stop", 4)
    assert run(StopRule(tok, 10, stop_token_ids=[ids[2]]), ids) == ("ab", "stop", 3)
    assert run(StopRule(tok, 10, stop=["bc"]), [ids[0], 1, ids[1]]) == ("a", "stop", 2)  # EOT
    assert run(StopRule(tok, 10, stop=["bc"], ignore_eos=True), [ids[0], 1, ids[1], ids[2]]) == ("a", "stop", 4)
    # A held-back stop prefix is released when a stop id ends the row, and at max tokens.
    assert run(StopRule(tok, 10, stop=["cx"], stop_token_ids=[ids[3]]), ids) == ("abc", "stop", 4)
    assert run(StopRule(tok, 3, stop=["cx"]), ids) == ("abc", "length", 3)
    assert StopRule(tok, 3, stop_token_ids=[9]).stop_ids == {1, 9}


def test_prompt_longer_than_context_errors_or_truncates():
    model = byte_model()  # context 128
    long = list(range(2, 122))
    with pytest.raises(ValueError, match="context length 128"):
        generate(model, None, [long], max_new_tokens=20)
    with pytest.warns(UserWarning, match="cut from the left"):
        [c] = generate(model, None, [long], max_new_tokens=20, overflow="truncate")
    assert c.prompt_tokens == 108 and c.completion_tokens == 20
    assert c.token_ids == generate(model, None, [long[-108:]], max_new_tokens=20)[0].token_ids


def test_zero_new_tokens_and_return_types():
    out = generate(byte_model(), ByteTok(), ["a", "bc"], max_new_tokens=0)
    assert out == [Completion("", [], "length", 1, 0), Completion("", [], "length", 2, 0)]
    assert isinstance(generate(byte_model(), ByteTok(), "a", max_new_tokens=1), list)


# ---- decode weight layouts ---------------------------------------------------------------
@pytest.mark.parametrize("weights, tolerance", [("fp32", 1e-5), ("bf16", 0.03), ("int8", 0.05), ("int4", 0.2),
                                                ("int8-dynamic", 0.1)])
def test_decode_weight_layouts_keep_the_logits(pair, weights, tolerance):
    import copy

    from scratchlm.decode_weights import prepare_for_decode

    _, ours = pair
    ids = torch.tensor([[5, 17, 42, 8, 3, 9]])
    with torch.no_grad():
        ref = ours(ids)
        fast = prepare_for_decode(copy.deepcopy(ours), weights)
        out = fast(ids).float()
    assert (out - ref).norm() / ref.norm() < tolerance
    if weights == "fp32":  # the same numbers in another layout: the same greedy tokens
        assert generate(fast, None, [[5, 17, 42]], max_new_tokens=15)[0].token_ids == \
            generate(ours, None, [[5, 17, 42]], max_new_tokens=15)[0].token_ids
    else:  # runs, batched and cached, and mostly agrees
        got = generate(fast, None, [[5, 17, 42], [7]], max_new_tokens=8)
        assert [len(c.token_ids) for c in got] == [8, 8]


def test_decode_weights_rejects_unknown_layout():
    from scratchlm.decode_weights import prepare_for_decode

    with pytest.raises(ValueError, match="weights must be one of"):
        prepare_for_decode(byte_model(), "int3")


def test_module_examples_run():
    """The docstring examples of the generation modules are correct."""
    import doctest

    import scratchlm.chat
    import scratchlm.decode_weights
    import scratchlm.generate
    import scratchlm.sampling

    for module in (scratchlm.generate, scratchlm.sampling, scratchlm.chat, scratchlm.decode_weights):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# ---- chat templates ------------------------------------------------------------------------
CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_JINJA = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]


def hf_chat_tokenizer(template, specials):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                                                bos_token=specials[0], eos_token=specials[1])


@pytest.mark.parametrize("name, source, specials", [("chatml", CHATML_JINJA, ("<|im_start|>", "<|im_end|>")),
                                                    ("llama3", LLAMA3_JINJA, ("<|begin_of_text|>", "<|eot_id|>"))])
def test_builtin_templates_match_transformers_rendering(name, source, specials):
    from scratchlm.chat import render_chat

    hf_tok = hf_chat_tokenizer(source, specials)
    for add in (True, False):
        expected = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
        assert render_chat(MESSAGES, name, None, add_generation_prompt=add) == expected

        class Tok:  # a tokenizer carrying the Jinja template, as loaded from tokenizer_config.json
            chat_template, bos_token, eos_token, special_tokens, eot_id = source, specials[0], specials[1], {}, None

        assert render_chat(MESSAGES, None, Tok(), add_generation_prompt=add) == expected


def test_template_choice_and_stops():
    from scratchlm.chat import chat_stops, render_chat, resolve_template

    class Llama3Tok:
        chat_template, eot_id = None, 128001
        special_tokens = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|eot_id|>": 128009}

    assert resolve_template(None, Llama3Tok()) == "llama3"
    assert chat_stops(None, Llama3Tok()) == ([], [128009, 128001])  # specials stop by id
    assert chat_stops("chatml", None) == (["<|im_end|>"], [])  # not a special token here: stop as text
    assert resolve_template(None, ByteTok()) == "plain"
    assert render_chat([{"role": "user", "content": "Hi"}], "plain", None) == "User: Hi\nAssistant:"
    with pytest.raises(ValueError, match="unknown chat template"):
        render_chat(MESSAGES, "vicuna", None)
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "x"}], "plain", None)
    with pytest.raises(ValueError, match="chat template: no system"):
        render_chat(MESSAGES, "{{ raise_exception('no system') }}", None)
