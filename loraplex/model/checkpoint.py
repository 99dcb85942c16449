"""Hugging Face checkpoints in, NF4 out: read a model layer by layer, write NF4 checkpoints.

`CheckpointReader` opens a model directory (`config.json` and safetensors, one file or
shards with `model.safetensors.index.json`) and yields one decoder layer at a time:
- unquantized checkpoints (bf16/fp16/fp32): each linear is read alone with
  `safetensors.safe_open` and quantized to NF4 on the target device, so the host never
  holds more than one source tensor beyond the quantized result;
- bitsandbytes NF4 checkpoints (as transformers saves them): each linear's stored codes
  and statistics become an `NF4Weight` directly, bit for bit, without re-quantizing.

`write_nf4_checkpoint` streams a reader into a bitsandbytes-format NF4 checkpoint that
`transformers.AutoModelForCausalLM.from_pretrained` loads back with bitsandbytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..kernels.nf4 import NF4FormatError, NF4Weight, dequantize_nf4, quantize_nf4
from .config import LINEAR_NAMES, SUPPORTED_ARCHITECTURES

LAYER_NORM_NAMES = ("input_layernorm.weight", "post_attention_layernorm.weight")
EMBED_NAME = "model.embed_tokens.weight"
NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Copied beside the weights by `write_nf4_checkpoint`, whichever exist.
AUXILIARY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)

BLOCKSIZE = 64
_QUANT_STATE_MARK = ".quant_state.bitsandbytes__"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SAFETENSORS_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# Buffers some older checkpoints carry; models recompute them, transformers ignores them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A model directory that loraplex cannot read (or a destination it will not write)."""


@dataclass
class LayerWeights:
    """One decoder layer: its seven NF4 linears and every other tensor of the layer."""

    index: int
    linears: dict[str, NF4Weight]  # key: an entry of LINEAR_NAMES
    tensors: dict[str, torch.Tensor]  # names relative to the layer ("input_layernorm.weight", ...)


