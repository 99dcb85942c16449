"""Make a new LoRA adapter out of weighted existing ones, as peft's `add_weighted_adapter` does.

`merge_adapters(sources, method)` gives, module by module, the delta peft 0.21's
`LoraModel.add_weighted_adapter(..., combination_type=method)` gives for the same adapters and
weights. peft's merged adapter has r == lora_alpha (scaling 1): every source's scaling
s_i = alpha_i / r_i (or / sqrt(r_i)) and weight w_i are folded into the new A and B.

- linear, ties, dare_linear, dare_ties merge the *factors*: the A's with weights
  sign(w_i s_i) sqrt|w_i s_i| and the B's with sqrt|w_i s_i|, so the new delta has cross
  terms B_i A_j and is not the weighted sum of deltas (peft calls linear "a very rough
  approximation"). All sources must have the same rank in a module.
  ties keeps the top `density` fraction of each factor by magnitude, elects a sign per entry
  from the unweighted pruned factors (sum: "total"; count: "frequency") and averages the
  weighted entries that agree with it. dare_* drop entries at random (keep probability
  `density`, survivors divided by `density`), then sum (dare_linear) or go on as ties does.
- cat is exact: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], rank = sum of ranks.
- svd is the exact weighted sum of deltas truncated to `rank` (default: the largest source rank).
- A source that does not target a module contributes nothing there; the result covers the
  union of the sources' modules.
- With a single source peft merges linearly whatever the method (no pruning, no randomness):
  the delta is w * delta_1 at the source's rank. Same here, except for svd (below).

Where this differs from peft, on purpose:
- peft copies use_rslora from the first source into the merged config, so if that source uses
  rsLoRA its merged delta comes out sqrt(new r) times too large (a known peft bug, fixed
  upstream after 0.21). Here the scaling is always 1: the weighted merge peft means to make.
- Equal ranks are checked per module, where peft compares each config's largest rank: peft
  refuses e.g. a rank-8 q_proj adapter with a rank-4 v_proj adapter, which merge fine here.
- The union of modules is taken from the modules themselves; peft unions target_modules but
  keeps the first source's layers_to_transform / exclude_modules, which can drop modules.
- cat's rank is the sum of the ranks present in the module; peft pads every module with zero
  rows up to the sum of all the sources' largest ranks (same delta).
- svd computes the SVD from QR factors of the stacked B's and A's (exact, fast for 7B shapes)
  instead of a dense full SVD; it gives peft's delta, not peft's factors (singular vectors
  are unique only up to sign). A module's rank is at most the rank of its exact sum, where
  peft fills up to `rank` with near-zero singular directions. With a single source it still
  truncates to `rank`; peft ignores svd_rank there.
- Everything is computed in float32 on the CPU and the result is float32 (peft merges in the
  adapters' dtype). DARE draws from a CPU torch.Generator seeded with `seed`, never the global
  RNG, in peft's order (modules by layer then projection; all A's, then all B's), so with
  the global generator in the same state when peft's merge loop starts the masks are the
  same. (peft first builds the new adapter's layers, which draws from the global generator,
  so seeding right before add_weighted_adapter does not reproduce them.)
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .peft_format import _MODULE_RE, LINEAR_NAMES, AdapterError, LoRAAdapter, ModuleLoRA, _module_order

MERGE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")
_USE_DENSITY = ("ties", "dare_linear", "dare_ties")
_SIGN_METHODS = ("total", "frequency")
# Every source is worked on as float32 on the CPU, and the result is as large again (cat):
# this bounds the sources' float32 bytes, so one request cannot exhaust host memory.
MAX_MERGE_BYTES = 8 << 30
MAX_MERGE_SOURCES = 64


class MergeError(AdapterError):
    """Sources or options that cannot be merged; the message names the module or option."""


def merge_adapters(
    sources: list[tuple[LoRAAdapter, float]],
    method: str,
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    max_rank: int | None = None,
    max_bytes: int = MAX_MERGE_BYTES,
) -> LoRAAdapter:
    """A new adapter merging `sources` (adapter, weight) with `method` (see the module doc).

    `rank`: svd's output rank (default: the largest source rank). `density` in (0, 1]: the
    fraction kept by ties / dare_*. `seed`: dare's random masks. `max_rank`: refuse a result
    with a module above this rank. `max_bytes`: refuse sources larger than this as float32.
    Sources are not modified; everything is checked first.
    """
    weights = _check_options(sources, method, rank, density, majority_sign_method, seed, max_rank)
    adapters = [adapter for adapter, _ in sources]
    check_merge_size(len(adapters), sum(_fp32_bytes(adapter) for adapter in adapters), max_bytes)
    # what was asked, for the result's config
    settings = {"method": method, "weights": weights, "rank": rank, "density": density}
    if method in ("ties", "dare_ties"):
        settings["majority_sign_method"] = majority_sign_method
    if method.startswith("dare"):
        settings["seed"] = seed
    if rank is None:
        rank = max(adapter.max_rank for adapter in adapters)
    if len(adapters) == 1 and method != "svd":
        method = "linear"  # as peft: one source is merged linearly whatever the method

    # module -> the (lora, weight) of the sources that target it, in source order
    plan: dict[str, list[tuple[ModuleLoRA, float]]] = {}
    for i, adapter in enumerate(adapters):
        for key, lora in adapter.modules.items():
            _check_module(i, key, lora)
            plan.setdefault(key, []).append((lora, weights[i]))
    for key in plan:
        _check_compatible(key, plan[key], method, rank, max_rank)

    generator = torch.Generator().manual_seed(seed) if method.startswith("dare") else None
    merged = {}
    for key in sorted(plan, key=_module_order):  # peft's module order, which DARE's draws follow
        entries = [(_fp32(lora), w) for lora, w in plan[key]]
        if method == "cat":
            a, b = _cat(entries)
        elif method == "svd":
            a, b = _svd(entries, rank)
        else:
            a, b = _merge_factors(entries, method, density, majority_sign_method, generator)
        merged[key] = ModuleLoRA(a=a.contiguous(), b=b.contiguous(), scaling=1.0)

    r = max(m.rank for m in merged.values())
    # alpha == r: scaling 1, as peft writes it; the exact per-module ranks are in `modules`
    settings = {k: v for k, v in settings.items() if v is not None}
    return LoRAAdapter(merged, {"peft_type": "LORA", "r": r, "lora_alpha": r, "merge": settings})


# ----------------------------------------------------------------------------------------
# Checks: all of them run before any merging
# ----------------------------------------------------------------------------------------


def check_merge_size(num_sources: int, nbytes: int, max_bytes: int = MAX_MERGE_BYTES) -> None:
    """Refuse a merge of too many or too large sources; callable before they are read."""
    if num_sources > MAX_MERGE_SOURCES:
        raise MergeError(f"a merge takes at most {MAX_MERGE_SOURCES} sources, found {num_sources}")
    if nbytes > max_bytes:
        raise MergeError(
            f"the sources hold {nbytes} bytes as float32, more than the merge limit of {max_bytes} "
            "bytes; merge fewer or smaller adapters"
        )


def _fp32_bytes(adapter: LoRAAdapter) -> int:
    return sum(4 * (m.a.numel() + m.b.numel()) for m in adapter.modules.values())


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_options(sources, method, rank, density, majority_sign_method, seed, max_rank) -> list[float]:
    if method not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {method!r}; expected one of {', '.join(MERGE_METHODS)}")
    if not isinstance(sources, (list, tuple)) or not sources:
        raise MergeError("sources: expected a non-empty list of (LoRAAdapter, weight) pairs")
    weights = []
    for i, source in enumerate(sources):
        if not (isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], LoRAAdapter)):
            found = type(source).__name__
            raise MergeError(f"source {i}: expected a (LoRAAdapter, weight) pair, found {found}")
        adapter, weight = source
        if not adapter.modules:
            raise MergeError(f"source {i}: the adapter has no modules")
        if not (isinstance(weight, Real) and not isinstance(weight, bool) and math.isfinite(weight)):
            raise MergeError(f"source {i}: weight must be a finite number, found {weight!r}")
        weights.append(float(weight))

    if rank is not None and method != "svd":
        raise MergeError(f"rank applies only to method 'svd', not {method!r}")
    if rank is not None and not (_is_int(rank) and rank >= 1):
        raise MergeError(f"rank must be an integer >= 1, found {rank!r}")
    if method in _USE_DENSITY:
        if density is None:
            raise MergeError(f"method {method!r} needs density, the fraction of entries kept, in (0, 1]")
        if not (isinstance(density, Real) and not isinstance(density, bool) and 0 < density <= 1):
            raise MergeError(f"density must be a number in (0, 1], found {density!r}")
    elif density is not None:
        raise MergeError(f"density applies only to methods {', '.join(_USE_DENSITY)}, not {method!r}")
    if majority_sign_method not in _SIGN_METHODS:
        found = majority_sign_method
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', found {found!r}")
    if not (_is_int(seed) and 0 <= seed < 2**64):
        raise MergeError(f"seed must be an integer in [0, 2**64), found {seed!r}")
    if max_rank is not None and not (_is_int(max_rank) and max_rank >= 1):
        raise MergeError(f"max_rank must be an integer >= 1, found {max_rank!r}")
    return weights


def _check_module(i: int, key: str, lora: ModuleLoRA) -> None:
    match = _MODULE_RE.fullmatch(key) if isinstance(key, str) else None
    if match is None or match.group(2) not in LINEAR_NAMES:
        names = ", ".join(LINEAR_NAMES)
        raise MergeError(f"source {i}: module key {key!r} is not 'layers.<i>.<one of {names}>'")
    a, b = lora.a, lora.b
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] < 1 or b.shape[1] != a.shape[0]:
        raise MergeError(
            f"source {i}, module {key}: expected a [r, in] and b [out, r], "
            f"found a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise MergeError(f"source {i}, module {key}: expected float tensors, found {a.dtype} and {b.dtype}")
    if not math.isfinite(lora.scaling):
        raise MergeError(f"source {i}, module {key}: scaling {lora.scaling!r} is not finite")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise MergeError(f"source {i}, module {key}: a or b contains NaN or infinite values")


def _check_compatible(key, entries, method, rank, max_rank) -> None:
    shapes = {(lora.b.shape[0], lora.a.shape[1]) for lora, _ in entries}
    if len(shapes) > 1:
        raise MergeError(f"module {key}: the sources disagree on its (out, in) shape: {sorted(shapes)}")
    ranks = [lora.rank for lora, _ in entries]
    if method in _SAME_RANK and len(set(ranks)) > 1:
        raise MergeError(
            f"module {key}: method {method!r} needs the same rank in every source, found ranks {ranks}; "
            f"use 'cat' (exact, rank {sum(ranks)}) or 'svd' (exact sum truncated to a chosen rank)"
        )
    if method == "cat":
        out_rank = sum(ranks)
    elif method == "svd":
        out_rank = min(rank, sum(ranks), *shapes.pop())
    else:
        out_rank = ranks[0]
    if max_rank is not None and out_rank > max_rank:
        hint = f"; use 'svd' with rank <= {max_rank}" if method != "svd" else ""
        raise MergeError(f"module {key}: merged rank {out_rank} exceeds max_rank {max_rank}{hint}")


# ----------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------


def _fp32(lora: ModuleLoRA) -> ModuleLoRA:
    to = dict(device="cpu", dtype=torch.float32)
    return ModuleLoRA(a=lora.a.detach().to(**to), b=lora.b.detach().to(**to), scaling=lora.scaling)


def _cat(entries) -> tuple[torch.Tensor, torch.Tensor]:
    # B_cat @ A_cat = sum_i w_i s_i B_i A_i exactly
    a = torch.cat([lora.a * (w * lora.scaling) for lora, w in entries], dim=0)
    b = torch.cat([lora.b for lora, _ in entries], dim=1)
    return a, b


def _svd(entries, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of B_cat @ A_cat without forming it: QR of both sides, SVD of the R x R core."""
    a_cat, b_cat = _cat(entries)
    qb, rb = torch.linalg.qr(b_cat)  # [out, p], [p, R]
    qa, ra = torch.linalg.qr(a_cat.T)  # [in, q], [q, R]
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # delta = (qb u) diag(s) (vh qa^T)
    k = min(rank, s.numel())
    # as peft: the singular values go to B, A has orthonormal rows
    return vh[:k] @ qa.T, (qb @ u[:, :k]) * s[:k]


