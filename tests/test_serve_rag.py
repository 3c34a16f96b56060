"""`scratchlm serve --rag-index`: chat answers from retrieved sources, through the openai client."""

import pytest
import torch

from rag_testdata import CORPUS, write_corpus
from scratchlm import ModelConfig, Transformer
from scratchlm.chat import chat_stops
from scratchlm.generate import generate
from scratchlm.rag import Retriever, ToyEmbedder, index_documents
from scratchlm.rag.pipeline import fit_prompt
from scratchlm.tokenizer import BPETokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory):
    from scratchlm.serve import create_app, run_in_background

    root = tmp_path_factory.mktemp("serve_rag")
    index_documents([write_corpus(root / "docs")], root / "index", embedder=ToyEmbedder(), max_tokens=24, overlap=4)
    retriever = Retriever(root / "index", ToyEmbedder())
    tokenizer = BPETokenizer.train(" ".join(CORPUS.values()) + " Answer the question using sources.", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=1024, d_model=32,
                                    n_layers=1, n_heads=2, d_ff=64)).eval()
    app = create_app(model, tokenizer, "tiny-rag", retriever=retriever, rag_k=2, chat_template="plain")
    with run_in_background(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused"), model, tokenizer, retriever


def test_chat_answers_from_retrieved_sources(rag_server):
    client, model, tokenizer, retriever = rag_server
    question = "How long should dough rise before baking?"
    response = client.chat.completions.create(
        model="tiny-rag", messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0)
    sources = response.model_extra["sources"]
    hits = retriever.search(question, k=2)
    assert [s["source"] for s in sources] == [h.source for h in hits]
    assert sources[0]["source"].endswith("bread.txt") and [s["n"] for s in sources] == [1, 2]
    # The model saw exactly the numbered-sources prompt of rag.pipeline, and answered greedily from it.
    prompt, _ = fit_prompt(question, hits, tokenizer, 1024 - 8, "plain")
    stop_strings, stop_ids = chat_stops("plain", tokenizer)
    expected = generate(model, tokenizer, prompt, max_new_tokens=8, stop=stop_strings, stop_token_ids=stop_ids)[0]
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.choices[0].message.content == expected.text


def test_streamed_rag_reply_carries_sources_first(rag_server):
    client, *_ = rag_server
    chunks = list(client.chat.completions.create(
        model="tiny-rag", messages=[{"role": "user", "content": "How does the king move in chess?"}],
        max_tokens=4, temperature=0, stream=True))
    assert chunks[0].model_extra["sources"][0]["source"].endswith("chess.html")
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])


def test_rag_needs_a_user_question(rag_server):
    client, *_ = rag_server
    with pytest.raises(openai.BadRequestError, match="non-empty user message"):
        client.chat.completions.create(model="tiny-rag", messages=[{"role": "system", "content": "hi"}])
