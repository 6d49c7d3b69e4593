"""Embeddings (/v1/embeddings, /api/embed, /api/embeddings) through the real ASGI stack with a
fake engine whose vectors are normalised character-bucket counts (width 8)."""

from __future__ import annotations

import base64
import struct

import pytest

from fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio


async def test_openai_shape_batched_in_one_engine_call(make_client):
    engine = FakeEngine()
    async with make_client(engine) as client:
        response = await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["ab", "ab", "zz"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "llama-local"
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in body["data"])
    assert all(len(v) == 8 for v in vectors) and vectors[0] == vectors[1] != vectors[2]
    assert body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}  # BOS + 2 characters, three times
    assert engine.embedded == [[[1, 97, 98], [1, 97, 98], [1, 122, 122]]]  # one batch, not three calls


async def test_token_arrays_and_base64(make_client):
    async with make_client() as client:
        floats = (await client.post("/v1/embeddings", json={"input": [[72, 105]]})).json()
        encoded = (await client.post("/v1/embeddings", json={"input": [72, 105], "encoding_format": "base64"})).json()
    vector = floats["data"][0]["embedding"]
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vector)
    assert floats["usage"]["prompt_tokens"] == 2  # token arrays are used as they are


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"input": ""}, "input", "empty string"),
        ({"input": []}, "input", "non-empty"),
        ({"input": ["a", ""]}, "input[1]", "empty string"),
        ({"input": [["a"]]}, "input[0]", "token ids"),
        ({"input": 3.5}, "input", "non-empty"),
        ({"input": [[70000]]}, "input[0]", "out of range"),
        ({"input": "a", "dimensions": 4}, "dimensions", "cannot be changed"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format", "float"),
    ],
)
async def test_bad_embedding_requests_get_openai_errors(make_client, body, param, fragment):
    engine = FakeEngine()
    async with make_client(engine) as client:
        response = await client.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]


async def test_too_long_input_is_refused_or_truncated(make_client):
    engine = FakeEngine(n_ctx=16)
    async with make_client(engine) as client:
        refused = await client.post("/v1/embeddings", json={"input": "x" * 40})
        truncated = await client.post("/api/embed", json={"model": "m", "input": "x" * 40})
        not_truncated = await client.post("/api/embed", json={"model": "m", "input": "x" * 40, "truncate": False})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert truncated.status_code == 200 and truncated.json()["prompt_eval_count"] == 16
    assert not_truncated.status_code == 400 and "at most 16" in not_truncated.json()["error"]


async def test_ollama_embed_and_legacy_embeddings(make_client):
    engine = FakeEngine()
    async with make_client(engine) as client:
        embed = (await client.post("/api/embed", json={"model": "nomic-embed-text", "input": ["ab", "cd"]})).json()
        single = (await client.post("/api/embed", json={"model": "m", "input": "ab"})).json()
        preload = (await client.post("/api/embed", json={"model": "m", "input": []})).json()
        legacy = (await client.post("/api/embeddings", json={"model": "m", "prompt": "ab"})).json()
        bad = await client.post("/api/embed", json={"model": "m", "input": [1, 2]})
    assert embed["model"] == "nomic-embed-text" and len(embed["embeddings"]) == 2
    assert embed["prompt_eval_count"] == 6 and embed["total_duration"] > 0
    assert single["embeddings"][0] == embed["embeddings"][0] == legacy["embedding"]
    assert preload == {"model": "m", "embeddings": []}
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)


async def test_a_dedicated_embedding_model_has_its_own_queue(tmp_path):
    """[embeddings] path: the embedding engine answers while the chat engine is busy."""
    import asyncio

    import httpx

    from conftest import config_for_tests
    from llamad.app import create_app

    chat = FakeEngine(script=lambda g: ["x"] * 400, token_delay=0.005, max_queue=0)
    embedder = FakeEngine(model_id="nomic-embed-text-v1.5")
    await chat.load()
    await embedder.load()
    app = create_app(config_for_tests(tmp_path), chat, embedder=embedder)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        answer = asyncio.create_task(
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400})
        )
        async with asyncio.timeout(10):
            while not chat.generating:
                await asyncio.sleep(0.005)
        embedded = await client.post("/v1/embeddings", json={"input": ["ab", "cd"]})
        assert chat.generating  # answered while the chat model was still busy
        async with asyncio.timeout(30):
            await answer
    chat.close()
    embedder.close()
    assert embedded.status_code == 200 and embedded.json()["model"] == "nomic-embed-text-v1.5"
    assert len(embedder.embedded) == 1 and chat.embedded == []


async def test_embeddings_section_is_validated(tmp_path):
    from llamad.config import ConfigError, load_config

    config = tmp_path / "llamad.toml"
    config.write_text('[embeddings]\npooling = "max"\n')
    with pytest.raises(ConfigError, match="embeddings.pooling"):
        load_config(config, env={})
    config.write_text('[embeddings]\npath = "/nonexistent.gguf"\n')
    with pytest.raises(ConfigError, match="embeddings.path"):
        load_config(config, env={})
    config.write_text('[embeddings]\npooling = "last"\nbatch_tokens = 256\nnormalize = false\n')
    loaded = load_config(config, env={}).config.embeddings
    assert (loaded.pooling, loaded.batch_tokens, loaded.normalize, loaded.path) == ("last", 256, False, "")


async def test_a_dedicated_model_that_fails_to_load_is_a_503_and_shows_in_health(tmp_path):
    from litestar.testing import AsyncTestClient

    from conftest import config_for_tests
    from llamad.app import create_app

    embedder = FakeEngine(model_id="bge-small")

    def broken() -> None:
        raise RuntimeError("not a GGUF")

    embedder._load = broken  # type: ignore[method-assign]
    app = create_app(config_for_tests(tmp_path), FakeEngine(), embedder=embedder)
    async with AsyncTestClient(app=app) as client:
        health = await client.get("/health")
        refused = await client.post("/v1/embeddings", json={"input": "a"})
        ollama = await client.post("/api/embed", json={"model": "m", "input": "a"})
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert health.status_code == 200  # the chat model serves
    assert health.json()["embedding_model"] == {"model": "bge-small", "state": "failed", "error": "not a GGUF"}
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_not_loaded"
    assert ollama.status_code == 503 and "not loaded" in ollama.json()["error"]
    assert chat.status_code == 200
