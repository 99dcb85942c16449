"""NF4 (QLoRA 4-bit NormalFloat) weights: quantize, dequantize, bitsandbytes import/export.

Format (identical to bitsandbytes `quantize_4bit(quant_type="nf4")`):
- the weight is flattened row-major and cut into blocks of `blocksize` (64) values;
  each value becomes the index of the nearest of 16 NormalFloat levels after dividing
  by its block's absmax; two codes per byte, even element in the high nibble.
- double quantization: the fp32 block absmax values, minus their mean (`offset`), are
  quantized to 8 bits with bitsandbytes' signed dynamic map in groups of 256, each
  group keeping one fp32 scale (`absmax2`). Resident cost: 4 + 8/64 + 32/16384 bits.

`NF4Weight` keeps exactly these tensors (no dequantized copy); the fused kernels in
`nf4_matmul.py` read them directly. `to_bnb`/`from_bnb` convert to and from the
state-dict entries that transformers writes for a bitsandbytes 4-bit checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

# The 16 NormalFloat4 levels, as bitsandbytes hard-codes them (fp32, sorted).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

NESTED_BLOCKSIZE = 256
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class NF4FormatError(ValueError):
    """A checkpoint or tensor that is not a usable NF4 weight."""


def _dynamic_map_values() -> list[float]:
    # bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`:
    # a sign, a unary exponent and a linear fraction; same arithmetic so the fp32 table
    # is bit-identical to the one stored in checkpoints as `nested_quant_map`.
    data: list[float] = []
    max_exp, non_sign_bits = 7, 7
    for i in range(max_exp):
        items = 2 ** (i + non_sign_bits - max_exp) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return data


@lru_cache(maxsize=None)
def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor on `device` (cached, shared)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 fp32 values), cached per device."""
    return torch.tensor(_dynamic_map_values(), dtype=torch.float32, device=device)


def _nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # Index of the nearest level of a sorted table, ties to the upper level (bitsandbytes' 4-bit rule).
    return torch.bucketize(scaled, (table[:-1] + table[1:]) / 2, out_int32=True).to(torch.uint8)


_LUT_SIZE = 65536


@lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device | str) -> torch.Tensor:
    # bitsandbytes quantizes 8-bit blockwise values through a table over 65536 evenly spaced
    # points of [-1, 1], each holding the index of the first level whose upper midpoint is not
    # below it. Mirrored here so that the nested absmax codes are bit-identical.
    code = dynamic_map(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / (_LUT_SIZE - 1)
    return torch.bucketize(grid, midpoints).to(torch.uint8)


def _dynamic_code(scaled: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """8-bit dynamic-map codes of values already scaled into [-1, 1] (bitsandbytes' rounding)."""
    index = ((scaled.clamp(-1.0, 1.0) + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _dynamic_lut(scaled.device)[index]
    zero_block = _expand_blocks(absmax == 0, codes.numel(), blocksize)
    return codes.masked_fill_(zero_block, 0)  # bitsandbytes writes code 0 for all-zero blocks


def _blockwise_absmax_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax of a flat fp32 tensor and the values scaled into [-1, 1]."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def _expand_blocks(per_block: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    return per_block.repeat_interleave(blocksize)[:n]


@dataclass(eq=False)
class NF4Weight:
    """One NF4-quantized linear weight of logical shape [N, K] (out_features, in_features).

    Tensors (all on one device):
      codes    uint8 [N*K/2]      two 4-bit codes per byte, even element in the high nibble
      absmax   uint8 [blocks]     double-quantized block absmax (fp32 [blocks] when not nested)
      absmax2  fp32 [groups]      scale of each group of `nested_blocksize` absmax codes
      code2    fp32 [256]         dynamic map decoding `absmax` (shared tensor when standard)
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: float = 0.0
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        # Kernels read the codes as 16-byte vectors of uint32 words: keep them aligned even
        # when they arrive as a view into a larger buffer (a slice of a checkpoint).
        if not self.codes.is_contiguous() or self.codes.data_ptr() % 16:
            self.codes = self.codes.contiguous().clone()

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def resident_bytes(self) -> int:
        """Bytes this weight holds on its device (tables shared between weights excluded)."""
        own = [self.codes, self.absmax] + ([self.absmax2] if self.nested else [])
        return sum(t.numel() * t.element_size() for t in own)

    def to(self, device: torch.device | str) -> NF4Weight:
        device = torch.device(device)
        return replace(
            self,
            codes=self.codes.to(device),
            absmax=self.absmax.to(device),
            absmax2=None if self.absmax2 is None else self.absmax2.to(device),
            code2=None if self.code2 is None else _share_standard_map(self.code2.to(device)),
        )

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block, decoded from the double quantization."""
        if not self.nested:
            return self.absmax.float()
        scale = _expand_blocks(self.absmax2, self.absmax.numel(), self.nested_blocksize)
        absmax = self.code2[self.absmax.long()] * scale
        absmax += self.offset  # same fp32 operation order as bitsandbytes
        return absmax

    # --- bitsandbytes / transformers serialization -------------------------------------

    def to_bnb(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The state-dict entries transformers writes for this `Linear4bit` weight."""
        meta = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        out = {
            prefix: self.codes.reshape(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": nf4_levels(self.device).clone(),
        }
        if self.nested:
            meta.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                nested_offset=self.offset,
            )
            out[f"{prefix}.nested_absmax"] = self.absmax2
            out[f"{prefix}.nested_quant_map"] = self.code2.clone()
        packed_meta = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = packed_meta.to(self.device)
        return out

    @classmethod
    def from_bnb(cls, state: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
        """Read a bitsandbytes 4-bit weight from state-dict entries (nested or not)."""
        if prefix not in state:
            raise NF4FormatError(f"missing tensor {prefix!r}")
        meta_keys = [k for k in state if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(meta_keys) != 1:
            raise NF4FormatError(
                f"expected one '{prefix}.quant_state.bitsandbytes__<type>' entry, found {meta_keys or 'none'}"
            )
        quant_type = meta_keys[0].rsplit("__", 1)[1]
        if quant_type != "nf4":
            raise NF4FormatError(
                f"{prefix}: quant type {quant_type!r} is not supported; loraplex serves NF4 checkpoints "
                "(quantize with bnb_4bit_quant_type='nf4')"
            )
        try:
            meta = json.loads(bytes(state[meta_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise NF4FormatError(f"{meta_keys[0]}: unreadable quant state ({e})") from e
        if meta.get("quant_type", "nf4") != "nf4":
            raise NF4FormatError(f"{prefix}: quant type {meta['quant_type']!r} is not supported (nf4 only)")

        def need(key: str) -> torch.Tensor:
            if key not in state:
                raise NF4FormatError(f"missing tensor {key!r}")
            return state[key]

        shape = tuple(int(s) for s in meta["shape"])
        if len(shape) != 2:
            raise NF4FormatError(f"{prefix}: expected a 2-D weight, found shape {shape}")
        blocksize = int(meta["blocksize"])
        if blocksize not in _VALID_BLOCKSIZES:
            raise NF4FormatError(f"{prefix}: invalid blocksize {blocksize}")
        dtype = getattr(torch, meta["dtype"], None)
        if dtype not in _DTYPE_NAMES:
            raise NF4FormatError(f"{prefix}: unsupported dtype {meta['dtype']!r}")
        n = shape[0] * shape[1]
        codes = need(prefix).reshape(-1)
        if codes.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. bf16 for FSDP)
            codes = codes.contiguous().view(torch.uint8)
        if codes.numel() != (n + 1) // 2:
            raise NF4FormatError(
                f"{prefix}: {codes.numel()} code bytes do not fit shape {list(shape)} "
                f"(expected {(n + 1) // 2})"
            )
        quant_map = need(f"{prefix}.quant_map")
        if not torch.equal(quant_map.cpu().float(), nf4_levels("cpu")):
            raise NF4FormatError(f"{prefix}.quant_map is not the NF4 code book")
        blocks = -(-n // blocksize)
        absmax = need(f"{prefix}.absmax").reshape(-1)
        if absmax.numel() != blocks:
            raise NF4FormatError(f"{prefix}.absmax: expected {blocks} values, found {absmax.numel()}")

        nested = f"{prefix}.nested_absmax" in state
        if not nested:
            return cls(codes=codes, absmax=absmax.float(), shape=shape, dtype=dtype, blocksize=blocksize)
        if absmax.dtype != torch.uint8:
            raise NF4FormatError(f"{prefix}.absmax: nested absmax must be uint8, found {absmax.dtype}")
        nested_blocksize = int(meta["nested_blocksize"])
        absmax2 = need(f"{prefix}.nested_absmax").reshape(-1).float()
        if absmax2.numel() != -(-blocks // nested_blocksize):
            raise NF4FormatError(
                f"{prefix}.nested_absmax: expected {-(-blocks // nested_blocksize)} values, found {absmax2.numel()}"
            )
        code2 = need(f"{prefix}.nested_quant_map").reshape(-1).float()
        if code2.numel() != 256:
            raise NF4FormatError(f"{prefix}.nested_quant_map: expected 256 values, found {code2.numel()}")
        return cls(
            codes=codes,
            absmax=absmax,
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            absmax2=absmax2,
            code2=_share_standard_map(code2),
            offset=float(meta["nested_offset"]),
            nested_blocksize=nested_blocksize,
        )


def _share_standard_map(code2: torch.Tensor) -> torch.Tensor:
    """Replace a checkpoint's copy of the standard dynamic map by the shared cached one."""
    standard = dynamic_map(code2.device)
    return standard if torch.equal(code2, standard) else code2


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D float weight [N, K] to NF4, bit-exact with bitsandbytes' `quantize_4bit`.

    Runs with PyTorch ops on the weight's own device.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_nf4 expects a 2-D weight [out, in], got shape {list(weight.shape)}")
    if weight.dtype not in _DTYPE_NAMES:
        raise ValueError(f"quantize_nf4 supports float32/float16/bfloat16 weights, got {weight.dtype}")
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {_VALID_BLOCKSIZES}, got {blocksize}")
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax_scale(flat, blocksize)
    q = _nearest_code(scaled, nf4_levels(weight.device))
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    codes = (q[0::2] << 4) | q[1::2]
    result = NF4Weight(
        codes=codes, absmax=absmax, shape=tuple(weight.shape), dtype=weight.dtype, blocksize=blocksize
    )
    if not double_quant:
        return result
    offset = absmax.mean()
    code2 = dynamic_map(weight.device)
    absmax2, scaled2 = _blockwise_absmax_scale(absmax - offset, NESTED_BLOCKSIZE)
    return replace(
        result,
        absmax=_dynamic_code(scaled2, absmax2, NESTED_BLOCKSIZE),
        absmax2=absmax2,
        code2=code2,
        offset=offset.item(),
    )


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [N, K] weight that `q` encodes, in `dtype` (default: the original dtype)."""
    n = q.shape[0] * q.shape[1]
    nibbles = torch.stack([q.codes >> 4, q.codes & 0xF], dim=1).reshape(-1)[:n]
    values = nf4_levels(q.device)[nibbles.long()]
    values *= _expand_blocks(q.block_absmax(), n, q.blocksize)
    return values.view(q.shape).to(dtype or q.dtype)
