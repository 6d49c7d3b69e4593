"""llamad: a local LLM inference daemon (OpenAI- and Anthropic-compatible)."""

__version__ = "0.1.0"

# llama.cpp's libraries must be loaded before numpy's: on a CUDA build with numpy 2.5
# (scipy-openblas) imported first, loading a model crashed the process (seen on an H200
# machine; importing llama_cpp first fixed it). Several llamad modules import numpy, so
# the package loads llama_cpp before any of them. A broken llama_cpp install still lets
# `llamad config` run; commands that need the engine report it when they load it.
try:
    import llama_cpp as _llama_cpp  # noqa: F401
except Exception:  # pragma: no cover - reported where the engine is loaded
    pass
