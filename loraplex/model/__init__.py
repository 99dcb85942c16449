"""The served model: Hugging Face checkpoints read into NF4, its configuration and layers."""
