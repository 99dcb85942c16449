"""Adapters made by a hostile client: bad paths, links out of the roots, config bombs, regexes
that backtrack catastrophically, merges too large for memory. Each must be a clear AdapterError
(a 400 over HTTP), fast, and never show a file's contents."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex.adapters.merge import MAX_MERGE_SOURCES, MergeError, merge_adapters
from loraplex.adapters.peft_format import (
    LINEAR_NAMES,
    AdapterError,
    BaseModelSpec,
    LoRAAdapter,
    ModuleLoRA,
    read_peft_adapter,
    write_peft_adapter,
)
from loraplex.adapters.safe_regex import Budget, UnsafePatternError, compile_pattern

HIDDEN = 16
SPEC = BaseModelSpec("LlamaForCausalLM", 2, {name: (HIDDEN, HIDDEN) for name in LINEAR_NAMES})
SECRET = "do-not-show-this-value"


def _adapter(projections=("self_attn.q_proj", "self_attn.v_proj"), rank=2) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(0)
    modules = {f"layers.{i}.{p}": ModuleLoRA(torch.randn(rank, HIDDEN, generator=gen),
                                              torch.randn(HIDDEN, rank, generator=gen), 0.5)
               for i in range(SPEC.num_layers) for p in projections}
    return LoRAAdapter(modules)


def _write(path: Path, adapter: LoRAAdapter | None = None, **config_changes) -> Path:
    """A PEFT directory (as write_peft_adapter makes it) with `config_changes` applied."""
    write_peft_adapter(adapter or _adapter(), path)
    if config_changes:
        config_path = path / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config.update(config_changes)
        config_path.write_text(json.dumps(config))
    return path


# -- paths and links ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["adapters/a\x00b", "adapters/" + "x" * 5000, "/" + "a/" * 3000])
def test_malformed_paths_are_adapter_errors(path):
    with pytest.raises(AdapterError, match="NUL byte|longer than|characters long"):
        read_peft_adapter(path, SPEC)


def test_files_linked_out_of_the_roots_are_refused(tmp_path):
    root, outside = tmp_path / "root", _write(tmp_path / "outside")
    linked = root / "linked"
    linked.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (linked / name).symlink_to(outside / name)
    with pytest.raises(AdapterError, match="adapter_config.json is a link to a file outside the allowed"):
        read_peft_adapter(linked, SPEC, roots=[root])
    # only the weights linked out
    (linked / "adapter_config.json").unlink()
    (linked / "adapter_config.json").write_bytes((outside / "adapter_config.json").read_bytes())
    with pytest.raises(AdapterError, match="adapter_model.safetensors is a link to a file outside"):
        read_peft_adapter(linked, SPEC, roots=[root])
    # the directory itself linked out
    (root / "dir-link").symlink_to(outside)
    with pytest.raises(AdapterError, match="outside the allowed adapter roots"):
        read_peft_adapter(root / "dir-link", SPEC, roots=[root])


def test_links_inside_the_roots_and_trusted_paths_still_read(tmp_path):
    root = tmp_path / "root"
    real = _write(root / "real")
    linked = root / "linked"
    linked.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (linked / name).symlink_to(real / name)
    expected = read_peft_adapter(real, SPEC)
    assert read_peft_adapter(linked, SPEC, roots=[root]) == expected
    # the operator's own --adapter (no roots) may link anywhere, as a Hugging Face cache does
    assert read_peft_adapter(linked, SPEC) == expected


def test_a_linked_json_file_is_never_shown(tmp_path):
    root, secret = tmp_path / "root", tmp_path / "secret.json"
    secret.write_text(json.dumps({"peft_type": SECRET, "r": SECRET, "target_modules": [1, SECRET]}))
    adapter = _write(root / "adapter")
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to(secret)
    with pytest.raises(AdapterError) as confined:
        read_peft_adapter(adapter, SPEC, roots=[root])
    assert "outside the allowed adapter roots" in str(confined.value)
    # and values that are wrong are described, not echoed, wherever the file is
    wrong = {SECRET: [SECRET]}
    for field, value in [("peft_type", SECRET), ("r", wrong), ("lora_alpha", wrong), ("use_rslora", wrong),
                         ("task_type", SECRET), ("bias", SECRET), ("target_modules", wrong),
                         ("rank_pattern", {SECRET: SECRET}), ("layers_to_transform", wrong),
                         ("use_dora", SECRET), ("init_lora_weights", "pissa" + SECRET),
                         ("auto_mapping", {"base_model_class": SECRET})]:
        with pytest.raises(AdapterError, match=field) as info:
            read_peft_adapter(_write(tmp_path / field, **{field: value}), SPEC)
        assert SECRET not in str(info.value), field


# -- config bombs ------------------------------------------------------------------------------


def test_deeply_nested_config_is_refused(tmp_path):
    adapter = _write(tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    text = json.dumps(config)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match="nests deeper than 32 levels"):
        read_peft_adapter(adapter, SPEC)
    # an unterminated string of escaped quotes: still a quick 400
    (adapter / "adapter_config.json").write_text('{"x": "' + '\\"' * 300_000)
    started = time.monotonic()
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_peft_adapter(adapter, SPEC)
    assert time.monotonic() - started < 1
    # brackets inside strings are text, not nesting
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "note": "[" * 1000}))
    read_peft_adapter(adapter, SPEC)


def test_numbers_beyond_float_range_are_refused(tmp_path):
    adapter = _write(tmp_path / "adapter", lora_alpha=10**400, alpha_pattern={"q_proj": -(10**400)})
    with pytest.raises(AdapterError, match="'lora_alpha': expected a finite number, found an integer"):
        read_peft_adapter(adapter, SPEC)
    text = (adapter / "adapter_config.json").read_text().replace("1" + "0" * 400, "1" * 5000, 1)
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match="not valid JSON: a number with too many digits"):
        read_peft_adapter(adapter, SPEC)


@pytest.mark.parametrize("changes", [dict(lora_alpha=1e308), dict(lora_alpha=-1e300),
                                     dict(alpha_pattern={"v_proj": 1e308}),
                                     dict(lora_alpha=1e5, use_rslora=True)])
def test_huge_scaling_is_refused(tmp_path, changes):
    # r = 2 everywhere (write_peft_adapter): alpha / r stays finite, but no trained adapter has it
    with pytest.raises(AdapterError, match=r"scaling of layers\.0\..*at most 10000"):
        read_peft_adapter(_write(tmp_path / "adapter", **changes), SPEC)


def test_a_huge_tensor_key_is_refused_without_echo(tmp_path):
    adapter = _write(tmp_path / "adapter")
    key = "base_model.model.model.layers.0." + "x" * 100_000 + ".lora_A.weight"
    save_file({key: torch.zeros(2, HIDDEN)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="a tensor key longer than 256 characters") as info:
        read_peft_adapter(adapter, SPEC)
    assert len(str(info.value)) < 200


# -- regexes -----------------------------------------------------------------------------------

_READ_AND_TIME = """
import sys, time
from loraplex.adapters.peft_format import read_peft_adapter
from tests.adapters.test_hostile_adapters import SPEC
started = time.monotonic()
adapter = read_peft_adapter(sys.argv[1], SPEC)
print(time.monotonic() - started, sorted(adapter.targets))
"""


def test_catastrophic_backtracking_pattern_reads_at_once(tmp_path):
    # fullmatches the q_proj paths ("model.layers.0.self_attn." is 25 characters); Python's re
    # tries 2**25 ways to fail on each k/v/o_proj path (as long), a second each with the GIL held
    pattern = "(?:.|.){25}q_proj"
    assert re.fullmatch(pattern, "model.layers.0.self_attn.q_proj")
    adapter = _write(tmp_path / "adapter", _adapter(("self_attn.q_proj",)), target_modules=pattern)
    # in a child process, so that without this fix the test fails instead of freezing
    try:
        run = subprocess.run([sys.executable, "-c", _READ_AND_TIME, str(adapter)], capture_output=True,
                             text=True, timeout=60, cwd=Path(__file__).parents[2])
    except subprocess.TimeoutExpired:
        pytest.fail("reading the adapter did not finish within 60 s")
    assert run.returncode == 0, run.stderr
    seconds, targets = run.stdout.split(" ", 1)
    assert float(seconds) < 1.0
    assert targets.strip() == "['self_attn.q_proj']"


def test_patterns_refused_or_too_expensive_are_quick_400s(tmp_path):
    adapter = _adapter(("self_attn.q_proj",))
    cases = [
        (dict(target_modules=r".*(q)_pro\1"), "backreferences"),
        (dict(target_modules=r"(?!.*k_proj).*q_proj"), "lookahead"),
        (dict(target_modules=r"(?i).*Q_PROJ"), "flags"),
        (dict(target_modules="(?:(?:.?){999}){999}q_proj"), "too expensive"),
        (dict(target_modules="(?:.?){100000}q_proj"), "repeat counts above 1000"),
        (dict(target_modules="(unclosed"), "not a valid regular expression"),
        (dict(target_modules="q" * 2000), "longer than 1000"),
        (dict(exclude_modules=r"(?<=x)k_proj"), "lookahead / lookbehind"),
        (dict(rank_pattern={r"(a)\1": 2}), "rank_pattern.*backreferences"),
        (dict(alpha_pattern={r"(?>a)": 2}), "alpha_pattern.*atomic groups"),
        (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=r"(x)\1"), "layers_pattern"),
    ]
    for i, (changes, message) in enumerate(cases):
        started = time.monotonic()
        with pytest.raises(AdapterError, match=message):
            read_peft_adapter(_write(tmp_path / str(i), adapter, **changes), SPEC)
        assert time.monotonic() - started < 1.5, changes


def test_peft_pattern_semantics_are_kept(tmp_path):
    # a regex target, regex rank / alpha keys (first match wins) and a layers_pattern
    adapter = _adapter(("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"), rank=4)
    adapter.modules["layers.1.mlp.down_proj"] = ModuleLoRA(torch.ones(2, HIDDEN), torch.ones(HIDDEN, 2), 1.0)
    path = _write(tmp_path / "a", adapter, target_modules=r".*\.(q|k)_proj|model\.layers\.\d\.mlp\.down_proj",
                  r=4, lora_alpha=8, rank_pattern={r"layers\.1\..*down_\w+": 2},
                  alpha_pattern={r"[kq]_proj": 12, "q_proj": 99, "layers.1.mlp.down_proj": 2})
    read = read_peft_adapter(path, SPEC)
    assert set(read.modules) == set(adapter.modules)
    assert read.modules["layers.0.self_attn.q_proj"].scaling == 3.0  # the first key that matches
    assert read.modules["layers.1.mlp.down_proj"].scaling == 1.0     # rank 2, alpha 2
    assert read.modules["layers.0.mlp.down_proj"].scaling == 2.0     # r, lora_alpha
    layered = _write(tmp_path / "b", _adapter(("self_attn.q_proj",)), target_modules=["q_proj"],
                     layers_to_transform=[1], layers_pattern=r"lay\w+")
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.q_proj.*not targeted"):
        read_peft_adapter(layered, SPEC)


def test_safe_patterns_answer_as_re_does():
    names = [f"model.layers.{i}.{n}" for i in (0, 7, 31) for n in LINEAR_NAMES]
    names += ["model.embed_tokens", "lm_head", "", "a\n"]
    pieces = list("ml3_qkp.") + ["\\.", "\\d", "\\w", "\\W", "\\b", "[a-z]", "[^.]", "*", "+", "?", "*?",
                                 "{1,2}", "|", "(", ")", "(?:", "^", "$", "\\Z"]
    rng = random.Random(0)
    checked = 0
    for _ in range(1500):
        pattern = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        try:
            expected = re.compile(pattern)
        except re.error:
            with pytest.raises(UnsafePatternError):
                compile_pattern(pattern)
            continue
        try:
            safe = compile_pattern(pattern)
        except UnsafePatternError as e:  # "*+", "++": possessive, whose answer needs backtracking
            assert "possessive" in str(e), pattern
            continue
        for name in names:
            assert safe.match(name, Budget()) == bool(expected.match(name)), (pattern, name)
            assert safe.fullmatch(name, Budget()) == bool(expected.fullmatch(name)), (pattern, name)
        checked += 1
    assert checked > 500


# -- merges ------------------------------------------------------------------------------------


def test_merge_size_is_bounded():
    adapter = _adapter()
    nbytes = sum(4 * (m.a.numel() + m.b.numel()) for m in adapter.modules.values())
    merge_adapters([(adapter, 1.0), (adapter, 1.0)], "linear", max_bytes=2 * nbytes)  # at the limit: fine
    with pytest.raises(MergeError, match=f"{3 * nbytes} bytes as float32, more than the merge limit"):
        merge_adapters([(adapter, 1.0)] * 3, "linear", max_bytes=2 * nbytes)
    with pytest.raises(MergeError, match=f"at most {MAX_MERGE_SOURCES} sources"):
        merge_adapters([(adapter, 1.0)] * (MAX_MERGE_SOURCES + 1), "cat")


def test_an_unchanged_config_is_checked_once_for_every_read(tmp_path, monkeypatch):
    """Page-ins from disk, merges and exports read an adapter again: its config (patterns
    compiled, modules matched) is checked once, and again only when its bytes change."""
    import loraplex.adapters.peft_format as peft_format
    from loraplex.adapters.peft_format import ConfigCheck

    path = write_peft_adapter(_adapter(), tmp_path / "a")
    parses = []
    parse = peft_format._parse_settings
    monkeypatch.setattr(peft_format, "_parse_settings", lambda config: parses.append(1) or parse(config))
    checked = ConfigCheck()
    first = read_peft_adapter(path, checked=checked)
    assert read_peft_adapter(path, checked=checked) == first and len(parses) == 1
    config = json.loads((path / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2  # a changed config is checked, and kept, anew
    (path / "adapter_config.json").write_text(json.dumps(config))
    changed = read_peft_adapter(path, checked=checked)
    assert len(parses) == 2 and changed != first
    assert read_peft_adapter(path, checked=checked) == changed and len(parses) == 2
