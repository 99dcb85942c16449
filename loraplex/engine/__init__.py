"""Request-level engine pieces: sampling, incremental detokenization."""
