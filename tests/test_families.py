"""Qwen2.5, Qwen3, Gemma 3, OLMo 2 and sliding windows: the one Transformer against transformers.

Each family is a tiny random transformers model built here; scratchlm converts it and must
give the same logits (both attention paths, past the sliding window), the same greedy
tokens (with and without the cache, left-padded batches too) and export back to the same
model. The presets' parameter counts equal transformers' models of the published configs,
built on the meta device.
"""

import pytest
import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.config import ConfigError
from scratchlm.generate import generate
from scratchlm.state_dict import CheckpointError, model_from_state_dict

transformers = pytest.importorskip("transformers")

FAMILIES = ["qwen2", "qwen3", "gemma3_text", "olmo2"]
WINDOW = 8  # the tiny Gemma's sliding window: every test runs past it


def hf_model(family: str, vocab: int = 128, seed: int = 0):
    """A tiny random transformers model of ``family``, its weights (norms and biases too)
    perturbed so that every parameter matters and greedy choices are not near-ties."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    elif family == "qwen3":  # head_dim 16, not hidden_size / heads = 8
        cfg = transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    elif family == "gemma3_text":  # two local layers (window 8, rope base 100), then a global one
        cfg = transformers.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                            rope_theta=10000.0, rope_local_base_freq=100.0)
    else:
        cfg = transformers.Olmo2Config(**common, tie_word_embeddings=False)
    model = getattr(transformers, {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                   "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM"}[family])(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))  # norms (ones, or zeros for Gemma) and biases
            else:
                p.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(family, hf_model, our_model) with the same weights."""
    from scratchlm.hf import from_hf_model

    hf = hf_model(request.param)
    return request.param, hf, from_hf_model(hf).eval()


IDS = torch.randint(2, 128, (2, 3 * WINDOW + 5), generator=torch.Generator().manual_seed(1))


# ---- logits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_logits_equal_transformers_past_the_window(pair, use_sdpa):
    family, hf, ours = pair
    ours.use_sdpa = use_sdpa
    try:
        with torch.no_grad():
            expected, got = hf(IDS).logits, ours(IDS)
    finally:
        ours.use_sdpa = True
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_the_config_says_what_the_family_is(pair):
    family, _, ours = pair
    c = ours.config
    assert c.qkv_bias == (family == "qwen2") and not c.bias
    assert c.qk_norm == {"qwen2": None, "qwen3": "head", "gemma3_text": "head", "olmo2": "projection"}[family]
    assert c.norm_placement == {"gemma3_text": "sandwich", "olmo2": "post"}.get(family, "pre")
    if family == "gemma3_text":
        assert c.layer_types == ["local", "local", "global"] and c.sliding_window == WINDOW
        assert c.mlp == "geglu" and c.norm_plus_one and c.scale_embeddings and c.head_dim == 16


# ---- greedy generation ----------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_transformers_generate(pair, use_cache):
    _, hf, ours = pair
    prompt = [5, 17, 42, 8, 3]
    n = 3 * WINDOW  # decoding goes well past the window
    expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                           do_sample=False, max_new_tokens=n, eos_token_id=None)[0, 5:].tolist()
    [c] = generate(ours, None, [prompt], max_new_tokens=n, use_cache=use_cache)
    assert c.token_ids == expected


def test_left_padded_batch_equals_transformers_generate(pair):
    _, hf, ours = pair
    prompts = [[5, 17, 42, 8, 3, 9, 11, 30, 31, 32], [7, 9]]  # the first is longer than the window
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2 * WINDOW,
                           eos_token_id=None)[:, width:].tolist()
    for use_cache in (True, False):
        got = [c.token_ids for c in generate(ours, None, prompts, max_new_tokens=2 * WINDOW, use_cache=use_cache)]
        assert got == expected


