"""llama-server's own routes: /infill, /tokenize, /detokenize."""
