"""Real coding agents for tests: install the pinned CLIs, run them, capture what they send.

- `install_agents()` installs Claude Code and Codex CLI at pinned versions with npm into a
  cache folder (once; later calls reuse it) and returns the paths of their binaries.
- `claude_command(...)` / `codex_command(...)` give the argv and environment that point each
  agent at a base URL, isolated from the user's own settings (a temporary HOME / CODEX_HOME).
- `CaptureServer` is a tiny loopback HTTP server that records every request it gets and answers
  just enough (a streamed "OK" in the Anthropic Messages or OpenAI Responses shape) for the
  client to finish.

Re-record the captures kept as test data (tests/data/captures/<agent>/*.json):

    python tests/agents.py capture
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

CLAUDE_CODE = ("@anthropic-ai/claude-code", "2.1.328")
CODEX = ("@openai/codex", "0.171.0")
AGENTS_DIR = Path(os.environ.get("LLAMAD_AGENTS_DIR", Path.home() / ".cache" / "llamad" / "agents"))
CAPTURES_DIR = Path(__file__).parent / "data" / "captures"
PROMPT = "Reply with the word OK."

# The README's "small model" profile for each agent (a model too small for the agent's own
# ~12,000-token system prompt and tool list, like the demo model): a one-line system prompt,
# no tools, no skills or environment preamble. The README shows the same settings.
SMALL_MODEL_INSTRUCTIONS = "You are a helpful assistant. Answer in one short line."
CLAUDE_SMALL_MODEL_FLAGS = ["--bare", "--tools", "", "--disable-slash-commands", "--system-prompt", SMALL_MODEL_INSTRUCTIONS]
CODEX_TOOLS_OFF = [
    "-c", "features.shell_tool=false",
    "-c", "features.unified_exec=false",
    "-c", "features.view_image=false",
    "-c", "features.goals=false",
    "-c", "tools.experimental_request_user_input={enabled=false}",
]  # fmt: skip
CODEX_SMALL_MODEL_FLAGS = [
    *CODEX_TOOLS_OFF,
    "-c", "include_environment_context=false",
    "-c", "include_permissions_instructions=false",
    "-c", "skills.include_instructions=false",
]  # fmt: skip

# Headers whose values are credentials; the capture keeps the name, never the value.
SECRET_HEADERS = {"authorization", "x-api-key", "cookie", "proxy-authorization"}


class AgentsUnavailable(RuntimeError):
    """npm (or the registry) is missing, so the pinned agents cannot be installed."""


@dataclass(frozen=True)
class Agents:
    claude: Path
    codex: Path


def _installed_version(prefix: Path, package: str) -> str | None:
    manifest = prefix / "node_modules" / package / "package.json"
    try:
        return json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def install_agents(prefix: Path = AGENTS_DIR, timeout: float = 600) -> Agents:
    """The pinned agent CLIs, installed with npm under `prefix` unless already there."""
    wanted = [CLAUDE_CODE, CODEX]
    if any(_installed_version(prefix, name) != version for name, version in wanted):
        npm = shutil.which("npm")
        if npm is None:
            raise AgentsUnavailable("npm is not installed (make test-deps installs nodejs and npm)")
        prefix.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--no-save"]
            + [f"{name}@{version}" for name, version in wanted],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AgentsUnavailable(f"npm install failed ({result.returncode}):\n{result.stderr[-4000:]}")
    bin_dir = prefix / "node_modules" / ".bin"
    agents = Agents(claude=bin_dir / "claude", codex=bin_dir / "codex")
    for path in (agents.claude, agents.codex):
        if not os.access(path, os.X_OK):
            raise AgentsUnavailable(f"{path} is missing after npm install")
    return agents


def _base_environment(home: Path) -> dict[str, str]:
    """The caller's environment minus anything that would reach a vendor or the user's settings."""
    dropped = ("ANTHROPIC_", "CLAUDE_", "OPENAI_", "CODEX_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    home.mkdir(parents=True, exist_ok=True)
    environment.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), NO_PROXY="127.0.0.1,localhost")
    return environment


def claude_command(
    agents: Agents, base_url: str, home: Path, prompt: str = PROMPT, model: str = "llamad", extra: dict | None = None
) -> tuple[list[str], dict[str, str]]:
    """`claude -p` pointed at `base_url` (no /v1), with vendor-only traffic turned off."""
    environment = _base_environment(home)
    environment.update(
        ANTHROPIC_BASE_URL=base_url,
        ANTHROPIC_AUTH_TOKEN="dummy",
        ANTHROPIC_MODEL=model,
        ANTHROPIC_SMALL_FAST_MODEL=model,
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
    )
    environment.update(extra or {})  # a caller's value wins (the small model's name, say)
    return [str(agents.claude), "-p", prompt], environment


def claude_small_model_command(
    agents: Agents, base_url: str, home: Path, prompt: str = PROMPT, extra: dict | None = None
) -> tuple[list[str], dict[str, str]]:
    """`claude -p` with the small-model profile (`--bare` reads its key from ANTHROPIC_API_KEY)."""
    argv, environment = claude_command(agents, base_url, home, prompt, extra={"ANTHROPIC_API_KEY": "dummy", **(extra or {})})
    return argv[:-1] + CLAUDE_SMALL_MODEL_FLAGS + argv[-1:], environment


def codex_command(
    agents: Agents, base_url: str, home: Path, prompt: str = PROMPT, model: str = "llamad", extra: dict | None = None
) -> tuple[list[str], dict[str, str]]:
    """`codex exec` with a model provider at `base_url` (no /v1) speaking the Responses API."""
    environment = _base_environment(home)
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{model}"\n'
        'model_provider = "llamad"\n'
        "\n"
        "[model_providers.llamad]\n"
        'name = "llamad"\n'
        f'base_url = "{base_url}/v1"\n'
        'wire_api = "responses"\n'
        'env_key = "LLAMAD_API_KEY"\n'
    )
    environment.update(CODEX_HOME=str(codex_home), LLAMAD_API_KEY="dummy", **(extra or {}))
    argv = [str(agents.codex), "exec", "--skip-git-repo-check", "--sandbox", "read-only", prompt]
    return argv, environment


def codex_small_model_command(
    agents: Agents, base_url: str, home: Path, prompt: str = PROMPT, extra: dict | None = None
) -> tuple[list[str], dict[str, str]]:
    """`codex exec` with the small-model profile: its instructions replaced by a file in CODEX_HOME."""
    argv, environment = codex_command(agents, base_url, home, prompt, extra=extra)
    instructions = Path(environment["CODEX_HOME"]) / "instructions.md"
    instructions.write_text(SMALL_MODEL_INSTRUCTIONS + "\n")
    flags = [*CODEX_SMALL_MODEL_FLAGS, "-c", f"model_instructions_file={instructions}"]
    return argv[:-1] + flags + argv[-1:], environment


# --- capture server ------------------------------------------------------------------------


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def anthropic_ok_stream(model: str) -> list[bytes]:
    """A streamed Anthropic message whose answer is "OK", in the order the SDK checks."""
    usage = {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    message = {
        "id": "msg_capture",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return [
        _sse("message_start", {"type": "message_start", "message": message}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "OK"}}),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": usage},
        ),
        _sse("message_stop", {"type": "message_stop"}),
    ]


def anthropic_tool_stream(model: str, name: str, arguments: dict) -> list[bytes]:
    """A streamed Anthropic message that is one tool call, so the agent comes back for a second turn."""
    usage = {"input_tokens": 10, "output_tokens": 10, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    message = {
        "id": "msg_capture_tool",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    block = {"type": "tool_use", "id": "toolu_capture", "name": name, "input": {}}
    delta = {"type": "input_json_delta", "partial_json": json.dumps(arguments)}
    return [
        _sse("message_start", {"type": "message_start", "message": message}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": usage},
        ),
        _sse("message_stop", {"type": "message_stop"}),
    ]


def anthropic_ok_message(model: str) -> dict:
    return {
        "id": "msg_capture",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "OK"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1},
    }


def responses_ok(model: str, status: str) -> dict:
    message = {
        "id": "msg_capture",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "OK", "annotations": []}],
    }
    return {
        "id": "resp_capture",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [message] if status == "completed" else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 1,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 11,
        }
        if status == "completed"
        else None,
    }


def responses_ok_stream(model: str) -> list[bytes]:
    """A streamed Responses API answer "OK": the typed events with increasing sequence numbers."""
    item = {"id": "msg_capture", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    done_part = {**part, "text": "OK"}
    done_item = {**item, "status": "completed", "content": [done_part]}
    common = {"item_id": "msg_capture", "output_index": 0, "content_index": 0}
    events = [
        ("response.created", {"response": responses_ok(model, "in_progress")}),
        ("response.in_progress", {"response": responses_ok(model, "in_progress")}),
        ("response.output_item.added", {"output_index": 0, "item": item}),
        ("response.content_part.added", {**common, "part": part}),
        ("response.output_text.delta", {**common, "delta": "OK", "logprobs": []}),
        ("response.output_text.done", {**common, "text": "OK", "logprobs": []}),
        ("response.content_part.done", {**common, "part": done_part}),
        ("response.output_item.done", {"output_index": 0, "item": done_item}),
        ("response.completed", {"response": responses_ok(model, "completed")}),
    ]
    return [_sse(name, {"type": name, "sequence_number": n, **body}) for n, (name, body) in enumerate(events)]


def responses_tool_stream(model: str, name: str, arguments: dict) -> list[bytes]:
    """A streamed Responses API answer that is one function call."""
    text = json.dumps(arguments)
    item = {"id": "fc_capture", "type": "function_call", "status": "in_progress", "call_id": "call_capture", "name": name}
    added = {**item, "arguments": ""}
    done_item = {**item, "status": "completed", "arguments": text}
    completed = {**responses_ok(model, "completed"), "output": [done_item]}
    events = [
        ("response.created", {"response": responses_ok(model, "in_progress")}),
        ("response.in_progress", {"response": responses_ok(model, "in_progress")}),
        ("response.output_item.added", {"output_index": 0, "item": added}),
        ("response.function_call_arguments.delta", {"item_id": "fc_capture", "output_index": 0, "delta": text}),
        ("response.function_call_arguments.done", {"item_id": "fc_capture", "output_index": 0, "arguments": text}),
        ("response.output_item.done", {"output_index": 0, "item": done_item}),
        ("response.completed", {"response": completed}),
    ]
    return [_sse(name, {"type": name, "sequence_number": n, **body}) for n, (name, body) in enumerate(events)]


def _holds_tool_result(body: dict) -> bool:
    """Whether the conversation already carries an answer to a tool call (then the agent gets "OK")."""
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
            return True
    items = body.get("input")
    return isinstance(items, list) and any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in items)


@dataclass
class CapturedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: object

    def to_json(self) -> dict:
        return {"method": self.method, "path": self.path, "query": self.query, "headers": self.headers, "body": self.body}


@dataclass
class CaptureServer:
    """Loopback server recording requests; `with CaptureServer() as server: ... server.url`.

    With `anthropic_tool` / `responses_tool` set to (name, arguments), the first answer of each
    conversation is that tool call, so the capture also holds the agent's second turn (the tool
    result after the same prefix); every other answer is the text "OK".
    """

    anthropic_tool: tuple[str, dict] | None = None
    responses_tool: tuple[str, dict] | None = None
    requests: list[CapturedRequest] = field(default_factory=list)

    def __enter__(self) -> "CaptureServer":
        captured = self.requests
        anthropic_tool, responses_tool = self.anthropic_tool, self.responses_tool
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # the default writes every request to stderr
                pass

            def _record(self) -> CapturedRequest:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: object = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                url = urlsplit(self.path)
                headers = {
                    k.lower(): ("<redacted>" if k.lower() in SECRET_HEADERS else v) for k, v in self.headers.items()
                }
                request = CapturedRequest(self.command, url.path, dict(parse_qsl(url.query)), headers, body)
                with lock:
                    captured.append(request)
                return request

            def _send(self, status: int, content_type: str, chunks: list[bytes]) -> None:
                payload = b"".join(chunks)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("request-id", "req_capture")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _json(self, status: int, body: dict) -> None:
                self._send(status, "application/json", [json.dumps(body).encode()])

            def do_HEAD(self) -> None:
                self._record()
                self._send(200, "text/plain", [b""])

            def do_GET(self) -> None:
                request = self._record()
                if request.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": "llamad", "object": "model", "owned_by": "llamad"}]})
                else:
                    self._json(404, {"error": {"message": f"capture server has no {request.path}", "type": "not_found"}})

            def do_POST(self) -> None:
                request = self._record()
                body = request.body if isinstance(request.body, dict) else {}
                model = str(body.get("model", "llamad"))
                stream = bool(body.get("stream"))
                if request.path.endswith("/messages/count_tokens"):
                    self._json(200, {"input_tokens": 10})
                elif request.path.endswith("/messages"):
                    if stream and anthropic_tool and not _holds_tool_result(body):
                        self._send(200, "text/event-stream", anthropic_tool_stream(model, *anthropic_tool))
                    elif stream:
                        self._send(200, "text/event-stream", anthropic_ok_stream(model))
                    else:
                        self._json(200, anthropic_ok_message(model))
                elif request.path.endswith("/responses"):
                    if stream and responses_tool and not _holds_tool_result(body):
                        self._send(200, "text/event-stream", responses_tool_stream(model, *responses_tool))
                    elif stream:
                        self._send(200, "text/event-stream", responses_ok_stream(model))
                    else:
                        self._json(200, responses_ok(model, "completed"))
                else:
                    self._json(404, {"error": {"message": f"capture server has no {request.path}", "type": "not_found"}})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


# --- recording the captures kept as test data ----------------------------------------------


def scrub(value: object, replacements: dict[str, str]) -> object:
    """Machine-specific paths (the temporary home and working folder) out of a captured request."""
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [scrub(v, replacements) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v, replacements) for k, v in value.items()}
    return value


def write_captures(requests: list[CapturedRequest], out_dir: Path, replacements: dict[str, str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.json"):
        old.unlink()
    written = []
    for n, request in enumerate(requests, start=1):
        slug = re.sub(r"[^a-z0-9]+", "_", request.path.lower()).strip("_") or "root"
        path = out_dir / f"{n:02d}_{request.method.lower()}_{slug}.json"
        path.write_text(json.dumps(scrub(request.to_json(), replacements), indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def capture(agent: str, out_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    agents = install_agents()
    build = {"claude_code": claude_command, "codex": codex_command}[agent]
    with tempfile.TemporaryDirectory(prefix=f"capture-{agent}-") as tmp:
        home = Path(tmp) / "home"
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        (workdir / "notes.txt").write_text("The answer is OK.\n")
        # One tool call each, read-only, so the captures hold a second turn with a tool result.
        server = CaptureServer(
            anthropic_tool=("Read", {"file_path": str(workdir / "notes.txt")}),
            responses_tool=("exec_command", {"cmd": "cat notes.txt"}),
        )
        with server:
            argv, environment = build(agents, server.url, home)
            result = subprocess.run(
                argv, env=environment, cwd=workdir, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        machine_paths = {
            str(workdir): "/home/user/project",
            re.sub(r"[^A-Za-z0-9]", "-", str(workdir)): "-home-user-project",  # Claude Code's project slug
            str(home): "/home/user",
            tmp: "/tmp",
        }
        write_captures(server.requests, out_dir, machine_paths)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install the pinned agents and print their paths")
    record = sub.add_parser("capture", help="run each agent against a capture server; save its requests")
    record.add_argument("--out", type=Path, default=CAPTURES_DIR)
    record.add_argument("--agent", choices=["claude_code", "codex"], action="append")
    args = parser.parse_args()
    if args.command == "install":
        agents = install_agents()
        sys.stdout.write(f"claude {agents.claude}\ncodex {agents.codex}\n")
        return 0
    status = 0
    for agent in args.agent or ["claude_code", "codex"]:
        result = capture(agent, args.out / agent)
        sys.stdout.write(f"{agent}: exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr[-2000:]}\n")
        status = status or result.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
