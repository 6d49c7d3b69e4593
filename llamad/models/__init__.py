"""Several models on one board: which exist (catalog), which name reaches which (routing),
and which are loaded (pool: on demand, unloaded when idle or to make room)."""
