"""Real tier: fill-in-the-middle on the real engine, through the official openai and ollama
clients and llama-server's /infill.

The demo model (Gemma 3 270M) has no FIM tokens, so there `suffix` is a 400 (tested in
test_real_completions and test_real_ollama). Here a copy of it names three of Gemma's
unused control tokens as its FIM tokens (`tokenizer.ggml.fim_pre_token_id` /
`fim_suf_token_id` / `fim_mid_token_id` -> `<unused0>` / `<unused1>` / `<unused2>`; see
tests/fim_gguf.py). llama.cpp's vocabulary loader reads those keys, so the engine reports
FIM tokens and llamad builds real FIM prompts with them. The model was never trained on
them, so the middle it writes is noise: the tests check the prompt and the wire shapes,
not the code it fills in. The copy is written once (about 13 s) and kept in
~/.cache/llamad/models, keyed by the demo file's size and mtime.

That the prompt really is `<bos> <PRE> prefix <SUF> suffix <MID>`, token for token, is
shown by the KV cache: the expected token ids are first sent as a plain token prompt, then
the FIM request is made, and the engine reuses every token of the FIM prompt but the last
(which it always evaluates again) only if the two prompts are identical
(`llamad_prompt_cache_tokens_total` in /metrics).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import httpx
import ollama
import openai
import pytest

from conftest import TEST_MODEL, start_server

pytestmark = pytest.mark.real

pytest.importorskip("gguf")

T = TypeVar("T")

# "<unused0>" typed in the code is text: it must not become the FIM prefix token.
PREFIX = "# <unused0> is only text here\ndef add(a, b):\n    return "
SUFFIX = "\n\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="session")
def fim_model_path() -> Path:
    from fim_gguf import fim_model

    return fim_model(Path(TEST_MODEL))


@pytest.fixture(scope="module")
def fim_server(fim_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_server(tmp_path_factory.mktemp("fim"), MODEL_PATH=str(fim_model_path)) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(fim_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=fim_server + "/v1", api_key="unused", max_retries=0, timeout=300)


def tokens(url: str, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
    body = {"content": text, "add_special": add_special, "parse_special": parse_special}
    return httpx.post(url + "/tokenize", json=body, timeout=60).json()["tokens"]


def fim_prompt(url: str, prefix: str, suffix: str, middle: str = "") -> list[int]:
    """The prompt llamad should build: <bos> <PRE> prefix <SUF> suffix <MID> middle."""
    [bos] = tokens(url, "", add_special=True)
    pre, suf, mid = (tokens(url, f"<unused{i}>", parse_special=True)[0] for i in range(3))
    started = tokens(url, middle) if middle else []
    return [bos, pre, *tokens(url, prefix), suf, *tokens(url, suffix), mid, *started]


def cache_tokens(url: str) -> float:
    metrics = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^llamad_prompt_cache_tokens_total (\S+)$", metrics, re.M).group(1))


def with_prompt(url: str, expected: list[int], send: Callable[[], T]) -> T:
    """Runs `send` after the engine has seen `expected` as a token prompt, and asserts that
    the request reused all of it but the last token: its prompt was exactly `expected`."""
    reference = httpx.post(url + "/v1/completions", json={"prompt": expected, "max_tokens": 1}, timeout=300)
    assert reference.status_code == 200, reference.text
    before = cache_tokens(url)
    result = send()
    assert cache_tokens(url) - before == len(expected) - 1, "the FIM prompt differs from <bos><PRE>prefix<SUF>suffix<MID>"
    return result


def test_openai_sdk_completion_with_suffix_plain_and_streamed(client, fim_server):
    expected = fim_prompt(fim_server, PREFIX, SUFFIX)
    assert len(expected) == 1 + 3 + len(tokens(fim_server, PREFIX)) + len(tokens(fim_server, SUFFIX))
    kwargs: dict[str, Any] = dict(model="gpt-3.5-turbo-instruct", prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0)
    plain = with_prompt(fim_server, expected, lambda: client.completions.create(**kwargs))
    [choice] = plain.choices
    assert plain.object == "text_completion" and isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length") and 0 < plain.usage.completion_tokens <= 6
    assert plain.usage.prompt_tokens == len(expected)

    def streamed() -> list:
        return list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))

    chunks = with_prompt(fim_server, expected, streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(expected)


def sse_data(body: str) -> list[dict]:
    return [json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")]


def test_infill_in_llama_servers_shape_with_input_extra(fim_server):
    body = {
        "input_extra": [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b"}],
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "prompt": "a",
        "n_predict": 6,
        "temperature": 0,
    }
    # Other files come first, each under its name; `prompt` is where the middle starts.
    extra = "util.py\ndef sub(a, b):\n    return a - b\n"
    expected = fim_prompt(fim_server, extra + PREFIX, SUFFIX, middle="a")
    plain = with_prompt(fim_server, expected, lambda: httpx.post(fim_server + "/infill", json=body, timeout=300))
    assert plain.status_code == 200, plain.text
    answer = plain.json()
    assert isinstance(answer["content"], str) and answer["stop"] is True
    assert answer["stop_type"] in ("eos", "limit", "word") and 0 < answer["tokens_predicted"] <= 6
    assert answer["tokens_evaluated"] == len(expected)

    def streamed() -> httpx.Response:
        return httpx.post(fim_server + "/infill", json={**body, "stream": True}, timeout=300)

    stream = with_prompt(fim_server, expected, streamed)
    assert stream.headers["content-type"].startswith("text/event-stream")
    frames = sse_data(stream.text)
    assert all(f["stop"] is False for f in frames[:-1]) and frames[-1]["stop"] is True
    assert "".join(f["content"] for f in frames) == answer["content"]
    assert frames[-1]["tokens_evaluated"] == len(expected)


def test_ollama_generate_with_suffix(fim_server):
    client = ollama.Client(host=fim_server, timeout=300)
    assert "insert" in client.show("codegemma:2b").capabilities  # FIM tokens: Ollama's "insert"
    expected = fim_prompt(fim_server, PREFIX, SUFFIX)
    options = {"temperature": 0, "num_predict": 6}
    plain = with_prompt(
        fim_server, expected, lambda: client.generate(model="codegemma:2b", prompt=PREFIX, suffix=SUFFIX, options=options)
    )
    assert plain.done and plain.done_reason in ("stop", "length") and isinstance(plain.response, str)
    assert plain.prompt_eval_count == len(expected) and 0 < plain.eval_count <= 6

    def streamed() -> list:
        return list(client.generate(model="codegemma:2b", prompt=PREFIX, suffix=SUFFIX, options=options, stream=True))

    parts = with_prompt(fim_server, expected, streamed)
    assert "".join(p.response for p in parts) == plain.response
    assert parts[-1].done and parts[-1].prompt_eval_count == len(expected)
