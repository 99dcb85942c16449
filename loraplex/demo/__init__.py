"""The bundled demo: a tiny Llama-architecture model (NF4, character-level tokenizer with a chat
template) that copies text, and PEFT adapters that transform it (see `tasks.py`). Made by
`scripts/make_demo.py`; served by `loraplex serve` when no --model is given."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"
ADAPTERS_DIR = DEMO_DIR / "adapters"


def adapter_paths() -> dict[str, Path]:
    """The bundled adapters by name (each a PEFT directory)."""
    if not ADAPTERS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(ADAPTERS_DIR.iterdir()) if (p / "adapter_config.json").is_file()}
