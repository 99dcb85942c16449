"""`loraplex serve`: the OpenAI-compatible HTTP server, its settings, state and metrics."""