# ---- Hugging Face round trip ----------------------------------------------------------------
def test_hf_to_scratchlm_to_hf_round_trip(pair, tmp_path):
    from scratchlm.hf import load_hf, save_hf

    family, hf, ours = pair
    save_hf(tmp_path / "back", ours)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert again.config.model_type == family
    with torch.no_grad():
        assert torch.allclose(again(IDS).logits, hf(IDS).logits, atol=1e-6)
    hf.save_pretrained(tmp_path / "hf")  # and from a directory, as downloaded
    loaded, _ = load_hf(tmp_path / "hf", with_tokenizer=False)
    assert loaded.config == ours.config
    with torch.no_grad():
        assert torch.allclose(loaded(IDS), ours(IDS), atol=1e-6)


def test_a_checkpoint_of_another_family_is_a_clear_error(tmp_path):
    from scratchlm.hf import convert_hf_state_dict, load_hf

    qwen3 = hf_model("qwen3")
    qwen3.save_pretrained(tmp_path / "q")
    import json

    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["model_type"] = "llama"  # Qwen3 weights (q_norm, k_norm) under a Llama config
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="q_norm"):
        load_hf(tmp_path / "q", with_tokenizer=False)
    olmo = hf_model("olmo2")  # post-norms where a pre-norm model has input_layernorm: a missing weight
    llama_config = ModelConfig.preset("llama-tiny").replace(vocab_size=128, d_model=32, d_ff=64, n_layers=3)
    with pytest.raises(KeyError):
        convert_hf_state_dict(olmo.state_dict(), llama_config, "llama")
    # scratchlm's own loader: QK-norm weights into a config without QK-norm
    state = Transformer(ModelConfig.preset("qwen3-tiny")).state_dict()
    with pytest.raises(CheckpointError, match="unexpected blocks.0.attn.k_norm.weight"):
        model_from_state_dict(ModelConfig.preset("qwen3-tiny").replace(qk_norm=None), state)


# ---- presets: parameter counts --------------------------------------------------------------
# The published config.json of each model (the fields that set its shape) and its parameter
# count; the model cards give 0.6B / 1.7B / 4.0B / 8.2B (Qwen3), 0.49B (Qwen2.5), 268M / 1B
# (Gemma 3) and 1.48B (OLMo 2 0425 1B).
_QWEN3 = dict(vocab_size=151936, max_position_embeddings=40960, head_dim=128, num_key_value_heads=8,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6)
_GEMMA3 = dict(vocab_size=262144, max_position_embeddings=32768, num_attention_heads=4, num_key_value_heads=1,
               head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rope_theta=1_000_000.0,
               rope_local_base_freq=10000.0, rms_norm_eps=1e-6)
