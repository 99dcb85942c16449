"""LoRA adapters on disk: reading, validating and writing them, free of serving concerns."""
