"""OpenAI's Responses API (stateful)."""
