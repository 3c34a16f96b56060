"""decode_weights.HeadScreen: greedy decoding reads an int8 copy of the output head and the exact
logits of the few rows its bound leaves, and must pick exactly the token the whole head picks.

The heads here are built to be hard: many rows a hair apart (near ties, well inside the int8
copy's rounding), and hidden states chosen against the copy's error; the adversarial-
bound test also shows that a bound a little smaller fails it."""

import copy

import pytest
import torch

from scratchlm import ModelConfig, Transformer, cpu_gemv
from scratchlm.decode_weights import (
    TOP_K_SCREENED,
    BF16Linear,
    HeadScreen,
    TransposedLinear,
    greedy_ids,
    prepare_for_decode,
    top_logits,
)
from scratchlm.generate import generate

needs_kernels = pytest.mark.skipif(cpu_gemv.kernels() is None, reason="scratchlm's CPU kernels are not built")


def near_tie_head(vocab=4096, d=128, spread=0.1, seed=0):
    """A head whose rows are 8 directions plus noise of ``spread``: tens of logits within the
    int8 copy's error of the largest."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(8, d, generator=g)
    return base[torch.arange(vocab) % 8] + spread * torch.randn(vocab, d, generator=g)


def trials(d, n=60, seed=1):
    """Hidden states: Gaussian, one huge coordinate (an LLM's massive activation), and sparse."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.randn(1, d, generator=g)
        if i % 3 == 1:
            x[0, i % d] *= 40.0
        elif i % 3 == 2:
            x *= torch.rand(1, d, generator=g) < 0.1
        yield x


def dropped_winners(screen: HeadScreen, weight: torch.Tensor, d: int) -> tuple[int, list[int]]:
    """(trials in which a row the screen dropped has a larger exact logit (float64) than every
    row it kept, i.e. the screen would give a wrong token; how many rows it kept in each)."""
    wrong, kept = 0, []
    for x in trials(d):
        keep = screen.candidates(x, len(weight))
        assert keep is not None
        exact = (x.double() @ weight.double().t())[0]
        dropped = torch.ones(len(weight), dtype=torch.bool)
        dropped[keep] = False
        wrong += bool(dropped.any() and exact[dropped].max() > exact[keep].max())
        kept.append(len(keep))
    return wrong, kept


def rounding_of_the_copy(w: torch.Tensor) -> torch.Tensor:
    """w - s q in float64, the int8 copy's error (as HeadScreen computes it)."""
    from scratchlm.decode_weights import quantize_int8

    q, s = quantize_int8(w[None])
    return w.double() - s.double() * q[0].double()


def two_rows_one_just_ahead(w: torch.Tensor, x: torch.Tensor, margin: float) -> torch.Tensor:
    """A head of two rows: w, whose exact logit on x wins by ``margin``, and a row whose int8
    copy is exact (all its weights one magnitude, or one nonzero weight), so that the screen
    keeps w only if its bound covers w's whole error on x."""
    target = float(x.double() @ w.double()) - margin
    if (x != 0).sum() == 1:
        other = torch.zeros_like(w)
        j = int(x.nonzero())
        other[j] = target / float(x[j])
    else:
        other = x.sign() * (target / float(x.abs().sum()))
    return torch.stack([w, other])


@needs_kernels
def test_the_bound_covers_an_adversarial_x_and_a_tenth_less_would_not():
    """x chosen against row 0's int8 error: all of sign(d) (the L2 form of the bound is the
    smaller, and the error reaches ~0.87 of it), or one coordinate at the largest |d| (the L1
    form: the error is the bound). Row 1 trails row 0 by 3% of the bound and its copy is exact:
    the screen must keep row 0, and with its bound cut to 0.9 (0.8 for the L2 case) drops it."""
    torch.manual_seed(0)
    w = torch.randn(128)
    d = rounding_of_the_copy(w)
    dense = d.sign().float()
    sparse = torch.zeros(128)
    sparse[int(d.abs().argmax())] = 3.0 * float(d[d.abs().argmax()].sign())
    for x, cut in ((dense, 0.8), (sparse, 0.9)):
        bound = min(float(d.abs().max()) * float(x.abs().sum()), float(d.norm()) * float(x.norm()))
        error = float(d @ x.double())
        assert error > cut * bound * 1.05  # the construction: x is adversarial for row 0
        head = two_rows_one_just_ahead(w, x, margin=0.03 * bound)
        screen = HeadScreen(head)
        assert screen.per_n1[1] < 1e-6 and screen.per_n2[1] < 1e-6  # row 1's copy is exact
        assert 0 in screen.candidates(x[None], 2).tolist()
        for name in ("per_n1", "per_n2"):
            getattr(screen, name).mul_(cut)
        keep = screen.candidates(x[None], 2)
        assert keep.tolist() == [1]


@needs_kernels
def test_the_screen_never_drops_the_winner_of_a_head_full_of_near_ties():
    weight = near_tie_head()
    wrong, kept = dropped_winners(HeadScreen(weight), weight, 128)
    assert wrong == 0
    assert max(kept) < len(weight) // 16  # it does screen: most rows go
    assert max(kept) >= 8  # and the head is hard: many rows stay in some trial


def test_the_screen_without_our_kernels_is_as_sound(monkeypatch):
    weight = near_tie_head(vocab=1024, seed=2)
    screen = HeadScreen(weight)
    monkeypatch.setattr(cpu_gemv, "kernels", lambda: None)
    assert dropped_winners(screen, weight, 128)[0] == 0
    head = TransposedLinear(weight.t().contiguous(), None)
    head.screen = screen
    assert greedy_ids(head, torch.randn(1, 128)) is None  # slower than the head itself without our kernels


def screened_head(vocab: int, d: int, dtype: torch.dtype, seed: int):
    """(weight, the nn.Linear with it and a small bias, that layer as the fp32 or bf16 decode layout
    with a HeadScreen; the bf16 one's logits in bf16, as on a CPU with native bf16)."""
    weight = near_tie_head(vocab, d, spread=0.2, seed=seed)
    linear = torch.nn.Linear(d, vocab)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.mul_(0.01)
    if dtype == torch.float32:
        head = TransposedLinear.from_linear(linear)
        head.screen = HeadScreen(weight)
    else:
        head = BF16Linear(linear, torch.bfloat16)
        head.screen = HeadScreen(head.weight, torch.bfloat16)
    return weight, linear, head


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("k", [5, 50])
def test_the_screen_with_top_k_keeps_every_row_of_the_exact_top_k(k, kernels, monkeypatch):
    """top = k: the floor is the k-th largest lower bound, so the k largest exact logits
    (float64) always stay (the floor of top = 1 would drop most of them: checked too)."""
    if kernels and cpu_gemv.kernels() is None:
        pytest.skip("scratchlm's CPU kernels are not built")
    weight = near_tie_head(vocab=2048, seed=5)
    screen = HeadScreen(weight)
    if not kernels:
        monkeypatch.setattr(cpu_gemv, "kernels", lambda: None)
    narrower = 0
    for x in trials(128, n=30):
        keep = screen.candidates(x, len(weight), k)
        assert keep is not None and len(keep) >= k
        exact_top = (x.double() @ weight.double().t())[0].topk(k).indices
        assert torch.isin(exact_top, keep).all()
        assert len(keep) < len(weight) // 4  # it does screen
        greedy_keep = screen.candidates(x, len(weight))
        narrower += greedy_keep is not None and not bool(torch.isin(exact_top, greedy_keep).all())
    assert narrower > 0


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_logits_equal_torch_topk_of_the_whole_head(dtype):
    vocab, d = 2048, 128
    weight, linear, head = screened_head(vocab, d, dtype, seed=6)
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8  # the logits' own rounding, relative
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        x = torch.randn(1, d, generator=g).to(dtype)
        w_used, b_used = (weight, linear.bias.detach()) if dtype == torch.float32 else (head.weight, head.bias)
        exact = (x.double() @ w_used.double().t() + b_used.double())[0]  # float64, of the weights it holds
        for k, limit in ((1, None), (20, None), (20, 1000)):
            values, ids = top_logits(head, x, k, limit)
            values, ids = values[0].double(), ids[0]
            assert len(set(ids.tolist())) == k and int(ids.max()) < (limit or vocab)
            assert bool((values[:-1] >= values[1:]).all())  # descending, as torch.topk
            assert bool(((values - exact[ids]).abs() <= tol * exact[ids].abs() + 1e-4).all())
            kth = exact[:limit].topk(k).values[-1]
            margin = 2 * tol * abs(kth) + 2e-4
            assert exact[ids].min() >= kth - margin  # no row clearly below the k-th taken
            clearly_in = torch.nonzero(exact[:limit] > kth + margin).flatten()
            assert torch.isin(clearly_in, ids).all()  # none clearly in the top k missed
    x = torch.randn(1, d, generator=g).to(dtype)
    assert top_logits(head, x, TOP_K_SCREENED) is not None
    assert top_logits(head, x, TOP_K_SCREENED + 1) is None  # too many rows would be left to check
    assert top_logits(head, x, 20, limit=20) is None  # top-k of everything: sample_next's own order


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ids_equal_the_whole_heads_argmax(dtype):
    """fp32 and bf16 heads with a bias, over a head of near ties; the bf16 head's logits in bf16
    (as on a CPU with native bf16), a tokenizer's limit on the ids too."""
    vocab, d = 2048, 128
    weight, linear, head = screened_head(vocab, d, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    for _ in range(40):
        x = torch.randn(3, d, generator=g).to(dtype)
        logits = head(x).float()
        assert torch.equal(greedy_ids(head, x), logits.argmax(-1))
        assert torch.equal(greedy_ids(head, x, limit=1000), logits[:, :1000].argmax(-1))


@needs_kernels
def test_bf16_logits_that_round_alike_tie_to_the_lowest_id():
    """Row 3's exact logit is 127.75, row 10's 128: in bf16 both are 128, and the whole head's
    argmax (torch's: the first) is 3. Both copies are near exact, so only the floor lowered by
    the bf16 rounding keeps row 3; without it the screen gives 10."""
    d = 128
    u = torch.where(torch.arange(d) % 3 == 0, -1.0, 1.0)
    weight = torch.randn(16, d) * 0.01
    weight[10] = u
    weight[3] = u
    weight[3, 0] *= 0.75
    head = BF16Linear(torch.nn.Linear(d, 16, bias=False).requires_grad_(False), torch.bfloat16)
    head.weight.copy_(weight)
    head.screen = HeadScreen(head.weight, torch.bfloat16)
    x = u[None].to(torch.bfloat16)
    assert (x.double() @ head.weight.double().t())[0, [3, 10]].tolist() == [127.75, 128.0]
    logits = head(x)
    assert logits[0, 3] == logits[0, 10] == 128 and int(logits.float().argmax()) == 3
    assert greedy_ids(head, x).tolist() == [3]
    head.screen.output_rounding = 0.0
    assert greedy_ids(head, x).tolist() == [10]


@needs_kernels
def test_a_nan_or_a_flat_head_falls_back_to_every_logit():
    weight = torch.randn(512, 64)
    head = TransposedLinear(weight.t().contiguous(), None)
    head.screen = HeadScreen(weight)
    assert greedy_ids(head, torch.full((1, 64), float("nan"))) is None
    flat = TransposedLinear(torch.zeros(64, 512), None)
    flat.screen = HeadScreen(torch.zeros(512, 64))
    assert greedy_ids(flat, torch.randn(1, 64)) is None  # every row ties: more than max_keep stay


@needs_kernels
@pytest.mark.parametrize("layout", ["fp32", "bf16"])
def test_generate_with_the_screen_gives_the_whole_heads_tokens(layout):
    """Greedy decoding of a padded batch, with a tokenizer that has fewer ids than the model's rows
    (whose last rows would win the argmax if they were allowed): the same tokens as without the
    screen; the state dict does not change."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-tiny").replace(vocab_size=512, context_length=128)
    base = Transformer(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight[-4:] = 30 * base.lm_head.weight[:4]  # would win wherever rows 0-3 lead
    screened = prepare_for_decode(copy.deepcopy(base), layout)
    whole = prepare_for_decode(copy.deepcopy(base), layout, screen_head=False)
    assert hasattr(screened.lm_head, "screen") and not hasattr(whole.lm_head, "screen")
    assert screened.state_dict().keys() == whole.state_dict().keys()

    class Ids:  # a tokenizer of 508 ids, none of them special
        vocab_size, eot_id = 508, None

        def decode(self, ids):
            return ""

    calls = []
    real = HeadScreen.candidates
    screened.lm_head.screen.candidates = lambda x, limit: calls.append(limit) or real(screened.lm_head.screen, x, limit)
    prompts = [[5, 17, 42, 8, 3, 99, 1], [7, 9], list(range(200, 230))]
    for tokenizer in (None, Ids()):
        got = [c.token_ids for c in generate(screened, tokenizer, prompts, max_new_tokens=24)]
        assert got == [c.token_ids for c in generate(whole, tokenizer, prompts, max_new_tokens=24)]
        if tokenizer is not None:
            assert max(max(r) for r in got) < 508
    assert set(calls) == {512, 508}  # the screen did choose the tokens, with the tokenizer's limit
    sampled = generate(screened, None, prompts, max_new_tokens=8, temperature=0.8, seed=1)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in generate(whole, None, prompts, max_new_tokens=8,
                                                                              temperature=0.8, seed=1)]


@needs_kernels
@pytest.mark.parametrize("layout", ["fp32", "bf16"])
def test_top_k_sampling_through_the_screen_gives_the_whole_heads_tokens(layout):
    """Top-k sampling (with temperature and top-p on the k) of one row draws from the screen's k
    largest logits: for a seed, the same tokens as the whole head's, the tokenizer's limit kept."""
    torch.manual_seed(1)
    cfg = ModelConfig.preset("llama-tiny").replace(vocab_size=512, context_length=128)
    base = Transformer(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(6.0)  # peaked logits, as a trained model's
    screened = prepare_for_decode(copy.deepcopy(base), layout)
    whole = prepare_for_decode(copy.deepcopy(base), layout, screen_head=False)

    class Ids:
        vocab_size, eot_id = 500, None

        def decode(self, ids):
            return ""

    calls = []
    real = HeadScreen.candidates
    screened.lm_head.screen.candidates = lambda x, limit, top=1: calls.append((limit, top)) or real(
        screened.lm_head.screen, x, limit, top)
    for tokenizer, k in ((None, 8), (Ids(), 40)):
        options = dict(max_new_tokens=24, temperature=0.9, top_k=k, top_p=0.95, seed=3)
        got = generate(screened, tokenizer, [[5, 17, 42]], **options)[0].token_ids
        assert got == generate(whole, tokenizer, [[5, 17, 42]], **options)[0].token_ids
        assert len(set(got)) > 3  # it did sample
        assert ((tokenizer.vocab_size if tokenizer else 512), k) in calls
    # a batch of rows takes the whole head (the union of their candidates would overflow)
    calls.clear()
    generate(screened, None, [[5, 17, 42], [1, 2]], max_new_tokens=4, temperature=0.9, top_k=8, seed=3)
    assert calls == []


@needs_kernels
def test_the_servers_engine_takes_greedy_rows_through_the_screen():
    """A batch of greedy rows (and one sampling row, which needs the logits) on the serving engine:
    the same tokens as generate() on the model without a screen; the screen chose the greedy steps."""
    from scratchlm.serve.engine import Engine, SamplingParams, Sequence

    torch.manual_seed(0)
    base = Transformer(ModelConfig.preset("llama-tiny").replace(vocab_size=512, context_length=64)).eval()
    screened = prepare_for_decode(copy.deepcopy(base), "fp32")
    whole = prepare_for_decode(copy.deepcopy(base), "fp32", screen_head=False)
    screen, calls = screened.lm_head.screen, []
    screen.candidates = lambda x, limit: calls.append(len(x)) or HeadScreen.candidates(screen, x, limit)
    prompts = [[5, 17, 42, 8], [7, 9], list(range(100, 120)), [3]]
    for sampled in (False, True):
        engine = Engine(screened, None, max_batch=4).start()
        try:
            params = [SamplingParams(max_tokens=12, temperature=0.9 if sampled and i == 3 else 0.0, seed=1)
                      for i in range(len(prompts))]
            sequences = [Sequence(p, q, lambda event: None) for p, q in zip(prompts, params)]
            engine.submit(sequences)
            assert all(s.done.wait(30) for s in sequences)
        finally:
            engine.close()
        for s in sequences[:3]:
            [ref] = generate(whole, None, [s.prompt_ids], max_new_tokens=12)
            assert s.generated == ref.token_ids
        if not sampled:
            assert max(calls) == 4  # a step of all four rows went through the screen
            calls.clear()
    assert max(calls, default=0) < 4  # with a sampling row in the batch, its steps make every logit


@needs_kernels
def test_the_servers_engine_samples_a_lone_top_k_row_through_the_screen():
    """One request sampling with top-k: its steps draw from the screen's k largest logits, and its
    tokens are those of the same request on the model without a screen (the same seed)."""
    from scratchlm.serve.engine import Engine, SamplingParams, Sequence

    torch.manual_seed(2)
    base = Transformer(ModelConfig.preset("llama-tiny").replace(vocab_size=512, context_length=64)).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(6.0)  # peaked logits, as a trained model's
    screened = prepare_for_decode(copy.deepcopy(base), "fp32")
    whole = prepare_for_decode(copy.deepcopy(base), "fp32", screen_head=False)
    screen, calls = screened.lm_head.screen, []
    screen.candidates = lambda x, limit, top=1: calls.append(top) or HeadScreen.candidates(screen, x, limit, top)
    out = []
    for model in (screened, whole):
        engine = Engine(model, None, max_batch=2).start()
        try:
            seq = Sequence([5, 17, 42], SamplingParams(max_tokens=16, temperature=0.9, top_k=12, seed=4),
                           lambda event: None)
            engine.submit([seq])
            assert seq.done.wait(30)
        finally:
            engine.close()
        out.append(seq.generated)
    assert out[0] == out[1] and len(set(out[0])) > 3
    assert calls.count(12) >= 15  # every step after the prompt's took the screen
