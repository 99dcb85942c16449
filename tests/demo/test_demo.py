"""The bundled demo: small, loadable by the usual tools, and each adapter visibly does its job
through loraplex (NF4 base + adapter, greedy); the script that makes it is deterministic."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.adapters.peft_format import read_peft_adapter
from loraplex.demo import ADAPTERS_DIR, DEMO_DIR, MODEL_DIR, adapter_paths, tasks
from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.request import Request
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import runtime
from loraplex.model.loader import load_model

ROOT = Path(__file__).resolve().parents[2]


def test_bundle_is_small_and_loads_with_the_usual_tools():
    from transformers import AutoConfig, AutoTokenizer

    files = [f for f in DEMO_DIR.rglob("*") if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".py"]
    assert sum(f.stat().st_size for f in files) < 5 << 20
    assert set(adapter_paths()) == set(tasks.ADAPTERS)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tok.decode(tok.encode("Text: Hi there!", add_special_tokens=False)) == "Text: Hi there!"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == tok.bos_token + tasks.prompt("hello world")
    assert AutoConfig.from_pretrained(MODEL_DIR).quantization_config["bnb_4bit_quant_type"] == "nf4"
    for name, path in adapter_paths().items():
        assert read_peft_adapter(path).max_rank == 16, name


def test_each_adapter_does_its_job_through_loraplex():
    """Held-out texts of the training length: base copies >= 95%, each adapter >= 90% exactly."""
    texts = tasks.held_out(100)
    with runtime.reference_kernels():
        loaded = load_model(MODEL_DIR, dtype=torch.float32, device="cpu", progress=False)
        adapters = StaticAdapters(loaded.model, {n: read_peft_adapter(p) for n, p in adapter_paths().items()},
                                  max_rank=16)
        engine = Engine(loaded.model, loaded.tokenizer, adapters, EngineConfig(kv_cache_tokens=400 * 64,
                                                                               max_num_seqs=256))
        outs: dict[tuple[str, int], list] = {}
        for task in ("copy", *tasks.ADAPTERS):  # one mixed batch: every task at once
            for i, text in enumerate(texts):
                engine.add_request(Request(f"{task}-{i}", loaded.tokenizer.encode(tasks.prompt(text)),
                                           SamplingParams(max_tokens=24, temperature=0),
                                           None if task == "copy" else task,
                                           on_output=outs.setdefault((task, i), []).append))
        engine.run_until_done()
    for task in ("copy", *tasks.ADAPTERS):
        got = ["".join(o.text for o in outs[(task, i)]) for i in range(len(texts))]
        rate = sum(g == tasks.TASKS[task](t) for g, t in zip(got, texts)) / len(texts)
        assert rate >= (0.95 if task == "copy" else 0.90), (task, rate, list(zip(texts, got))[:5])


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in out.rglob("*.safetensors")):
        h.update(f.relative_to(out).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("steps", [3])
def test_make_demo_is_deterministic(tmp_path, steps):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    digests = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo.py"), "--out", str(out), "--base-steps",
                        str(steps), "--heal-steps", "1", "--adapter-steps", "1", "--eval", "0"],
                       check=True, capture_output=True, env=env, cwd=ROOT, timeout=600)
        assert (out / "model" / "model.safetensors").is_file() and (out / "adapters" / "rot13").is_dir()
        digests.append(_digest(out))
    assert digests[0] == digests[1]


def test_bundle_matches_what_the_script_reports():
    import json

    reported = json.loads((DEMO_DIR / "accuracy.json").read_text())
    assert set(reported) == {"copy", *tasks.ADAPTERS} and min(reported.values()) >= 0.9
    assert ADAPTERS_DIR.is_dir()
