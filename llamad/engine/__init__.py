"""The engine: one model behind a bounded queue, generation as a stream of typed events.

This package's interface (what the request path and the faces may use) is re-exported
here; the llama.cpp backend (`llama`, `llama_slots`, `llama_embed`) is imported only by
the command line and the service side, which build the engine. Nothing in this package
imports the faces, the request path or the tools above it."""

from llamad.engine.base import Engine, EngineStats
from llamad.engine.scheduler import Overloaded, QueueTimeout, ShuttingDown
from llamad.engine.types import (
    Alternative,
    Cancelled,
    ContextOverflow,
    Done,
    EngineEvent,
    EngineNotReady,
    FimTokens,
    Generation,
    GrammarRejected,
    NoFimTokens,
    Prompt,
    PromptError,
    Sampling,
    Started,
    Token,
    TokenLogprob,
    TokenOutOfRange,
    Waiting,
    check_token_ids,
)

__all__ = [
    "Alternative", "Cancelled", "ContextOverflow", "Done", "Engine", "EngineEvent", "EngineNotReady", "EngineStats",
    "FimTokens", "Generation", "GrammarRejected", "NoFimTokens", "Overloaded", "Prompt", "PromptError", "QueueTimeout", "Sampling",
    "ShuttingDown", "Started", "Token", "TokenLogprob", "TokenOutOfRange", "Waiting", "check_token_ids",
]
