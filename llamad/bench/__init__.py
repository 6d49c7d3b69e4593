"""`llamad bench` and its side-by-side runs against llama-server."""
