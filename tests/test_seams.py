"""Seams between llamad's modules: the folders' layers (a face imports no other face and no
engine backend, the engine imports nothing above it, grammar/ nothing but the standard
library and llama.cpp), no import circles, the service side (systemd, reload) loads
without llama.cpp, and the API faces ask the engine through its declared interface."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from fake_engine import FakeEngine
from llamad.models.pool import ModelPool
from llamad.service.reload import reload_service

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llamad"


def _imports_of(path: Path) -> set[str]:
    """The llamad modules `path` imports anywhere, function-level (lazy) imports included:
    a lazy import hides a circle from Python, not from the reader."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("llamad.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llamad"):
            if node.module == "llamad":  # `from llamad import tools`
                found |= {f"llamad.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every module of every folder of the package, and the llamad modules it imports (a
    `from llamad.x import name` counts as importing llamad.x, and llamad.x.name when that
    is a module)."""
    graph = {}
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    for path in paths:
        name = _module_name(path)
        found = set()
        for module in _imports_of(path):
            found.add(module)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llamad"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names} & modules
        graph[name] = found - {name}
    return graph


# -- the layers the folders stand for ----------------------------------------------------------

BACKENDS = ("llamad.engine.llama", "llamad.engine.llama_slots", "llamad.engine.llama_embed")
ABOVE_ENGINE = ("llamad.api", "llamad.serve", "llamad.tools", "llamad.models", "llamad.service", "llamad.bench", "llamad.app", "llamad.cli")
# The model set sits between the engine and the request path: it knows engines, not requests.
ABOVE_MODELS = ("llamad.api", "llamad.serve", "llamad.service", "llamad.bench", "llamad.app", "llamad.cli")


def _under(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _face_of(module: str) -> str | None:
    """The face a module belongs to: llamad.api.<face>... (a module directly in api/ that is
    a face of its own, such as embeddings, is its own face; api/'s shared helpers none)."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "api":
        return None
    if (PACKAGE / "api" / parts[2]).is_dir():
        return parts[2]
    return None if parts[2] in SHARED_API else parts[2]


SHARED_API = {"logprobs", "sampling", "__init__"}  # wire pieces several faces share, owned by none


def layer_breaks(graph: dict[str, set[str]]) -> list[str]:
    breaks = []
    for module, imports in sorted(graph.items()):
        for imported in sorted(imports):
            face, other = _face_of(module), _face_of(imported)
            if _under(module, "llamad.api") and _under(imported, BACKENDS):
                breaks.append(f"{module} imports the engine backend {imported}")
            if face and other and face != other:
                breaks.append(f"{module} (face {face}) imports another face: {imported}")
            if _under(module, "llamad.engine") and _under(imported, ABOVE_ENGINE):
                breaks.append(f"{module} (engine) imports {imported}, above the engine")
            if _under(module, "llamad.models") and _under(imported, ABOVE_MODELS):
                breaks.append(f"{module} (models) imports {imported}, above the model set")
            if _under(module, "llamad.grammar") and not _under(imported, "llamad.grammar"):
                breaks.append(f"{module} (grammar) imports {imported}")
    return breaks


def test_the_layer_check_sees_each_kind_of_break():
    """Guards the test below: each rule, broken once in a made-up graph, is reported."""
    made_up = {
        "llamad.api.openai.chat": {"llamad.engine.llama_slots", "llamad.api.ollama.request", "llamad.api.sampling"},
        "llamad.engine.slots": {"llamad.serve.answer"},
        "llamad.grammar.schema": {"llamad.engine.chat"},
        "llamad.api.embeddings": {"llamad.api.openai.chat"},
        "llamad.models.pool": {"llamad.serve.request"},
    }
    found = "\n".join(layer_breaks(made_up))
    assert "imports the engine backend llamad.engine.llama_slots" in found
    assert "(face openai) imports another face: llamad.api.ollama.request" in found
    assert "(engine) imports llamad.serve.answer" in found
    assert "(grammar) imports llamad.engine.chat" in found
    assert "(face embeddings) imports another face" in found
    assert "(models) imports llamad.serve.request" in found
    assert "llamad.api.sampling" not in found  # shared, not a face


def test_every_folder_keeps_its_layer():
    graph = _import_graph()
    assert {"llamad.api.openai.chat", "llamad.engine.slots", "llamad.grammar.schema", "llamad.serve.pipeline"} <= set(graph)
    assert layer_breaks(graph) == []


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        path = path + [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt in graph and nxt not in state:
                found = visit(nxt, path)
                if found:
                    return found
        state[node] = "done"
        return None

    for node in graph:
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_lazy_circle():
    """Guards the test below: the circle llama -> systemd -> llama that used to be here."""
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) is not None
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}) is None


