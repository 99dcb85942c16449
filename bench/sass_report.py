"""Static report on the NF4, LoRA, attention (decode and prefill) and fused kernels as compiled for Hopper (sm_90), no GPU needed.

Compiles each kernel ahead of time with Triton for `cuda:90`, disassembles the cubin with
the `cuobjdump` bundled with Triton, and prints per plan: registers, spills, shared memory,
and the instruction mix of the innermost loop per iteration and per weight byte (global
loads by width, shared-memory traffic and barriers, shuffles, FMAs, tensor-core MMAs).
Narrow byte loads, layout conversions through shared memory in the loop, and spills show
up here before any GPU time is spent. The fused elementwise kernels (add + RMSNorm, SiLU *
up, rotary + KV write) have no loop: their counts are over the whole kernel, and /B per byte
a thread reads or writes.

    python bench/sass_report.py                 # default plans for Llama-2-7B shapes
    python bench/sass_report.py --dump DIR      # also keep SASS/TTGIR per plan
    python bench/sass_report.py --check         # exit 1 on a compile error or register spill
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sass_report: unset TRITON_INTERPRET; this compiles the kernels for sm_90")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from loraplex.kernels import attention as attn  # noqa: E402
from loraplex.kernels import fused  # noqa: E402
from loraplex.kernels import lora  # noqa: E402
from loraplex.kernels import lora_paged  # noqa: E402
from loraplex.kernels import nf4_matmul as mm  # noqa: E402
from loraplex.kernels import prefill_attention as prefill  # noqa: E402
from loraplex.kernels import runtime  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
H100_SMS = 132
POINTERS = {"out_ptr": "*bf16", "n_blocks": "i32", "x_ptr": "*bf16", "codes_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32",
            "code2_ptr": "*fp32", "levels_ptr": "*fp32", "offset": "fp32", "bias_ptr": "*bf16",
            "y_ptr": "*bf16", "ws_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32",
            "K": "i32", "KH": "i32"}
# Integer arguments Triton would see as multiples of 16 at run time (Llama shapes).
DIVISIBLE_BY_16 = ("out_ptr", "x_ptr", "codes_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "levels_ptr",
                   "bias_ptr", "y_ptr", "ws_ptr", "ticket_ptr", "N", "K", "KH")


LORA_SIGNATURE = {  # both LoRA kernels; names not in a kernel's parameters are ignored
    "x_ptr": "*bf16", "a_ptr": "*bf16", "h_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16",
    "scaling_ptr": "*fp32", "rank_ptr": "*i32", "slice_starts_ptr": "*i32", "order_ptr": "*i32",
    "tile_slot_ptr": "*i32", "tile_row_ptr": "*i32", "seg_start_ptr": "*i32", "seg_len_ptr": "*i32",
    "ws_ptr": "*fp32", "ticket_ptr": "*i32", "T": "i32", "K": "i32", "LR": "i32", "R": "i32",
    "stride_as": "i32", "stride_bs": "i32", "stride_scaling": "i32", "stride_rank": "i32", "stride_y": "i32",
}


def compile_sm90(kernel, types: dict[str, str], constexprs: dict, aligned: tuple[str, ...] = (), **options):
    """Compile `kernel` for sm_90 as a launch would: its arguments typed from `types` (every
    parameter but the constexprs must be there), `constexprs` fixed, and the pointers and the
    integer arguments in `aligned` marked as multiples of 16 (Triton specializes on that at
    launch)."""
    params = kernel.arg_names
    signature = {name: types[name] for name in params if name not in constexprs}
    signature.update({name: "constexpr" for name in constexprs})
    marked = [n for n in signature if signature[n].startswith("*") or n in aligned]
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n in marked}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_lora(kind: str, split_k: int = 1):
    """Compile a LoRA kernel for sm_90 with the tiles `lora.py` uses for Llama shapes."""
    kernel = {"lora_shrink": lora._lora_shrink_kernel, "lora_expand": lora._lora_expand_kernel}[kind]
    constexprs = dict(BLOCK_M=16, BLOCK_R=16, DOT_FP32=False)
    constexprs.update(dict(BLOCK_K=256, SPLIT_K=split_k) if kind == "lora_shrink" else dict(BLOCK_N=128))
    # the sizes that are multiples of 16 for Llama shapes
    return compile_sm90(kernel, LORA_SIGNATURE, constexprs, ("K", "LR", "R", "stride_as", "stride_bs", "stride_y"),
                        num_warps=4)


# The paged kernels read A and B through the page table: pages, table and the slot records'
# column views (strides of the pool's [S, 3, C] info and [S, C] scaling) replace the stacks.
PAGED_SIGNATURE = {**LORA_SIGNATURE, "pages_ptr": "*bf16", "table_ptr": "*i32", "a_start_ptr": "*i32",
                   "b_start_ptr": "*i32", "stride_a_start": "i32", "stride_b_start": "i32"}
PAGED_W = 256       # Llama-2-7B's page width: gcd(4096, 11008)
PAGED_R = 256       # the server's rank bound: h has 256 columns per slice
PAGED_BLOCK_R = 64  # lora_paged._rank_tile at that bound


def compile_paged(kind: str, split_k: int = 1):
    """Compile a paged LoRA kernel for sm_90 as `lora_paged.py` launches it for Llama-2-7B at
    the server's rank bound: 16-token tiles, 64-row rank tiles, K chunks and N tiles of one page."""
    kernel = {"paged_shrink": lora_paged._paged_shrink_kernel, "paged_expand": lora_paged._paged_expand_kernel}[kind]
    constexprs = dict(PAGE_W=PAGED_W, BLOCK_M=16, BLOCK_R=PAGED_BLOCK_R, DOT_FP32=False)
    constexprs.update(dict(BLOCK_K=256, SPLIT_K=split_k) if kind == "paged_shrink" else dict(BLOCK_N=128))
    # multiples of 16 for Llama shapes: K, h's width, R, y's row; the records' row strides
    # (3 * C and C for C = 7 slices x 32 layers)
    return compile_sm90(kernel, PAGED_SIGNATURE, constexprs,
                        ("K", "LR", "R", "stride_y", "stride_rank", "stride_a_start", "stride_b_start",
                         "stride_scaling"), num_warps=4)


