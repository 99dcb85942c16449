"""PEFT LoRA adapter directories: read, validate against the served base model, write.

The directory layout is what peft's `save_pretrained` writes for a Llama-family causal LM:

    adapter_config.json         the LoraConfig (peft_type "LORA", r, lora_alpha, patterns, ...)
    adapter_model.safetensors   base_model.model.model.layers.{i}.{linear}.lora_{A,B}.weight

(peft strips the adapter name, "default", from the saved keys.) Everything is checked here,
before a tensor reaches the GPU, so a bad adapter fails at load time with a message naming
the key or field, never mid-request. Semantics follow peft 0.21; the subtle parts:

- Which modules a config targets (`_is_targeted`) and the rank / alpha a module gets
  (`_PatternKeys.value`) follow peft's `check_target_module_exists` and `get_pattern_key`,
  applied to the module's path inside `LlamaForCausalLM` ("model.layers.3.self_attn.q_proj").
- `fan_in_fan_out` is ignored: peft forces it to False for `nn.Linear` targets (every Llama
  projection), so lora_A is always [r, in_features] and lora_B [out_features, r].
- `bias` other than "none" is accepted only if no bias tensor was saved: peft then behaves
  exactly as with "none" (Llama's linears have no bias, so it saves none). Saved biases
  are trained base-model biases, which would change the base shared by every adapter.
- `init_lora_weights` schemes that rewrite the base weights (PiSSA, CorDA, OLoRA, LoftQ,
  LoRA-GA) are refused: such an adapter only works on its own residual base model.
- File and config must agree: a saved module the config does not target, or (with a spec)
  a targeted module with no saved weights, is an error: peft loads such a file only with
  unexpected / missing key warnings, and what a missing module does depends on its init.
  Null `target_modules` means q_proj and v_proj, peft's Llama-family default. Unknown
  config fields are ignored; those naming LoRA variants peft knows are refused.
- `write_peft_adapter` stores each module's exact float scaling in the safetensors
  metadata: peft's `alpha / r` cannot hit every float64 exactly, so the config alone gives
  peft the scaling to within an ulp and the metadata makes our own round trip exact.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .safe_files import BadPathError, OpenFile, OutsideRootsError, check_path_text, open_file, resolve_inside
from .safe_regex import Budget, SafePattern, UnsafePatternError, compile_pattern

# Same list as loraplex.model.config.LINEAR_NAMES, kept here so adapters/ does not depend on model/.
LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# PeftModel.base_model (LoraModel) .model (LlamaForCausalLM) .model (LlamaModel) .layers
_KEY_PREFIX = "base_model.model.model."
_KEY_RE = re.compile(r"base_model\.model\.model\.layers\.(0|[1-9][0-9]*)\.(.+)\.lora_([AB])\.weight")
_MODULE_RE = re.compile(r"layers\.(0|[1-9][0-9]*)\.(.+)")
# peft's default target_modules for every Llama-family model_type (llama, mistral, qwen2, ...)
_DEFAULT_TARGETS = ("q_proj", "v_proj")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_CONFIG_BYTES = 1 << 20
_MAX_KEY_CHARS = 256
# peft's configs nest 3 deep; json.loads would hit RecursionError (a 500) near 1000
_MAX_CONFIG_DEPTH = 32
# |alpha / r| beyond this is no trained adapter, and near float max it overflows in the slot
MAX_SCALING = 1e4
_SCALING_METADATA = "loraplex.scaling"
_CONVERT_HINT = (
    'python -c "import torch, safetensors.torch as st; st.save_file(torch.load('
    "'adapter_model.bin', map_location='cpu', weights_only=True), "
    "'adapter_model.safetensors', metadata={'format': 'pt'})\""
)

# Config fields whose truthy value means "not plain LoRA on the decoder linears".
_REFUSED_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "a trained bias on lora_B (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel layers",
}
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# peft's PeftType names: a wrong peft_type is shown only if it is one of these
_PEFT_TYPES = (
    "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADALORA", "BOFT",
    "ADAPTION_PROMPT", "IA3", "LOHA", "LOKR", "OFT", "POLY", "LN_TUNING", "VERA", "FOURIERFT",
    "XLORA", "HRA", "VBLORA", "CPT", "BONE", "MISS", "RANDLORA", "TRAINABLE_TOKENS", "SHIRA", "C3A",
    "ROAD", "WAVEFT", "DELORA", "GRALORA",
)


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the key or field at fault."""