def _merge_factors(entries, method, density, sign_method, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's factor-wise merge: weight and scaling split as square roots over A and B."""
    products = [w * lora.scaling for lora, w in entries]
    # the sign goes on A only, or it would cancel out in B @ A; float32 like peft's torch.tensor
    weights_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in products])
    weights_b = torch.tensor([math.sqrt(abs(x)) for x in products])
    # all A's before all B's: the order of peft's random draws
    a = _combine([lora.a for lora, _ in entries], weights_a, method, density, sign_method, generator)
    b = _combine([lora.b for lora, _ in entries], weights_b, method, density, sign_method, generator)
    return a, b


def _combine(tensors, weights, method, density, sign_method, generator) -> torch.Tensor:
    if density is not None and density < 1:  # density 1 prunes nothing and draws nothing
        if method == "ties":
            tensors = [_keep_largest(t, density) for t in tensors]
        elif method.startswith("dare"):
            tensors = [_drop_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, 1, 1)
    if method in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    # ties, dare_ties: average the entries whose sign agrees with the elected sign; the vote
    # uses the unweighted tensors, as peft's does
    vote = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(vote >= 0, 1.0, -1.0)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    mask = torch.zeros(t.numel())
    mask[torch.topk(t.abs().flatten(), k=k).indices] = 1
    return t * mask.view(t.shape)


def _drop_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    # the same draws as peft's torch.bernoulli(torch.full_like(t, density)) from that state
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density