ATTENTION_SIGNATURE = {  # both attention kernels; names not in a kernel's parameters are ignored
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
    "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "scale_log2": "fp32", "stride_qb": "i32",
    "stride_qh": "i32", "stride_bt": "i32", "stride_pos": "i32", "Hq": "i32",
}
ATTENTION_D = 128  # Llama-7B decode: Hq = 32, Hkv = 32 (G = 1) or 8 (G = 4), block size 16, bf16


def compile_attention(plan: mm.Plan):
    """Compile a paged decode attention kernel for sm_90 as `attention.py` launches it:
    plan.block_m is the query-head group G, plan.split_k the KV splits."""
    if plan.kind == "attention":
        kernel = attn._paged_decode_kernel
        # the output (or, split, the fp32 partials) and the m/l partials share out_ptr's slot
        out = "*bf16" if plan.split_k == 1 else "*fp32"
        constexprs = dict(G=plan.block_m, BLOCK_G=attn.group_rows(plan.block_m), BLOCK_N=plan.block_n,
                          BLOCK_SIZE=16, D=ATTENTION_D, SPLIT=plan.split_k, DOT_FP32=False)
    else:
        kernel, out = attn._split_combine_kernel, "*bf16"
        constexprs = dict(D=ATTENTION_D, SPLIT=plan.split_k)
    # the strides that are multiples of 16
    return compile_sm90(kernel, {**ATTENTION_SIGNATURE, "out_ptr": out}, constexprs,
                        ("stride_qb", "stride_qh", "stride_pos"), num_warps=plan.num_warps,
                        num_stages=plan.num_stages)