PUBLISHED = {
    "qwen2.5-0.5b": ("qwen2", 494_032_768, dict(
        vocab_size=151936, max_position_embeddings=32768, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen3-0.6b": ("qwen3", 596_049_920, dict(_QWEN3, hidden_size=1024, intermediate_size=3072,
                                              num_hidden_layers=28, num_attention_heads=16, tie_word_embeddings=True)),
    "qwen3-1.7b": ("qwen3", 1_720_574_976, dict(_QWEN3, hidden_size=2048, intermediate_size=6144,
                                                num_hidden_layers=28, num_attention_heads=16, tie_word_embeddings=True)),
    "qwen3-4b": ("qwen3", 4_022_468_096, dict(_QWEN3, hidden_size=2560, intermediate_size=9728,
                                              num_hidden_layers=36, num_attention_heads=32, tie_word_embeddings=True)),
    "qwen3-8b": ("qwen3", 8_190_735_360, dict(_QWEN3, hidden_size=4096, intermediate_size=12288,
                                              num_hidden_layers=36, num_attention_heads=32, tie_word_embeddings=False)),
    "gemma3-270m": ("gemma3_text", 268_098_176, dict(_GEMMA3, hidden_size=640, intermediate_size=2048,
                                                     num_hidden_layers=18)),
    "gemma3-1b": ("gemma3_text", 999_885_952, dict(_GEMMA3, hidden_size=1152, intermediate_size=6912,
                                                   num_hidden_layers=26)),
    "olmo2-1b": ("olmo2", 1_484_916_736, dict(
        vocab_size=100352, max_position_embeddings=4096, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, rope_theta=500000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_count_equals_transformers_and_published(name):
    from scratchlm.hf import config_from_hf

    model_type, published, fields = PUBLISHED[name]
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        ours = Transformer(ModelConfig.preset(name))
        theirs = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == published
    # and the preset is what converting the published config gives (dtype aside)
    assert config_from_hf(hf_config).replace(dtype="bfloat16") == ModelConfig.preset(name)


# ---- the sliding-window KV cache ------------------------------------------------------------
def sliding_model(window=WINDOW, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig.preset("gemma3-tiny", sliding_window=window)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_local_layers_cache_only_their_window_and_decode_as_uncached():
    model = sliding_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 4 + 3 * WINDOW), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2, ids.shape[1])
    assert [k.shape[2] for k in cache.k] == [WINDOW, WINDOW, ids.shape[1]]  # local, local, global
    with torch.no_grad():
        uncached = model(ids)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache)
                                                    for t in range(4, ids.shape[1])]
        for use_sdpa in (True, False):  # a prompt longer than the window, then chunks of 3
            model.use_sdpa = use_sdpa
            chunked, chunks = model.new_cache(2, ids.shape[1]), []
            chunks.append(model(ids[:, :WINDOW + 3], cache=chunked))
            chunks += [model(ids[:, t:t + 3], cache=chunked) for t in range(WINDOW + 3, ids.shape[1], 3)]
            assert torch.allclose(torch.cat(chunks, 1), uncached, atol=1e-5)
        model.use_sdpa = True
    assert torch.allclose(torch.cat(steps, 1), uncached, atol=1e-5)
    assert all(k.shape[2] == WINDOW for k, local in zip(cache.k, [1, 1, 0]) if local)  # never grew


def test_sliding_window_in_every_decode_path():
    """Cached generate, the compiled step's eager function, and speculative decoding (which
    rolls the cache back) give the uncached greedy tokens."""
    from scratchlm.compiled_decode import decode_step
    from scratchlm.speculative import speculative_generate

    model = sliding_model()
    prompt, n = [5, 17, 42, 8, 3], 3 * WINDOW
    [plain] = generate(model, None, [prompt], max_new_tokens=n, use_cache=False)
    [cached] = generate(model, None, [prompt], max_new_tokens=n)
    assert cached.token_ids == plain.token_ids
    spec = speculative_generate(model, sliding_model(seed=1), prompt, max_new_tokens=n, k=3)
    assert spec.token_ids == plain.token_ids
    seq = prompt + plain.token_ids
    L = len(seq)
    cache = model.new_cache(1, L, ring=False)
    positions, key_mask = torch.arange(L)[None], torch.ones(1, L, dtype=torch.bool)
    with torch.no_grad():
        model(torch.tensor([seq[:5]]), cache=cache)
        for t in range(5, L - 1):
            logits = decode_step(model, torch.tensor([[seq[t]]]), torch.tensor([t]), positions, key_mask,
                                 cache.k, cache.v)
            assert int(logits.argmax()) == seq[t + 1]
        with pytest.raises(Exception, match="ring=False"):
            decode_step(model, torch.tensor([[1]]), torch.tensor([0]), positions, key_mask,
                        model.new_cache(1, L).k, cache.v)


# ---- bad configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(d_model=100, n_heads=12), "set head_dim"),
    (dict(head_dim=0), "head_dim must be a positive integer"),
    (dict(positions="rope", head_dim=15), "even head_dim"),
    (dict(sliding_window=0), "sliding_window must be an integer"),
    (dict(sliding_window=2048), "sliding_window must be an integer"),  # beyond context_length 1024
    (dict(layer_types=["local"] * 12), "sliding_window must be an integer"),
    (dict(layer_types=["global"] * 11), "layer_types must list 12"),
    (dict(sliding_window=8, layer_types=["global"] * 12), "no layer is local"),
    (dict(qk_norm="rms"), "qk_norm must be one of"),
    (dict(norm_placement="middle"), "norm_placement must be one of"),
    (dict(norm_plus_one=True), "norm_plus_one needs"),
    (dict(rope_local_theta=1e4), "rope_local_theta needs"),
])
def test_bad_family_configs_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_replace_keeps_derived_fields_in_step():
    config = ModelConfig.preset("gemma3-1b")
    assert config.replace(n_layers=12).layer_types == ["local"] * 5 + ["global"] + ["local"] * 5 + ["global"]
    assert ModelConfig.preset("llama-tiny").replace(d_model=128).head_dim == 32  # derived: follows
    assert ModelConfig.preset("qwen3-tiny").replace(d_model=128).head_dim == 32  # explicit: kept