class _SafetensorsFiles:
    """Which file holds each tensor; tensors are read one at a time through `safe_open`."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self._handles: dict[str, object] = {}
        index_path, single_path = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from e
            files = sorted(set(weight_map.values()))
        elif single_path.is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            bins = sorted(p.name for p in model_dir.glob("pytorch_model*.bin"))
            if bins:
                raise CheckpointError(
                    f"{model_dir} holds only PyTorch pickle weights ({', '.join(bins)}); loraplex reads "
                    "safetensors only: convert the checkpoint to safetensors first, e.g. "
                    "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir) "
                    "(transformers saves safetensors by default)"
                )
            raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE}")

        self.file_of: dict[str, str] = {}
        for name in files:
            if not (model_dir / name).is_file():
                raise CheckpointError(f"{model_dir}: missing weight file {name} (listed in {INDEX_FILE})")
            for key in self._open(name).keys():  # noqa: SIM118 - a safe_open handle, not a dict
                self.file_of[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.file_of.get(key) != name:
                    raise CheckpointError(f"{model_dir / name}: missing tensor {key!r} (listed in {INDEX_FILE})")

    def _open(self, file_name: str):
        handle = self._handles.get(file_name)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(self.dir / file_name), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.dir / file_name}: not a readable safetensors file ({e})") from e
            self._handles[file_name] = handle
        return handle

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def __iter__(self):
        return iter(self.file_of)

    def dtype_name(self, key: str) -> str:
        return self._open(self.file_of[key]).get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        """The stored tensor: a view of the file's memory map (copy what is kept)."""
        if key not in self.file_of:
            raise CheckpointError(f"{self.dir}: missing tensor {key!r}")
        return self._open(self.file_of[key]).get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def _read_config_json(model_dir: Path) -> dict:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: missing {CONFIG_FILE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _check_architecture(raw: dict, model_dir: Path) -> str:
    architectures = raw.get("architectures") or []
    if not architectures:
        raise CheckpointError(
            f"{model_dir / CONFIG_FILE} names no architecture; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch = architectures[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"unsupported architecture {arch!r} in {model_dir / CONFIG_FILE}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _is_prequantized(raw: dict, model_dir: Path) -> bool:
    """Whether config.json declares a bitsandbytes NF4 checkpoint; other formats are refused."""
    qc = raw.get("quantization_config")
    if not qc:
        return False
    method = str(qc.get("quant_method", "bitsandbytes"))
    if method != "bitsandbytes":
        raise CheckpointError(
            f"{model_dir}: quantization method {method!r} is not supported; loraplex reads unquantized "
            "(bf16/fp16/fp32) or bitsandbytes NF4 checkpoints"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise CheckpointError(
            f"{model_dir}: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; use the unquantized "
            "model or an NF4 checkpoint (load_in_4bit=True, bnb_4bit_quant_type='nf4')"
        )
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise CheckpointError(f"{model_dir}: bitsandbytes quantization_config without load_in_4bit")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default is fp4
    if quant_type != "nf4":
        raise CheckpointError(
            f"{model_dir}: bitsandbytes 4-bit quant type {quant_type!r} is not supported; loraplex serves "
            "NF4 (bnb_4bit_quant_type='nf4')"
        )
    return True


class CheckpointReader:
    """Reads a Llama-family checkpoint one decoder layer at a time, linears as `NF4Weight`.

    `dtype` is the dtype of every non-linear tensor returned (norms, biases, embeddings,
    lm_head); `None` keeps the checkpoint's own float dtype (`source_dtype`). Linears of
    unquantized checkpoints are quantized from their stored dtype (blocksize 64, double
    quantization) on `device`; NF4 linears of bitsandbytes checkpoints are taken as stored.
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype | None = torch.bfloat16,
        device: torch.device | str = "cpu",
        progress: bool = True,
    ):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a directory")
        self.raw_config = _read_config_json(self.model_dir)
        self.architecture = _check_architecture(self.raw_config, self.model_dir)
        self.prequantized = _is_prequantized(self.raw_config, self.model_dir)
        self.files = _SafetensorsFiles(self.model_dir)

        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(self.model_dir)
        except Exception as e:  # any config problem is a checkpoint error
            raise CheckpointError(f"{self.model_dir / CONFIG_FILE}: transformers cannot read it ({e})") from e

        self.device = torch.device(device)
        self.progress = progress
        self.num_layers = int(self.config.num_hidden_layers)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))

        self._layer_keys: dict[int, list[str]] = {i: [] for i in range(self.num_layers)}
        for key in self.files:
            m = _LAYER_KEY.match(key)
            if m and int(m.group(1)) in self._layer_keys and not key.endswith(_IGNORED_SUFFIXES):
                self._layer_keys[int(m.group(1))].append(m.group(2))
        self._check_complete()
        self.source_dtype = self._float_dtype(EMBED_NAME)
        self.dtype = self.source_dtype if dtype is None else dtype

    # --- inspection ------------------------------------------------------------------

    def _float_dtype(self, key: str) -> torch.dtype:
        # Float dtypes other than bf16/fp16 (fp64, fp8 ...) are served as fp32.
        return _SAFETENSORS_FLOATS.get(self.files.dtype_name(key), torch.float32)

    def _check_complete(self) -> None:
        """Fail before any work if a tensor the model needs is absent."""
        required = [EMBED_NAME, NORM_NAME] + ([] if self.tied else [LM_HEAD_NAME])
        for i in range(self.num_layers):
            required += [f"model.layers.{i}.{name}" for name in LAYER_NORM_NAMES]
            required += [f"model.layers.{i}.{name}.weight" for name in LINEAR_NAMES]
        for key in required:
            if key not in self.files:
                raise CheckpointError(f"{self.model_dir}: missing tensor {key!r}")

    # --- global tensors ----------------------------------------------------------------

    def global_tensor(self, key: str) -> torch.Tensor:
        """One non-layer tensor (embeddings, final norm, lm_head) in `dtype` on `device`."""
        group = [k for k in self.files if k == key or k.startswith(key + ".")]
        if any(_QUANT_STATE_MARK in k for k in group):  # a quantized lm_head (transformers keeps it dense)
            return dequantize_nf4(self._nf4_from_file(group, key), self.dtype)
        return self._tensor(key)

    def global_tensors(self) -> dict[str, torch.Tensor]:
        """`model.embed_tokens.weight`, `model.norm.weight` and `lm_head.weight` (absent when tied)."""
        keys = [EMBED_NAME, NORM_NAME] + ([] if self.tied else [LM_HEAD_NAME])
        return {key: self.global_tensor(key) for key in keys}

    def _tensor(self, key: str) -> torch.Tensor:
        # Always a copy: safetensors hands out views of its memory map, and one kept view
        # would keep the whole file mapped (and its pages read so far resident).
        t = self.files.get(key)
        dtype = self.dtype if t.is_floating_point() else t.dtype
        return t.to(device=self.device, dtype=dtype, copy=True)

    # --- layers --------------------------------------------------------------------------

    def layers(self) -> Iterator[LayerWeights]:
        """Every decoder layer in order, built one at a time, with a tqdm progress bar."""
        desc = "loading" if self.prequantized else "quantizing"
        with tqdm(total=self.num_layers, desc=desc, unit="layer", disable=not self.progress) as bar:
            for i in range(self.num_layers):
                layer = self.layer(i)
                # Unmap the files between layers: the pages read stay in the page cache,
                # not in this process's resident set.
                self.files.close()
                bar.update(1)
                yield layer

    def layer(self, index: int) -> LayerWeights:
        """Decoder layer `index`, read (and quantized where needed) now."""
        prefix = f"model.layers.{index}."
        keys = self._layer_keys[index]
        linears: dict[str, NF4Weight] = {}
        used: set[str] = set()
        for name in LINEAR_NAMES:
            weight_key = f"{name}.weight"
            group = [k for k in keys if k == weight_key or k.startswith(weight_key + ".")]
            used.update(group)
            full = [prefix + k for k in group]
            if any(_QUANT_STATE_MARK in k for k in group):
                linears[name] = self._nf4_from_file(full, prefix + weight_key)
            else:
                linears[name] = self._quantize_from_file(full, prefix + weight_key)
        tensors = {k: self._tensor(prefix + k) for k in keys if k not in used}
        return LayerWeights(index=index, linears=linears, tensors=tensors)

    def _nf4_from_file(self, keys: list[str], weight_key: str) -> NF4Weight:
        """A stored bitsandbytes weight as an NF4Weight on `device`, copied out of the memory map."""
        entries = {k: self.files.get(k).to(self.device, copy=True) for k in keys}
        try:
            return NF4Weight.from_bnb(entries, prefix=weight_key)
        except NF4FormatError as e:
            raise CheckpointError(f"{self.model_dir}: {e}") from e

    def _quantize_from_file(self, keys: list[str], weight_key: str) -> NF4Weight:
        extra = sorted(k for k in keys if k != weight_key)
        if extra:  # bitsandbytes statistics without the quant_state entry that describes them
            raise CheckpointError(
                f"{self.model_dir}: {weight_key} has {', '.join(extra)} but no "
                f"'{weight_key}.quant_state.bitsandbytes__nf4' entry; the checkpoint is incomplete"
            )
        weight = self.files.get(weight_key)
        if not weight.is_floating_point():
            raise CheckpointError(
                f"{self.model_dir}: {weight_key} has dtype {weight.dtype}, neither a float weight nor a "
                "bitsandbytes NF4 weight; loraplex reads unquantized or bitsandbytes NF4 checkpoints"
            )
        if weight.dim() != 2:
            raise CheckpointError(f"{self.model_dir}: {weight_key} is not 2-D (shape {list(weight.shape)})")
        if weight.dtype not in _SAFETENSORS_FLOATS.values():  # fp64 and the like: quantize from fp32
            weight = weight.float()
        return quantize_nf4(weight.to(self.device), blocksize=BLOCKSIZE, double_quant=True)

    def close(self) -> None:
        self.files.close()


# --- writing -------------------------------------------------------------------------------


class _ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever the next group would overflow."""

    def __init__(self, dst: Path, max_shard_bytes: int):
        self.dst = dst
        self.max_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[Path] = []  # temporary names until the shard count is known
        self.shard_of: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors that stay together in one shard (a linear's codes and statistics)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        for key, t in tensors.items():
            if key in self.shard_of or key in self.buffer:
                raise CheckpointError(f"tensor {key!r} written twice")
            self.buffer[key] = t.detach().to("cpu").contiguous()
        self.buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file

        path = self.dst / f".loraplex-shard-{len(self.shards):05d}.safetensors.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        for key in self.buffer:
            self.shard_of[key] = len(self.shards)
        self.shards.append(path)
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[Path]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, name in zip(self.shards, names):
            os.replace(tmp, self.dst / name)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {key: names[i] for key, i in sorted(self.shard_of.items())},
            }
            (self.dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [self.dst / name for name in names]


def bnb_quantization_config(compute_dtype: torch.dtype, double_quant: bool = True) -> dict:
    """The `quantization_config` entry transformers writes for an NF4 bitsandbytes model."""
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return json.loads(qc.to_json_string(use_diff=False))


def write_nf4_checkpoint(
    src_dir: str | Path,
    dst_dir: str | Path,
    *,
    progress: bool = True,
    max_shard_bytes: int = 2 << 30,
    device: torch.device | str = "cpu",
) -> Path:
    """Write `src_dir` as a bitsandbytes NF4 checkpoint in `dst_dir` (which must be absent or empty).

    Linears become NF4 (blocksize 64, double quantization; an NF4 source is copied as
    stored), other tensors keep the source's float dtype. Shards are written as layers
    stream by; config.json gets the `quantization_config` transformers writes, and
    tokenizer and generation files are copied. Returns `dst_dir`.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} exists and is not an empty directory; write the NF4 checkpoint to a new one")
    reader = CheckpointReader(src, dtype=None, device=device, progress=progress)
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        writer = _ShardWriter(dst, max_shard_bytes)
        writer.add({EMBED_NAME: reader.global_tensor(EMBED_NAME)})
        all_nested = True
        for layer in reader.layers():
            prefix = f"model.layers.{layer.index}."
            for name in LINEAR_NAMES:
                weight = layer.linears[name]
                all_nested &= weight.nested
                writer.add(weight.to_bnb(prefix=f"{prefix}{name}.weight"))
            writer.add({prefix + key: t for key, t in layer.tensors.items()})
            del layer
        writer.add({NORM_NAME: reader.global_tensor(NORM_NAME)})
        if not reader.tied:
            writer.add({LM_HEAD_NAME: reader.global_tensor(LM_HEAD_NAME)})
        writer.finish()
        reader.close()

        config = dict(reader.raw_config)
        config["quantization_config"] = bnb_quantization_config(reader.source_dtype, double_quant=all_nested)
        if "dtype" not in config and "torch_dtype" not in config:
            config["dtype"] = str(reader.source_dtype).removeprefix("torch.")
        (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in AUXILIARY_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:  # it was empty before: take back what was written
            for child in dst.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return dst