PREFILL_SIGNATURE = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cu_seqlens_ptr": "*i32", "context_lens_ptr": "*i32",
    "block_tables_ptr": "*i32", "out_ptr": "*bf16", "scale_log2": "fp32", "num_chunks": "i32",
    "search_steps": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32", "stride_oh": "i32",
    "stride_bt": "i32", "stride_pos": "i32",
}
# multiples of 16 for Llama-7B/8B (q rows of Hq * D or the fused qkv width, heads of D = 128,
# stride_pos = Hkv * D); num_chunks, search_steps and stride_bt are never specialized
PREFILL_ALIGNED = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_pos")


def prefill_plan(group: int) -> mm.Plan:
    """The prefill kernel as `paged_prefill_attention` launches it for D = 128, block size 16:
    plan.block_m is the query-head group G, block_k the tile's query positions (BLOCK_M),
    block_n its key positions (BLOCK_N)."""
    block_m, block_n = prefill.prefill_tiles(group, ATTENTION_D)
    rows = max(16, block_m * prefill._pow2(group))
    return mm.Plan("prefill_attention", block_m=group, block_n=block_n, block_k=block_m,
                   num_warps=prefill.prefill_warps(rows, ATTENTION_D), num_stages=prefill.NUM_STAGES)


def compile_prefill(plan: mm.Plan):
    """Compile the paged prefill attention kernel for sm_90 (bf16, D = 128, block size 16)."""
    kernel, group, block_m = prefill._paged_prefill_kernel, plan.block_m, plan.block_k
    g_pad = prefill._pow2(group)
    constexprs = dict(G=group, G_PAD=g_pad, BLOCK_M=block_m, ROWS=max(16, block_m * g_pad), BLOCK_N=plan.block_n,
                      BLOCK_SIZE=16, D=ATTENTION_D, DOT_FP32=False)
    return compile_sm90(kernel, PREFILL_SIGNATURE, constexprs, PREFILL_ALIGNED, num_warps=plan.num_warps,
                        num_stages=plan.num_stages)


FUSED_SIGNATURE = {  # the three fused kernels; names not in a kernel's parameters are ignored
    "x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "new_res_ptr": "*bf16",
    "stride_x": "i32", "stride_res": "i32", "H": "i32", "eps": "fp32", "I": "i32",
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
    "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "slot_ptr": "*i64", "q_out_ptr": "*bf16",
    "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32",
    "stride_vh": "i32", "stride_cos": "i32", "stride_sin": "i32", "Hq": "i32", "Hkv": "i32",
}
# Integer arguments that are multiples of 16 for Llama-7B (H 4096, I 11008, fused qkv rows,
# D 128); Hkv is not (8).
FUSED_ALIGNED = ("stride_x", "stride_res", "H", "I", "stride_qt", "stride_qh", "stride_kt", "stride_kh",
                 "stride_vt", "stride_vh", "stride_cos", "stride_sin", "Hq")
FUSED_HQ, FUSED_D = 32, 128  # Llama-7B rotary: 32 query heads of 128; plan.block_m is Hkv


def fused_launch(plan: mm.Plan) -> tuple[dict, int]:
    """Constexprs and warps `fused.py` launches a fused kernel with: plan.block_n is H for
    the norm, I for silu_mul; plan.block_m is Hkv for rope_write_kv."""
    if plan.kind == "fused_add_rms_norm":
        block, warps = fused.norm_config(plan.block_n)
        return dict(HAS_RESIDUAL=True, BLOCK=block, EXACT_BF16=False), warps
    if plan.kind == "fused_silu_mul":
        block, warps = fused.silu_config(plan.block_n)
        return dict(BLOCK=block, EXACT_BF16=False), warps
    block_h, block_half, warps = fused.rope_config(FUSED_D, FUSED_HQ, plan.block_m)
    return dict(D=FUSED_D, BLOCK_HALF=block_half, BLOCK_H=block_h, EXACT_BF16=False), warps


