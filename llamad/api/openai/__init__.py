"""OpenAI's Chat Completions, legacy completions and model listing."""
