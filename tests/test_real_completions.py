"""Real tier: legacy completions, embeddings and the tokenizer routes against a real llamad
with the demo model, through the official openai SDK (and httpx for llama-server's routes)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def client(real_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0, timeout=300)


PROMPT = "The capital of France is"


def test_completion_plain_and_streamed_agree(client):
    kwargs = dict(model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=5, temperature=0)
    plain = client.completions.create(**kwargs)
    [choice] = plain.choices
    assert plain.object == "text_completion" and choice.text and choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens == 6 and 0 < plain.usage.completion_tokens <= 5
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completion_echo_and_several_prompts(client):
    result = client.completions.create(model="m", prompt=[PROMPT, "One, two,"], max_tokens=2, temperature=0, echo=True)
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[0].text.startswith(PROMPT) and result.choices[1].text.startswith("One, two,")


def test_suffix_without_fim_tokens_is_a_400(client, real_server):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="m", prompt="def add(a, b):\n    return ", suffix="\n", max_tokens=4)
    assert "no FIM tokens" in refused.value.message
    infill = httpx.post(real_server + "/infill", json={"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n"})
    assert infill.status_code == 400 and infill.json()["error"]["param"] == "input_suffix"


def test_embeddings_through_the_sdk(client):
    # The SDK asks for base64 and decodes it: this also checks the encoding.
    texts = ["How do I bake bread at home?", "What is a simple recipe for homemade bread?", "The train to Berlin leaves at noon."]
    result = client.embeddings.create(model="text-embedding-3-small", input=texts)
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [640, 640, 640]
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)  # normalised
    assert result.usage.prompt_tokens > 20

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="m", input=texts[0], dimensions=64)


def test_tokenize_detokenize_round_trip(real_server):
    text = "Hello <start_of_turn> world"
    tokens = httpx.post(real_server + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [t["piece"] for t in tokens] == ["Hello", " ", "<start_of_turn>", " world"]
    as_text = httpx.post(real_server + "/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
    assert len(as_text) > len(tokens)  # the tag is spelled out in ordinary tokens
    ids = [t["id"] for t in tokens]
    assert httpx.post(real_server + "/detokenize", json={"tokens": ids}).json() == {"content": text}
    out_of_range = httpx.post(real_server + "/detokenize", json={"tokens": [262144]})
    assert out_of_range.status_code == 400 and "out of range" in out_of_range.json()["error"]["message"]


def test_an_input_longer_than_the_embedding_batch_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="m", input="word " * 600)
    assert refused.value.code == "context_length_exceeded" and "at most 512" in refused.value.message


def test_a_dedicated_embedding_model_from_the_config(tmp_path):
    """[embeddings] path: a second GGUF (here the demo model again) loaded beside the chat
    model, with its own queue, pooling and batch size."""
    from conftest import TEST_MODEL, start_server

    toml = f'[embeddings]\npath = "{TEST_MODEL}"\npooling = "last"\nbatch_tokens = 128\n'
    with start_server(tmp_path, toml) as server:
        result = httpx.post(server.url + "/v1/embeddings", json={"input": ["a cat", "a dog"]}, timeout=300).json()
        too_long = httpx.post(server.url + "/v1/embeddings", json={"input": "word " * 200}, timeout=300)
        log = server.log()
    assert result["model"] == "gemma-3-270m-q4_k_m"  # the embedding model's own name
    assert [len(d["embedding"]) for d in result["data"]] == [640, 640]
    assert too_long.status_code == 400 and "at most 128" in too_long.json()["error"]["message"]
    assert '"embedding_model_loaded"' in log and '"pooling": "last"' in log