def fused_bytes_per_thread(plan: mm.Plan) -> float:
    """Bytes one thread reads or writes, on average over the programs of one row / token."""
    constexprs, warps = fused_launch(plan)
    if plan.kind == "fused_add_rms_norm":  # x, residual, weight in; normed, new residual out
        return 5 * 2 * plan.block_n / (32 * warps)
    if plan.kind == "fused_silu_mul":  # gate, up in; out
        programs = -(-plan.block_n // constexprs["BLOCK"])
        return 3 * 2 * plan.block_n / (programs * 32 * warps)
    hkv, block_h = plan.block_m, constexprs["BLOCK_H"]
    programs = -(-FUSED_HQ // block_h) + -(-hkv // block_h)
    # q in and out, k in and out, v in and out, and cos and sin per program
    moved = 2 * 2 * FUSED_D * (FUSED_HQ + 2 * hkv) + programs * 2 * 2 * FUSED_D
    return moved / (programs * 32 * warps)


def compile_fused(plan: mm.Plan):
    """Compile a fused elementwise kernel for sm_90 as `fused.py` launches it (bf16)."""
    kernel = {"fused_add_rms_norm": fused._add_rms_norm_kernel, "fused_silu_mul": fused._silu_mul_kernel,
              "fused_rope_write_kv": fused._rope_write_kv_kernel}[plan.kind]
    constexprs, warps = fused_launch(plan)
    return compile_sm90(kernel, FUSED_SIGNATURE, constexprs, FUSED_ALIGNED, num_warps=warps, enable_fp_fusion=False)


def compile_plan(plan: mm.Plan):
    """Compile one plan's kernel for sm_90; plan.kind 'dequant' is the cublas path's kernel."""
    kernel = {"gemv": mm._nf4_gemv_kernel, "gemm": mm._nf4_gemm_kernel, "dequant": mm._nf4_dequant_kernel}[plan.kind]
    constexprs = dict(NESTED=True, NESTED_BLOCK=256)
    if plan.kind == "dequant":
        constexprs.update(BLOCKS=64)
    else:
        constexprs.update(HAS_BIAS=False, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, SPLIT_K=plan.split_k)
    if plan.kind == "gemm":
        constexprs.update(BLOCK_M=plan.block_m, GROUP_M=8, DOT_FP32=False)
    return compile_sm90(kernel, POINTERS, constexprs, DIVISIBLE_BY_16, num_warps=plan.num_warps,
                        num_stages=plan.num_stages)


def innermost_loop(sass: list[str], needs: tuple[str, ...] = ()) -> list[str]:
    """Instructions of the shortest backward-branch loop body (the K loop); with `needs`, of
    the shortest that contains one of these opcodes (the prefill kernel's KV loop, not its
    binary search over the chunks)."""
    addr = {}
    for i, line in enumerate(sass):
        if m := re.match(r"\s*/\*([0-9a-f]{4,})\*/", line):
            addr[int(m.group(1), 16)] = i
    best: list[str] = []
    for i, line in enumerate(sass):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", line)
        if m and m.group(1):
            target = int(m.group(1), 16)
            here = re.match(r"\s*/\*([0-9a-f]+)\*/", line)
            if here and target < int(here.group(1), 16) and target in addr:
                body = sass[addr[target]: i + 1]
                if needs and not any(re.search(rf"\b{op}\b", x) for x in body for op in needs):
                    continue
                if not best or len(body) < len(best):
                    best = body
    return best


def opcode_mix(lines: list[str]) -> Counter:
    mix: Counter = Counter()
    for line in lines:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base == "LDG":
            width = next((w for w in ("128", "64", "U16", "S16", "U8", "S8") if f".{w}" in op), "32")
            mix[f"LDG.{width}"] += 1
        elif base in ("LDS", "STS", "BAR", "SHFL", "FFMA", "FMUL", "FADD", "HMMA", "HGMMA", "ATOMG",
                      "RED", "PRMT", "LOP3", "SHF", "I2F", "F2F", "F2FP"):
            mix[base] += 1
        mix["all"] += 1
    return mix


def report(plan: mm.Plan, dump: Path | None) -> dict:
    if plan.kind.startswith("lora"):
        compiled = compile_lora(plan.kind, plan.split_k)
    elif plan.kind.startswith("paged"):
        compiled = compile_paged(plan.kind, plan.split_k)
    elif plan.kind.startswith("attention"):
        compiled = compile_attention(plan)
    elif plan.kind == "prefill_attention":
        compiled = compile_prefill(plan)
    elif plan.kind.startswith("fused"):
        compiled = compile_fused(plan)
    else:
        compiled = compile_plan(plan)
    cubin = Path("/tmp") / f"loraplex_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([TOOLS / "cuobjdump", "--dump-resource-usage", cubin],
                           capture_output=True, text=True).stdout
    sass = subprocess.run([TOOLS / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    cubin.unlink()
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        stem = f"{plan.kind}_m{plan.block_m}_n{plan.block_n}_k{plan.block_k}_s{plan.split_k}_w{plan.num_warps}"
        (dump / f"{stem}.sass").write_text(sass)
        (dump / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    straight = plan.kind.startswith("fused")  # no loop: count the whole kernel
    needs = ("HMMA", "HGMMA") if plan.kind == "prefill_attention" else ()
    loop = opcode_mix(sass.splitlines() if straight else innermost_loop(sass.splitlines(), needs))
    # weight bytes one program reads per loop iteration
    code_bytes = {"dequant": 64 * 32, "lora_shrink": 16 * 256 * 2, "lora_expand": 128 * 16 * 2,
                  "paged_shrink": PAGED_BLOCK_R * 256 * 2, "paged_expand": 128 * PAGED_BLOCK_R * 2,
                  "attention": 2 * plan.block_n * ATTENTION_D * 2,  # attention: a K and a V tile
                  "prefill_attention": 2 * plan.block_n * ATTENTION_D * 2}.get(
        plan.kind, plan.block_n * plan.block_k // 2)
    threads = 32 * plan.num_warps
    per_thread = fused_bytes_per_thread(plan) if straight else code_bytes / threads
    return dict(plan=plan, regs=regs, local=spill, shared=compiled.metadata.shared, loop=loop,
                per_thread_bytes=per_thread)


def default_plans() -> list[mm.Plan]:
    runtime.num_sms = lambda device: H100_SMS
    shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
    plans = {mm.heuristic_plan(n, k, m, torch.device("cuda")) for n, k in shapes for m in (1, 16, 64, 256)}
    plans = {p for p in plans if p.kind != "cublas"} | {mm.Plan("dequant", num_warps=4)}
    plans |= {mm.Plan("lora_shrink", split_k=1), mm.Plan("lora_shrink", split_k=4), mm.Plan("lora_expand")}
    plans |= {mm.Plan("paged_shrink", split_k=1), mm.Plan("paged_shrink", split_k=4), mm.Plan("paged_expand")}
    # paged decode attention, Llama-7B: G = 1 (Hkv = 32) and G = 4 (Hkv = 8), without and with
    # KV splits (batch-1 long context), and the split combine
    block_n = attn.block_n_for(ATTENTION_D)
    warps = dict(num_warps=attn.NUM_WARPS, num_stages=attn.NUM_STAGES)
    plans |= {mm.Plan("attention", block_m=g, block_n=block_n, split_k=s, **warps)
              for g in (1, 4) for s in (1, 8)}
    plans |= {mm.Plan("attention_combine", block_n=0, split_k=8, num_warps=attn.NUM_WARPS)}
    # paged prefill attention, Llama-7B/8B: Hq 32 over Hkv 32 (G = 1) and Hkv 8 (G = 4)
    plans |= {prefill_plan(g) for g in (1, 4)}
    # fused elementwise ops, Llama-7B (H 4096, I 11008, Hq 32, Hkv 8 or 32, D 128) and the
    # norm of a 70B (H 8192); plan.num_warps is what fused.py launches with
    plans |= {mm.Plan("fused_add_rms_norm", block_n=h, num_warps=fused.norm_config(h)[1])
              for h in (4096, 8192)}
    plans |= {mm.Plan("fused_silu_mul", block_n=11008, num_warps=fused.silu_config(11008)[1])}
    plans |= {mm.Plan("fused_rope_write_kv", block_m=hkv, block_n=0,
                      num_warps=fused.rope_config(FUSED_D, FUSED_HQ, hkv)[2]) for hkv in (8, 32)}
    return sorted(plans, key=lambda p: (p.kind, p.block_m, p.block_n, p.block_k, p.split_k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", type=Path, help="write SASS and TTGIR per plan into this folder")
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel fails to compile or spills")
    args = parser.parse_args()
    failed = []
    cols = ["LDG.128", "LDG.64", "LDG.32", "LDG.U16", "LDG.U8", "LDS", "STS", "BAR", "SHFL", "FFMA", "HMMA", "HGMMA"]
    print(f"triton {triton.__version__}, target sm_90; loop counts are per iteration of the K loop, "
          "and /B per weight byte a thread handles")
    print(f"| plan | regs | spill B | smem B | B/thread/iter | {' | '.join(cols)} | all | all/B |")
    print("|" + "---|" * (len(cols) + 7))
    for plan in default_plans():
        try:
            r = report(plan, args.dump)
        except Exception as e:  # a compile error: report it, keep going
            failed.append(f"{plan}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if r["local"]:
            failed.append(f"{plan}: spills {r['local']} bytes to local memory")
        if plan.kind.startswith("lora"):
            name = f"{plan.kind} 16x16 s{plan.split_k}"
        elif plan.kind.startswith("paged"):
            name = f"{plan.kind} 16x{PAGED_BLOCK_R} W{PAGED_W} R{PAGED_R} s{plan.split_k}"
        elif plan.kind == "attention":
            name = f"attention G{plan.block_m} n{plan.block_n} d{ATTENTION_D} s{plan.split_k} w{plan.num_warps}"
        elif plan.kind == "prefill_attention":
            name = (f"prefill_attention G{plan.block_m} m{plan.block_k} n{plan.block_n} d{ATTENTION_D} "
                    f"w{plan.num_warps} (KV loop, no mask)")
        elif plan.kind == "attention_combine":
            name = f"attention_combine d{ATTENTION_D} s{plan.split_k}"
        elif plan.kind == "fused_add_rms_norm":
            name = f"fused add_rms_norm H{plan.block_n} w{plan.num_warps} (whole kernel)"
        elif plan.kind == "fused_silu_mul":
            name = f"fused silu_mul I{plan.block_n} w{plan.num_warps} (whole kernel)"
        elif plan.kind == "fused_rope_write_kv":
            name = (f"fused rope_write_kv Hq{FUSED_HQ} Hkv{plan.block_m} d{FUSED_D} w{plan.num_warps} "
                    "(whole kernel)")
        else:
            name = f"{plan.kind} {plan.block_m}x{plan.block_n}x{plan.block_k} s{plan.split_k} w{plan.num_warps}"
        loop = r["loop"]
        if not loop["all"]:  # straight-line kernel (dequant): nothing per iteration to count
            print(f"| {name} | {r['regs']} | {r['local']} | {r['shared']} | no K loop |" + " |" * (len(cols) + 2))
            continue
        per_b = loop["all"] / r["per_thread_bytes"]
        print(f"| {name} | {r['regs']} | {r['local']} | {r['shared']} | {r['per_thread_bytes']:.0f} | "
              + " | ".join(str(loop[c]) for c in cols) + f" | {loop['all']} | {per_b:.1f} |")
    for line in failed:
        print("FAILED", line)
    if args.check and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
