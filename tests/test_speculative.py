"""Speculative decoding keeps the target's output: greedy token for token, sampling in
distribution (a chi-square test on a tiny vocabulary)."""

import math
from collections import Counter

import pytest
import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.errors import ScratchLMError
from scratchlm.generate import generate
from scratchlm.speculative import speculative_generate


def _model(seed, vocab=512, layers=2):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("llama-tiny", vocab_size=vocab, n_layers=layers)).eval()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_the_target_alone_whatever_the_draft(k):
    target = _model(0)
    for draft in (_model(1, layers=1), target):  # a poor draft (rejections) and a perfect one
        for prompt in ([5, 17, 42], [7]):
            expected = generate(target, None, [prompt], max_new_tokens=20)[0].token_ids
            out = speculative_generate(target, draft, prompt, max_new_tokens=20, k=k)
            assert out.token_ids == expected
    perfect = speculative_generate(target, target, [5, 17, 42], max_new_tokens=20, k=k)
    assert perfect.acceptance_rate == 1.0  # the draft is the target: every proposal stands
    assert perfect.rounds == math.ceil(20 / (k + 1))


def test_fused_models_take_a_rounds_tokens_in_one_call(run_blocks_calls):
    """Target and draft fused (prepare_for_decode): the verify pass (k + 1 or k + 2 tokens) and a
    draft catching up on two tokens after a fully kept round each go through run_blocks in one
    call of several tokens; the output is still the target's alone."""
    import copy

    from scratchlm.decode_weights import prepare_for_decode

    plain = _model(0)
    target = prepare_for_decode(copy.deepcopy(plain), "fp32")
    draft = prepare_for_decode(copy.deepcopy(plain), "int8")
    prompt = [5, 17, 42, 8, 3, 99, 1, 7, 9, 11]  # a prefill of 9: model.py's pass, not run_blocks
    expected = generate(plain, None, [prompt], max_new_tokens=20)[0].token_ids
    tokens = run_blocks_calls
    tokens.clear()
    out = speculative_generate(target, draft, prompt, max_new_tokens=20, k=3)
    assert out.token_ids == expected and out.accepted > 0
    assert {4, 5} & set(tokens) and 2 in tokens  # verify passes; a draft's two-token catch-up


def test_sampling_is_distributed_as_the_target():
    """Vocabulary of 4: the distribution of the first two sampled tokens (16 outcomes) from
    speculative decoding with a very different draft matches the target's exact one."""
    vocab = 4
    target, draft = _model(0, vocab=vocab), _model(3, vocab=vocab, layers=1)
    with torch.no_grad():  # make the draft disagree strongly with the target
        draft.lm_head.weight.mul_(40.0)
    prompt = [1, 2]
    with torch.no_grad():  # exact target probabilities of the pairs (a, b)
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        exact = {}
        for a in range(vocab):
            p2 = target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1)
            for b in range(vocab):
                exact[(a, b)] = float(p1[a] * p2[b])
    g = torch.Generator().manual_seed(0)
    n = 3000
    counts = Counter(tuple(speculative_generate(target, draft, prompt, max_new_tokens=2, k=2, temperature=1.0,
                                                generator=g).token_ids) for _ in range(n))
    chi2 = sum((counts[c] - n * p) ** 2 / (n * p) for c, p in exact.items())
    # 15 degrees of freedom: the 0.999 quantile is 37.7.
    assert chi2 < 37.7, (chi2, counts, exact)


def test_sampling_with_a_bad_draft_would_fail_the_check():
    """The same statistic separates the draft's own distribution from the target's, so the
    test above has teeth."""
    vocab = 4
    target, draft = _model(0, vocab=vocab), _model(3, vocab=vocab, layers=1)
    with torch.no_grad():
        draft.lm_head.weight.mul_(40.0)
        pt = target(torch.tensor([[1, 2]]))[0, -1].softmax(-1)
        pd = draft(torch.tensor([[1, 2]]))[0, -1].softmax(-1)
    n = 3000
    chi2 = float(((n * pd - n * pt) ** 2 / (n * pt)).sum())
    assert chi2 > 37.7


def test_bad_arguments_are_clear_errors():
    target = _model(0)
    with pytest.raises(ScratchLMError, match="vocabulary"):
        speculative_generate(target, _model(1, vocab=256), [1], max_new_tokens=4)
    with pytest.raises(ScratchLMError, match="k "):
        speculative_generate(target, target, [1], max_new_tokens=4, k=0)
    with pytest.raises(ScratchLMError, match="context length"):
        speculative_generate(target, target, [1] * 100, max_new_tokens=40)


def test_module_examples_run():
    import doctest

    import scratchlm.speculative

    result = doctest.testmod(scratchlm.speculative)
    assert result.failed == 0 and result.attempted > 0