FAMILY_TOKENS = {  # the chat markers each family's tokenizer has as special tokens, and its template's gist
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "chatml",
              "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"),
    "gemma3_text": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "gemma",
                    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}"
                    "<end_of_turn>\n{% endfor %}"),
}


@pytest.mark.parametrize("family", FAMILY_TOKENS)
def test_a_family_tokenizer_directory_picks_its_prompt_format(family, tmp_path):
    """A Hugging Face tokenizer directory of the family: inference uses its own Jinja
    template, training the built-in format its special tokens point to."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from scratchlm.chat import render_chat, resolve_template
    from scratchlm.tokenizer.load import load_tokenizer

    specials, builtin, template = FAMILY_TOKENS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the model answers"] * 4, trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[1 if family != "qwen3" else 2],
                                                  bos_token=specials[0])
    hf_tok.chat_template = template
    hf_tok.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert resolve_template(None, ours) == template  # inference: the directory's own template
    assert resolve_template(None, ours, training=True) == builtin  # training: the built-in it matches
    messages = [{"role": "user", "content": "hi"}]
    if family == "gemma3_text":  # the built-in renders what the family's template renders
        assert render_chat(messages, builtin, ours, add_generation_prompt=False).startswith(
            hf_tok.apply_chat_template(messages, tokenize=False).strip())


# ---- every tiny preset down every path ----------------------------------------------------------
# (name, preset, changes): one tiny model per family; Qwen2.5 is Llama with q, k, v biases.
TINY = [("qwen3-tiny", "qwen3-tiny", {}), ("gemma3-tiny", "gemma3-tiny", {}), ("olmo2-tiny", "olmo2-tiny", {}),
        ("moe-tiny", "moe-tiny", {}), ("qwen3-moe-tiny", "qwen3-moe-tiny", {}),
        ("qwen2.5-style", "llama-tiny", {"qkv_bias": True})]
LETTERS = "abcdefghijklmnopqrstuvwxyz .,!?"
# Relative error of the logits, |fast - fp32| / |fp32|, that each decode layout may add.
LAYOUT_ERROR = {"fp32": 1e-5, "bf16": 0.02, "int8": 0.02, "int4": 0.12}


def fixed_batch_task(build, ids, lora: bool = False):
    """A task of the training core: next-token prediction on one fixed batch ``ids``, the
    model from ``build()`` (with LoRA adapters on its attention if ``lora``)."""
    from scratchlm.atomic import atomic_directory
    from scratchlm.lora import apply_lora
    from scratchlm.train.core import Task

    class FixedBatch(Task):
        def model(self, resume_from):
            self.net = build()
            if lora:
                apply_lora(self.net, rank=4, alpha=8)
            return self.net

        def micro_batch(self, step, micro, rank, world, model):
            return ids

        def loss(self, model, batch):
            logits = model(batch[:, :-1])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()), {}, batch.numel()

        def save(self, directory, weights, extra):
            with atomic_directory(directory, marker=("train_config.json",)) as tmp:
                extra(tmp)

    return FixedBatch()


def train_tiny(task, out_dir, steps=8):
    from scratchlm.train.config import LoopConfig
    from scratchlm.train.core import Trainer

    cfg = LoopConfig(out_dir=str(out_dir), max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=0, weight_decay=0.0,
                     log_every=1, eval_every=1000, save_every=1000, progress=False, plot=False, device="cpu",
                     precision="fp32")
    return Trainer(cfg, task, quiet=True).run()


@pytest.mark.parametrize("name, preset, changes", TINY, ids=[t[0] for t in TINY])
def test_every_family_trains_fine_tunes_generates_decodes_and_serves(name, preset, changes, tmp_path):
    """Each tiny family, in seconds: the training core lowers its loss (every weight gets a
    gradient); LoRA through the core changes the adapters only; cached greedy generation
    equals uncached (past gemma3-tiny's window of 16); every decode layout gives logits
    close to fp32's and decodes (fp32: the same tokens); the server answers a request with
    what generate() says."""
    import copy
    import warnings

    from scratchlm.decode_weights import prepare_for_decode
    from scratchlm.tokenizer import CharTokenizer

    tok = CharTokenizer.train(LETTERS, special_tokens=["<|endoftext|>"])
    config = ModelConfig.preset(preset, vocab_size=tok.vocab_size, **changes)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 41))  # longer than gemma3-tiny's window
    ids[ids == tok.eot_id] = (tok.eot_id + 1) % config.vocab_size  # no end of text: the server's reply is text

    def build():
        torch.manual_seed(0)
        return Transformer(config)

    # A backward pass reaches every weight (the router's too, through the balancing loss).
    model = build()
    from scratchlm.moe import add_balancing_loss

    loss, _ = add_balancing_loss(model, torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1),
                                                                          ids[:, 1:].flatten()))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []

    # Training through the core.
    task = fixed_batch_task(build, ids)
    result = train_tiny(task, tmp_path / "train")
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    model = task.net.eval()

    # LoRA through the core: only the adapters move.
    lora_task = fixed_batch_task(lambda: copy.deepcopy(model).train(), ids, lora=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_result = train_tiny(lora_task, tmp_path / "lora", steps=4)
    assert lora_result.losses[-1] < lora_result.losses[0]
    after = lora_task.net.state_dict()
    adapters = [k for k in after if "lora_" in k]
    assert adapters and all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if "lora_B" in k)
    for key, value in after.items():  # the base weights: as they were (LoRALinear holds them as base.*)
        if "lora_" not in key:
            assert torch.equal(value, before[key.replace(".base.", ".")]), key

    # Generation: cached equals uncached, past the window.
    prompt, n = ids[0, :5].tolist(), 30
    [plain] = generate(model, None, [prompt], max_new_tokens=n, use_cache=False, ignore_eos=True)
    [cached] = generate(model, None, [prompt], max_new_tokens=n, ignore_eos=True)
    assert cached.token_ids == plain.token_ids

    # Every decode layout: logits near fp32's, and a cached generation past the window.
    with torch.no_grad():
        reference = model(ids)
    for layout, limit in LAYOUT_ERROR.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 falls back to fp32, saying so
            fast = prepare_for_decode(copy.deepcopy(model), layout, group_size=32)
        if layout == "bf16" and fast.config.dtype == "float32":  # that fallback: bf16 arithmetic still runs,
            fast = copy.deepcopy(model).to(torch.bfloat16)  # as the bf16 layout does on a GPU (bf16 nn.Linear)
        with torch.no_grad():
            error = ((fast(ids).float() - reference).norm() / reference.norm()).item()
        assert error < limit, (layout, error)
        [got] = generate(fast, None, [prompt], max_new_tokens=n, ignore_eos=True)
        assert len(got.token_ids) == n
        if layout == "fp32":
            assert got.token_ids == plain.token_ids

    # Serving: one request through the app, answered as generate() answers it.
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from scratchlm.serve import create_app

    text = "hello there, how are you"
    with TestClient(create_app(model, tok, "tiny"), base_url="http://127.0.0.1") as client:
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 12,
                                                        "temperature": 0})
    assert response.status_code == 200, response.text
    want = generate(model, tok, text, max_new_tokens=12)[0].text
    assert response.json()["choices"][0]["text"] == want and want
