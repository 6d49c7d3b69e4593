"""llamad: a local LLM inference daemon (OpenAI- and Anthropic-compatible)."""

__version__ = "0.1.0"
