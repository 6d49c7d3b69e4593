"""Real tier: the official `ollama` Python client against a real llamad with the demo model
(Gemma 3 270M, a base model: answers are poor, shapes and guarantees are what is checked)."""

from __future__ import annotations

import json
import math

import jsonschema
import ollama
import pytest

pytestmark = pytest.mark.real

ASKED = "gemma3:270m"  # a name of the client's own: replies echo it
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
GREEDY = {"temperature": 0, "num_predict": 6}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def client(real_server: str) -> ollama.Client:
    return ollama.Client(host=real_server, timeout=300)


def test_list_show_ps_and_version(client, real_server):
    [listed] = client.list().models
    assert listed.model == "llama-local:latest" and listed.size and listed.size > 100_000_000
    assert listed.details.family == "gemma3" and listed.details.quantization_level == "Q4_K_M"
    shown = client.show(ASKED)
    # Gemma 3's vocabulary has no fill-in-the-middle tokens: no "insert".
    assert set(shown.capabilities) == {"completion", "tools", "embedding"}
    assert shown.modelinfo["gemma3.embedding_length"] == 640
    [running] = client.ps().models
    assert running.model == "llama-local:latest" and running.context_length == 4096
    import httpx

    assert httpx.get(real_server + "/api/version").json()["version"]


def test_chat_streamed_and_not_agree(client):
    whole = client.chat(model=ASKED, messages=QUESTION, options=GREEDY)
    assert whole.model == ASKED and whole.done and whole.done_reason in ("stop", "length")
    assert 0 <= whole.eval_count <= 6 and whole.prompt_eval_count > 5
    assert whole.total_duration >= whole.eval_duration >= 0
    parts = list(client.chat(model=ASKED, messages=QUESTION, options=GREEDY, stream=True))
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])
    assert parts[-1].done_reason in ("stop", "length") and parts[-1].prompt_eval_count == whole.prompt_eval_count
    # Each token is a line of its own; the text itself may differ from the whole answer's:
    # logits are not bit-identical across cache reuse and batch compositions, even greedy.
    assert sum(bool(p.message.content) for p in parts) <= parts[-1].eval_count <= 6


def test_chat_format_schema_is_obeyed(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    reply = client.chat(
        model=ASKED,
        messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}],
        format=schema,
        options={"num_predict": 24, "seed": 1},
    )
    jsonschema.validate(json.loads(reply.message.content), schema)


def test_chat_with_tools_and_a_tool_history(client):
    # The history's call carries its arguments as an object, as Ollama's clients send it.
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C and sunny", "tool_name": "get_weather"},
    ]
    reply = client.chat(model=ASKED, messages=messages, tools=TOOLS, options={"num_predict": 24, "seed": 2})
    assert reply.done and reply.prompt_eval_count > 40  # the tool prompt and the history were rendered
    # The demo base model seldom chooses a call by itself; whatever it calls validates, with
    # arguments as an object (the client's own model refuses a string).
    for call in reply.message.tool_calls or []:
        assert call.function.name == "get_weather"
        jsonschema.validate(dict(call.function.arguments), WEATHER)


def test_generate_raw_and_templated(client):
    raw = client.generate(model=ASKED, prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 4})
    assert raw.done and raw.response and raw.eval_count <= 4
    assert raw.prompt_eval_count == 6  # <bos> + 5 tokens: no template around a raw prompt
    templated = client.generate(model=ASKED, prompt="The capital of France is", options={"temperature": 0, "num_predict": 4})
    assert templated.prompt_eval_count > raw.prompt_eval_count


def test_errors_reach_the_client_with_their_status(client):
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=ASKED, prompt="def add(a, b):\n    return ", suffix="\n")
    assert refused.value.status_code == 400 and "no FIM tokens" in refused.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        client.chat(model=ASKED, messages=QUESTION, options={"temperature": 7})
    assert bad.value.status_code == 400 and "options.temperature" in bad.value.error


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embed_width_determinism_and_ranking(client):
    texts = ["The cat sits on the mat.", "A cat is sitting on the rug.", "Stock markets fell sharply on Tuesday."]
    result = client.embed(model=ASKED, input=texts)
    anchor, paraphrase, unrelated = result.embeddings
    assert all(len(v) == 640 for v in result.embeddings)  # Gemma 3 270M's hidden width
    assert result.prompt_eval_count > 15
    # Measured on the demo model: paraphrase ~0.94, unrelated ~0.56.
    assert cosine(anchor, paraphrase) > cosine(anchor, unrelated) + 0.1
    again = client.embed(model=ASKED, input=texts[0]).embeddings[0]
    assert again == anchor  # identical input, identical vector