def test_llamad_modules_import_each_other_without_a_circle():
    cycle = _a_cycle(_import_graph())
    assert cycle is None, "import circle (lazy imports count): " + " -> ".join(cycle or [])


def test_the_service_side_never_names_the_llama_engine():
    graph = _import_graph()
    for module in ("llamad.service.systemd", "llamad.service.reload", "llamad.config"):
        assert "llamad.engine.llama" not in graph[module], f"{module} imports llamad.engine.llama; the CLI injects the engine"
    # No hidden default that builds a LlamaEngine: the model set is given its engine factory
    # by the caller (the CLI), and a reload builds with that one or one it is handed.
    assert inspect.signature(ModelPool).parameters["factory"].default is inspect.Parameter.empty
    assert "llamad.engine.llama" not in graph["llamad.models.pool"]


def test_systemd_and_reload_load_and_reload_without_llama_cpp(tmp_path):
    """In a process where llama_cpp and llamad.engine.llama cannot be imported, the service side
    imports and runs a whole reload with an injected (fake) engine."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 64)
    config = tmp_path / "llamad.toml"
    config.write_text(f'[model]\npath = "{model}"\nname = "before"\n')
    script = f"""
import asyncio, sys
from types import SimpleNamespace
sys.modules["llama_cpp"] = None      # any import of it raises ImportError
sys.modules["llamad.engine.llama"] = None
sys.path.insert(0, {str(ROOT / "tests")!r})
import llamad.service.systemd, llamad.service.reload
from llamad.config import load_config
from llamad.models.catalog import build_catalog
from llamad.models.pool import ModelPool
from fake_engine import FakeEngine

async def main():
    loaded = load_config({str(config)!r}, env={{}})
    catalog = build_catalog(loaded)
    pool = ModelPool(catalog, lambda spec: FakeEngine(model_id=spec.name))
    state = SimpleNamespace(loaded=loaded, config=loaded.config, engine=FakeEngine(model_id="before"), models=pool)
    await state.engine.load()
    pool.install(catalog.default, state.engine)
    with open({str(config)!r}, "a") as f:
        f.write('n_ctx = 1024\\n')
    result = await llamad.service.reload.reload_service(
        state, {str(config)!r}, engine_factory=lambda c, p: FakeEngine(model_id="after"), env={{}}
    )
    assert result.ok and result.model_swapped and state.engine.model_id == "after", result
    print("reloaded without llama_cpp")

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reloaded without llama_cpp" in result.stdout


# -- the engine interface the API faces use ----------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ROUTES = {
    "openai": (
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}],
        },
    ),
    "anthropic": (
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [{"name": "get_weather", "input_schema": WEATHER}],
        },
    ),
}


@pytest.mark.parametrize("family", sorted(ROUTES))
@pytest.mark.parametrize("native", [False, True])
async def test_both_faces_ask_the_engine_whether_its_template_renders_tools(make_client, family, native):
    """An engine whose template renders tools itself gets no tool prompt of llamad's; one
    whose template cannot gets it in the system text."""
    route, body = ROUTES[family]
    engine = FakeEngine(template_supports_tools=native)
    async with make_client(engine) as client:
        response = await client.post(route, json=body)
    assert response.status_code == 200, response.text
    prompt = engine.generations[-1].prompt.text
    assert ("<tools>" in prompt) is (not native), prompt