@dataclass(frozen=True)
class BaseModelSpec:
    """What the served base model looks like, as far as adapters are concerned."""

    architecture: str  # e.g. "LlamaForCausalLM"
    num_layers: int
    shapes: dict[str, tuple[int, int]]  # LINEAR_NAME -> (out_features, in_features)
    model_type: str | None = None  # config.model_type, e.g. "llama"

    @classmethod
    def from_hf_config(cls, config: Any, architecture: str | None = None) -> BaseModelSpec:
        """Spec of a Llama-family transformers config (duck-typed: no transformers import)."""
        hidden, inter = config.hidden_size, config.intermediate_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        arch = architecture or (getattr(config, "architectures", None) or [None])[0]
        if arch is None:
            raise ValueError("config.architectures is empty: pass architecture explicitly")
        q, kv = heads * head_dim, kv_heads * head_dim
        shapes = {
            "self_attn.q_proj": (q, hidden),
            "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, q),
            "mlp.gate_proj": (inter, hidden),
            "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter),
        }
        return cls(arch, config.num_hidden_layers, shapes, getattr(config, "model_type", None))


@dataclass(eq=False)
class ModuleLoRA:
    """One projection's adapter: delta_W = scaling * b @ a."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float  # alpha / r, or alpha / sqrt(r) with use_rslora

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def __eq__(self, other: object) -> bool:
        # Exact equality (dtype, values, scaling): the dataclass default would compare
        # tensors with ==, which has no single truth value.
        if not isinstance(other, ModuleLoRA):
            return NotImplemented
        return self.scaling == other.scaling and all(
            x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
            for x, y in ((self.a, other.a), (self.b, other.b))
        )


@dataclass
class LoRAAdapter:
    """A validated LoRA adapter; keys are "layers.{i}.{LINEAR_NAME}"."""

    modules: dict[str, ModuleLoRA]
    # adapter_config.json as read; metadata for export, so not part of equality
    config: dict = field(default_factory=dict, compare=False)

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def targets(self) -> set[str]:
        return {_MODULE_RE.fullmatch(key).group(2) for key in self.modules}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in (m.a, m.b))


# ----------------------------------------------------------------------------------------
# adapter_config.json
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoraSettings:
    """The parts of a LoraConfig that decide which modules exist and their rank / scaling.

    Every pattern is checked and compiled once, when the config is read, and matched with
    `safe_regex` (no backtracking) under one `budget` for the whole adapter.
    """

    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: _PatternKeys
    alpha_pattern: _PatternKeys
    target_modules: SafePattern | str | tuple[str, ...]  # a regex, "all-linear", or names
    exclude_modules: SafePattern | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[SafePattern, ...]  # each already wrapped as peft wraps it
    budget: Budget = field(default_factory=Budget, compare=False)
    # module name -> (rank, alpha): read twice per module, matched once
    _memo: dict = field(default_factory=dict, compare=False)


def _kind(value: Any) -> str:
    """What a config value is, never the value itself: the file may not be the adapter's."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true/false"
    for types, name in ((int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
                        (dict, "an object")):
        if isinstance(value, types):
            return name
    return type(value).__name__


def _field_error(name: str, expected: str, found: Any) -> AdapterError:
    return AdapterError(f"{CONFIG_NAME} field {name!r}: expected {expected}, found {_kind(found)}")


def _is_number(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float range
        return False


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _checked_regex(name: str, pattern: str) -> SafePattern:
    try:
        return compile_pattern(pattern)
    except UnsafePatternError as e:  # says why, never echoes the pattern
        raise AdapterError(f"{CONFIG_NAME} field {name!r}: refused regular expression: {e}") from None


def _str_or_names(config: dict, name: str) -> str | tuple[str, ...] | None:
    value = config.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _field_error(name, "a string, a list of strings or null", value)


def _regex_or_names(config: dict, name: str) -> SafePattern | tuple[str, ...] | None:
    value = _str_or_names(config, name)
    return _checked_regex(name, value) if isinstance(value, str) else value


@dataclass(frozen=True)
class _PatternKeys:
    """rank_pattern / alpha_pattern, checked and compiled once.

    peft takes the value of the first key (in config order) that matches a dotted suffix of
    the module path, as the regex rf"(.*\.)?({key})$". A plain name (letters, digits, _ and
    escaped dots: what write_peft_adapter writes, and most configs) can only match one of the
    path's few dotted suffixes, so those are looked up; only real regexes are matched.
    """

    values: tuple  # by position in the config
    plain: dict[str, int]  # a plain key's name (dots unescaped) -> its first position
    regexes: tuple[tuple[int, SafePattern], ...]  # (position, wrapped pattern) in order
    exact: dict[str, Any]  # peft's fallback: a key equal to the whole path

    def value(self, name: str, default: Any, budget: Budget) -> Any:
        parts = name.split(".")
        suffixes = (".".join(parts[i:]) for i in range(len(parts)))
        first_plain = min((self.plain[x] for x in suffixes if x in self.plain), default=len(self.values))
        for position, regex in self.regexes:
            if position > first_plain:
                break
            if regex.match(name, budget):
                return self.values[position]
        if first_plain < len(self.values):
            return self.values[first_plain]
        return self.exact.get(name, default)


def _pattern_keys(config: dict, name: str, valid, expected: str) -> _PatternKeys:
    patterns = config.get(name) or {}
    if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
        raise _field_error(name, expected, patterns)
    plain, regexes = {}, []
    for position, key in enumerate(patterns):
        if re.fullmatch(r"(?:[A-Za-z0-9_]|\\\.)+", key):  # e.g. re.escape("layers.0.q_proj")
            plain.setdefault(key.replace("\\.", "."), position)
        else:
            regexes.append((position, _checked_regex(name, rf"(.*\.)?({key})$")))
    return _PatternKeys(tuple(patterns.values()), plain, tuple(regexes), dict(patterns))


def _refuse_unsupported(config: dict) -> None:
    """LoRA variants, base-rewriting inits and other tasks, which cannot be served."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        # a known peft type is shown; anything else is described, not echoed
        found = repr(peft_type) if peft_type in _PEFT_TYPES else _kind(peft_type)
        raise AdapterError(
            f"{CONFIG_NAME} field 'peft_type': expected 'LORA', found {found}; "
            "only LoRA adapters can be served"
        )
    for name, feature in _REFUSED_FIELDS.items():
        if config.get(name):
            raise AdapterError(
                f"{CONFIG_NAME} field {name!r} is set: {feature} is not supported; "
                "only plain LoRA on the decoder's linear layers can be served"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        scheme = next(p for p in _BASE_REWRITING_INITS if init.lower().startswith(p))
        raise AdapterError(
            f"{CONFIG_NAME} field 'init_lora_weights' is {scheme!r}: this initialisation rewrites "
            "the base weights, so the adapter needs its own residual base model; convert it to "
            "plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise _field_error("task_type", "'CAUSAL_LM' or null", task_type)
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise _field_error("bias", "'none', 'all' or 'lora_only'", config.get("bias"))


def _parse_settings(config: dict) -> _LoraSettings:
    """Validate the config: refuse what cannot be served, keep what shapes the modules."""
    _refuse_unsupported(config)
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)  # peft's defaults
    if not _is_pos_int(r):
        raise _field_error("r", "a positive integer", r)
    if not _is_number(alpha):
        raise _field_error("lora_alpha", "a finite number", alpha)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _field_error("use_rslora", "true or false", use_rslora)
    rank_pattern = _pattern_keys(config, "rank_pattern", _is_pos_int, "an object of positive integers")
    alpha_pattern = _pattern_keys(config, "alpha_pattern", _is_number, "an object of finite numbers")

    target_modules = _str_or_names(config, "target_modules")
    if target_modules is None:
        target_modules = _DEFAULT_TARGETS
    elif isinstance(target_modules, str) and target_modules.lower() != "all-linear":
        target_modules = _checked_regex("target_modules", target_modules)
    exclude_modules = _regex_or_names(config, "exclude_modules")
    layers = config.get("layers_to_transform")
    if isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        layers = tuple(layers)
    elif not (layers is None or (isinstance(layers, int) and not isinstance(layers, bool))):
        raise _field_error("layers_to_transform", "an integer, a list of integers or null", layers)
    layers_pattern = config.get("layers_pattern") or ()
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    if not isinstance(layers_pattern, (list, tuple)) or not all(isinstance(p, str) for p in layers_pattern):
        raise _field_error("layers_pattern", "a string, a list of strings or null", layers_pattern)
    # peft's LoraConfig refuses these combinations too
    if not isinstance(target_modules, tuple) and (layers is not None or layers_pattern):
        raise AdapterError(
            f"{CONFIG_NAME}: 'layers_to_transform' / 'layers_pattern' cannot be combined with a "
            "string 'target_modules'"
        )
    if layers_pattern and layers is None:
        raise AdapterError(f"{CONFIG_NAME}: 'layers_pattern' is set but 'layers_to_transform' is not")

    settings = _LoraSettings(
        r=r,
        alpha=alpha,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers,
        # peft's own wrapping, as in its _get_layer_index
        layers_pattern=tuple(
            _checked_regex("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in layers_pattern
        ),
    )
    for name in ("model.embed_tokens", "lm_head"):
        if _is_targeted(settings, name):
            raise AdapterError(
                f"{CONFIG_NAME} field 'target_modules' targets {name}: LoRA on the embeddings or "
                "lm_head is not supported"
            )
    return settings


# the only digits-only segment of a module path is its layer index: "model.layers.3.mlp.up_proj"
_LAYER_SEGMENT = re.compile(r"\.(\d+)\.")


def _layer_index(settings: _LoraSettings, name: str) -> int | None:
    """The layer index peft reads from a module path for layers_to_transform."""
    if not settings.layers_pattern:
        # lazy: the first numbered segment, as peft does
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return int(match.group("idx")) if match else None
    # peft takes idx from the first layers_pattern that matches; in a module path any match
    # ends its `\.(\d+)\.` on the one digits-only segment, so that segment is the index
    if any(p.match(name, settings.budget) for p in settings.layers_pattern):
        return int(_LAYER_SEGMENT.search(name).group(1))
    return None


def _is_targeted(settings: _LoraSettings, name: str) -> bool:
    """Whether peft would put LoRA on the module at path `name` of LlamaForCausalLM."""
    exclude = settings.exclude_modules
    if isinstance(exclude, SafePattern):
        if exclude.fullmatch(name, settings.budget):
            return False
    elif exclude and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
        return False
    targets = settings.target_modules
    if isinstance(targets, str):  # "all-linear"
        # peft expands it to every nn.Linear but the output head; embeddings are not Linear
        return name not in ("lm_head", "model.embed_tokens")
    if isinstance(targets, SafePattern):
        return targets.fullmatch(name, settings.budget)
    if name in targets:
        return True  # an exact path: peft applies no layer filter here
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    wanted = settings.layers_to_transform
    if wanted is None or wanted == ():
        return True
    index = _layer_index(settings, name)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def _expected_rank_and_alpha(settings: _LoraSettings, name: str) -> tuple[int, float]:
    if name not in settings._memo:
        settings._memo[name] = (
            settings.rank_pattern.value(name, settings.r, settings.budget),
            settings.alpha_pattern.value(name, settings.alpha, settings.budget),
        )
    return settings._memo[name]


def _scaling(settings: _LoraSettings, module: str, rank: int) -> float:
    alpha = _expected_rank_and_alpha(settings, f"model.{module}")[1]
    scaling = alpha / math.sqrt(rank) if settings.use_rslora else alpha / rank
    if not (math.isfinite(scaling) and abs(scaling) <= MAX_SCALING):
        raise AdapterError(
            f"{CONFIG_NAME} fields 'lora_alpha' / 'alpha_pattern': the scaling of {module} "
            f"(alpha / r{' ** 0.5' if settings.use_rslora else ''}) must be finite and at most "
            f"{MAX_SCALING:g} in magnitude"
        )
    return scaling


def _check_base_model(config: dict, spec: BaseModelSpec | None) -> None:
    # adapter_config has no model_type and base_model_name_or_path is only a name; the
    # base class peft recorded (auto_mapping, when task_type was unset) can be compared.
    if spec is None:
        return
    mapping = config.get("auto_mapping")
    found = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if found is not None and found != spec.architecture:
        # a transformers class name is shown; anything else is described, not echoed
        shown = repr(found) if isinstance(found, str) and _CLASS_NAME.fullmatch(found) else _kind(found)
        raise AdapterError(
            f"{CONFIG_NAME} field 'auto_mapping.base_model_class': expected {spec.architecture!r} "
            f"(the served base model), found {shown}"
        )


_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,63}For[A-Z][A-Za-z]{0,31}")


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


def _locate_files(root: Path, roots: Sequence[Path] | None) -> tuple[Path, Path]:
    """The config and weights paths in `root`; with `roots`, `root` must resolve inside one."""
    try:
        check_path_text(str(root))
        if roots is not None:
            resolve_inside(root, roots)
    except (BadPathError, OutsideRootsError) as e:
        raise AdapterError(f"adapter directory: {e}") from None
    if not root.is_dir():
        raise AdapterError(f"adapter directory {str(root)!r} does not exist or is not a directory")
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterError(f"{CONFIG_NAME} is missing in {str(root)!r}")
    if not weights_path.is_file():
        if (root / PICKLE_NAME).is_file():
            raise AdapterError(
                f"{PICKLE_NAME} found in {str(root)!r} but pickle files are refused (loading one "
                f"can run arbitrary code); convert it to {WEIGHTS_NAME} in that directory: "
                f"{_CONVERT_HINT}"
            )
        raise AdapterError(f"{WEIGHTS_NAME} is missing in {str(root)!r}")
    return config_path, weights_path


def _open(path: Path, roots: Sequence[Path] | None, limit: int) -> OpenFile:
    """`path` opened (confined to `roots` unless None, at most `limit` bytes), or AdapterError."""
    try:
        return open_file(path, roots, limit)
    except (BadPathError, OutsideRootsError) as e:
        raise AdapterError(str(e)) from None
    except OSError as e:  # the OS's text, not its filename: that may be a resolved server path
        raise AdapterError(f"{path.name} cannot be opened: {e.strerror}") from None


def _json_depth(text: str) -> int:
    """How deeply arrays / objects nest, counted without recursion (strings skipped)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


# A string, or an unterminated one up to the end: a match from every quote, so the scan stays
# linear (with a closing quote required, each unterminated string would rescan to the end)
_JSON_STRING = re.compile(r'(?s)"(?:[^"\\]|\\.)*(?:"|\\?\Z)')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _load_config(data: bytes) -> dict:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: not UTF-8") from None
    if _json_depth(text) > _MAX_CONFIG_DEPTH:
        raise AdapterError(f"{CONFIG_NAME} nests deeper than {_MAX_CONFIG_DEPTH} levels")
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or a 5000-digit number
        # the position only: the decoder's text quotes no content
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {_json_reason(e)}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME}: expected a JSON object, found {_kind(config)}")
    return config


def _json_reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    return "nested too deeply" if isinstance(e, RecursionError) else "a number with too many digits"


def _refuse_key(key: str) -> AdapterError:
    """The error for a tensor key that is not lora_A / lora_B of a decoder projection."""
    if "lora_magnitude_vector" in key:
        return AdapterError(f"{WEIGHTS_NAME} key {key!r}: DoRA (lora_magnitude_vector) is not supported")
    if "lora_embedding_" in key:
        return AdapterError(f"{WEIGHTS_NAME} key {key!r}: LoRA on the embeddings is not supported")
    if key.endswith(".lora_B.bias"):
        return AdapterError(f"{WEIGHTS_NAME} key {key!r}: a bias on lora_B (lora_bias) is not supported")
    if key.endswith(".bias"):
        return AdapterError(
            f"{WEIGHTS_NAME} key {key!r}: trained base-layer biases (bias='all' / 'lora_only') "
            "are not supported: they would change the base model every adapter shares"
        )
    if "embed_tokens" in key or "lm_head" in key:
        return AdapterError(
            f"{WEIGHTS_NAME} key {key!r}: trained embedding / lm_head weights (modules_to_save, "
            "resized embeddings) are not supported"
        )
    match = _KEY_RE.fullmatch(key)
    if match:
        return AdapterError(
            f"{WEIGHTS_NAME} key {key!r}: unknown module {match.group(2)!r}; "
            f"expected one of {', '.join(LINEAR_NAMES)}"
        )
    return AdapterError(
        f"{WEIGHTS_NAME} key {key!r}: unexpected key; expected "
        f"{_KEY_PREFIX}layers.<i>.<module>.lora_A.weight / lora_B.weight"
    )


def _group_keys(keys: list[str], spec: BaseModelSpec | None) -> dict[str, dict[str, str]]:
    """Module key -> {"A": file key, "B": file key}, each name and layer checked."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        if len(key) > _MAX_KEY_CHARS:  # real keys are < 100 characters; never echo a huge one
            raise AdapterError(f"{WEIGHTS_NAME} has a tensor key longer than {_MAX_KEY_CHARS} characters")
        match = _KEY_RE.fullmatch(key)
        if match is None or match.group(2) not in LINEAR_NAMES:
            raise _refuse_key(key)
        layer, name, which = int(match.group(1)), match.group(2), match.group(3)
        if spec is not None:
            if layer >= spec.num_layers:
                raise AdapterError(
                    f"{WEIGHTS_NAME} key {key!r}: layer {layer} out of range, the base model "
                    f"has {spec.num_layers} layers"
                )
            if name not in spec.shapes:
                raise AdapterError(f"{WEIGHTS_NAME} key {key!r}: the base model has no module {name!r}")
        modules.setdefault(f"layers.{layer}.{name}", {})[which] = key
    for module, pair in modules.items():
        for have, missing in (("A", "B"), ("B", "A")):
            if missing not in pair:
                raise AdapterError(
                    f"{WEIGHTS_NAME} key {pair[have]!r} has no matching lora_{missing}: expected "
                    f"key {_KEY_PREFIX}{module}.lora_{missing}.weight"
                )
    return modules


def _check_targets(modules: dict, settings: _LoraSettings, spec: BaseModelSpec | None) -> None:
    """File and config must agree on the modules, as peft loads without missing/unexpected keys."""
    for module, pair in modules.items():
        if not _is_targeted(settings, f"model.{module}"):
            raise AdapterError(
                f"{WEIGHTS_NAME} key {pair['A']!r}: module not targeted by {CONFIG_NAME} "
                "(target_modules / exclude_modules / layers_to_transform), so peft would not load it"
            )
    if spec is None:
        return
    for layer in range(spec.num_layers):
        for name in spec.shapes:
            module = f"layers.{layer}.{name}"
            if module not in modules and _is_targeted(settings, f"model.{module}"):
                raise AdapterError(
                    f"{CONFIG_NAME} targets {module} but {WEIGHTS_NAME} has no weights for it "
                    f"(expected key {_KEY_PREFIX}{module}.lora_A.weight)"
                )


def _check_header(
    f: Any,
    module: str,
    pair: dict[str, str],
    settings: _LoraSettings,
    spec: BaseModelSpec | None,
    max_rank: int,
) -> int:
    """Shape and dtype checks from the safetensors header, before any data is read; the rank."""
    shapes = {}
    for which, key in pair.items():
        view = f.get_slice(key)
        shape, dtype = tuple(view.get_shape()), view.get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{WEIGHTS_NAME} key {key!r}: expected a float tensor, found dtype {dtype}")
        if len(shape) != 2:
            raise AdapterError(f"{WEIGHTS_NAME} key {key!r}: expected a 2-D tensor, found shape {shape}")
        shapes[which] = shape
    rank = shapes["A"][0]
    if shapes["B"][1] != rank:
        raise AdapterError(
            f"{WEIGHTS_NAME} key {pair['B']!r}: expected {rank} columns (the rank of lora_A, "
            f"shape {shapes['A']}), found shape {shapes['B']}"
        )
    if rank < 1 or rank > max_rank:
        raise AdapterError(
            f"{WEIGHTS_NAME} key {pair['A']!r}: rank {rank} is outside the supported range 1..{max_rank}"
        )
    expected_rank = _expected_rank_and_alpha(settings, f"model.{module}")[0]
    if rank != expected_rank:
        raise AdapterError(
            f"{WEIGHTS_NAME} key {pair['A']!r}: rank {rank} (shape {shapes['A']}) disagrees with "
            f"{CONFIG_NAME}, which gives rank {expected_rank} (r / rank_pattern)"
        )
    if spec is not None:
        out_features, in_features = spec.shapes[_MODULE_RE.fullmatch(module).group(2)]
        for which, expected in (("A", (rank, in_features)), ("B", (out_features, rank))):
            if shapes[which] != expected:
                raise AdapterError(
                    f"{WEIGHTS_NAME} key {pair[which]!r}: expected shape {expected} for the base "
                    f"model's ({out_features}, {in_features}) projection at rank {rank}, "
                    f"found {shapes[which]}"
                )
    return rank


def _finite(t: torch.Tensor) -> bool:
    # min and max propagate NaN and are infinite iff some value is: ~15x faster than
    # isfinite().all() on CPU (bf16 especially), which dominated reading a 7B adapter
    return all(bool(torch.isfinite(x)) for x in torch.aminmax(t))


def _load_tensor(f: Any, key: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = f.get_tensor(key)
    if not _finite(tensor):
        raise AdapterError(f"{WEIGHTS_NAME} key {key!r}: contains NaN or infinite values")
    if tensor.dtype == dtype:
        return tensor.contiguous()
    converted = tensor.to(dtype).contiguous()
    if not _finite(converted):
        raise AdapterError(f"{WEIGHTS_NAME} key {key!r}: values overflow {dtype}")
    return converted


def _exact_scalings(metadata: dict | None) -> dict[str, float]:
    """Scalings recorded by write_peft_adapter; only a precision hint, so junk is ignored."""
    try:
        values = json.loads((metadata or {})[_SCALING_METADATA])
        return {k: float(v) for k, v in values.items()}
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
        return {}


def _module_order(module: str) -> tuple[int, int]:
    match = _MODULE_RE.fullmatch(module)
    return int(match.group(1)), LINEAR_NAMES.index(match.group(2))


@dataclass
class ConfigCheck:
    """One adapter's last validated adapter_config.json: a later read of the same bytes (a
    page-in from disk, a merge, an export) reuses its parsed config and compiled patterns,
    and the rank / alpha already matched per module, instead of checking it all again."""

    data: bytes | None = None
    config: dict | None = None
    settings: _LoraSettings | None = None


def read_peft_adapter(
    path: str | os.PathLike,
    spec: BaseModelSpec | None = None,
    *,
    max_rank: int = 1024,
    max_file_bytes: int = 2 << 30,
    dtype: torch.dtype = torch.float32,
    roots: Sequence[str | os.PathLike] | None = None,
    checked: ConfigCheck | None = None,
) -> LoRAAdapter:
    """Read and validate a peft LoRA adapter directory; raise AdapterError, never half-load.

    With `spec`, the adapter must fit the served base model exactly (layers, shapes, class).
    With `roots` (a client named the path), every file opened must resolve inside one of
    them (see safe_files); None trusts the path (the operator's own --adapter). With
    `checked`, an unchanged config is not checked again (and a changed one is, and kept).
    """
    real_roots = None if roots is None else [Path(os.path.realpath(r)) for r in roots]
    config_path, weights_path = _locate_files(Path(path), real_roots)
    with ExitStack() as files:
        # both opened (and their sizes checked) before anything is read
        config_file = files.enter_context(_open(config_path, real_roots, _MAX_CONFIG_BYTES))
        weights_file = files.enter_context(_open(weights_path, real_roots, max_file_bytes))
        config, settings = _checked_config(config_file.read(), checked)
        with _pattern_errors():
            _check_base_model(config, spec)
            with _safetensors(weights_file) as f:
                modules = _read_modules(f, settings, spec, max_rank, dtype)
    return LoRAAdapter(modules=modules, config=config)


def _checked_config(data: bytes, checked: ConfigCheck | None) -> tuple[dict, _LoraSettings]:
    """The config and its settings from `data`: from `checked` when it holds these bytes."""
    if checked is not None and checked.data == data:
        checked.settings.budget.left = checked.settings.budget.total  # for modules not matched yet
        return copy.deepcopy(checked.config), checked.settings
    config = _load_config(data)
    with _pattern_errors():
        settings = _parse_settings(config)
    if checked is not None:
        checked.data, checked.config, checked.settings = data, copy.deepcopy(config), settings
    return config, settings


@contextmanager
def _pattern_errors() -> Iterator[None]:
    # a pattern's matching budget can run out at any match, long after it was compiled
    try:
        yield
    except UnsafePatternError as e:
        raise AdapterError(f"{CONFIG_NAME}: {e}") from None


@contextmanager
def _safetensors(file: OpenFile) -> Iterator[Any]:
    try:
        handle = safe_open(file.path_for_library(), framework="pt")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise AdapterError(f"{WEIGHTS_NAME} cannot be read: {e}") from e
    with handle as f:
        yield f


def _read_modules(f: Any, settings: _LoraSettings, spec: BaseModelSpec | None, max_rank: int,
                  dtype: torch.dtype) -> dict[str, ModuleLoRA]:
    groups = _group_keys(list(f.keys()), spec)
    if not groups:
        raise AdapterError(f"{WEIGHTS_NAME} holds no LoRA weights")
    _check_targets(groups, settings, spec)
    ranks = {m: _check_header(f, m, pair, settings, spec, max_rank) for m, pair in groups.items()}
    exact = _exact_scalings(f.metadata())
    modules = {}
    for module in sorted(groups, key=_module_order):
        scaling = _scaling(settings, module, ranks[module])
        # the exact value written by us wins only if the config still agrees with it
        if module in exact and math.isclose(exact[module], scaling, rel_tol=1e-12):
            scaling = exact[module]
        pair = groups[module]
        modules[module] = ModuleLoRA(
            a=_load_tensor(f, pair["A"], dtype), b=_load_tensor(f, pair["B"], dtype), scaling=scaling
        )
    return modules


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------


def _alpha_for(scaling: float, rank: int) -> float:
    """The alpha whose alpha / rank is nearest to `scaling` (not every float is reachable)."""
    candidates = [scaling * rank]
    up = down = candidates[0]
    for _ in range(4):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    best = min(candidates, key=lambda alpha: abs(alpha / rank - scaling))
    return int(best) if best.is_integer() and abs(best) < 2**53 else best


def _validated_for_write(adapter: LoRAAdapter) -> list[tuple[str, ModuleLoRA]]:
    if not adapter.modules:
        raise AdapterError("adapter has no modules to write")
    for module, lora in adapter.modules.items():
        match = _MODULE_RE.fullmatch(module)
        if match is None or match.group(2) not in LINEAR_NAMES:
            raise AdapterError(
                f"module key {module!r}: expected 'layers.<i>.<one of {', '.join(LINEAR_NAMES)}>'"
            )
        a, b = lora.a, lora.b
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] < 1 or b.shape[1] != a.shape[0]:
            raise AdapterError(
                f"module {module!r}: expected a [r, in] and b [out, r], "
                f"found a {tuple(a.shape)}, b {tuple(b.shape)}"
            )
        if not math.isfinite(lora.scaling):
            raise AdapterError(f"module {module!r}: scaling {lora.scaling!r} is not finite")
    return sorted(adapter.modules.items(), key=lambda item: _module_order(item[0]))


def write_peft_adapter(
    adapter: LoRAAdapter, path: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write `adapter` as a peft LoRA directory that PeftModel.from_pretrained loads as is.

    Every module is named in full in target_modules (no suffix or layer rules to
    misfire), r is the largest rank and rank_pattern / alpha_pattern cover the rest with
    exact, escaped paths, so peft rebuilds each module's rank and alpha / r scaling.
    """
    items = _validated_for_write(adapter)
    ranks = {module: lora.rank for module, lora in items}
    alphas = {module: _alpha_for(lora.scaling, lora.rank) for module, lora in items}
    r = max(ranks.values())
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": False,
        "rank_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != lora_alpha},
        "target_modules": [f"model.{module}" for module, _ in items],
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    tensors = {}
    for module, lora in items:
        tensors[f"{_KEY_PREFIX}{module}.lora_A.weight"] = lora.a.detach().cpu().contiguous()
        tensors[f"{_KEY_PREFIX}{module}.lora_B.weight"] = lora.b.detach().cpu().contiguous()
    metadata = {"format": "pt", _SCALING_METADATA: json.dumps({m: lora.scaling for m, lora in items})}

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    # temp names then rename: a reader never sees a half-written file
    tmp_weights, tmp_config = root / f".{WEIGHTS_NAME}.tmp", root / f".{CONFIG_NAME}.tmp"
    save_file(tensors, str(tmp_weights), metadata=metadata)
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_weights, root / WEIGHTS_NAME)
    os.replace(tmp_config, root / CONFIG_NAME)
    return root
