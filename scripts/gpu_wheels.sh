#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels the lent GPU machine lacks, for CPython 3.12
# x86_64 manylinux: that machine (the device tool's nvidia-h200 kind, /work/.library/device/)
# has torch 2.11 cu130, triton, transformers, peft, safetensors, prometheus-client, httpx,
# pytest, numpy, click ... but not bitsandbytes, llguidance, fastapi, uvicorn, starlette, pydantic,
# pydantic-core or openai, and nothing can be downloaded there. bench/gpu_check.py installs
# them there with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
#
#   bash scripts/gpu_wheels.sh        # then: device run, carry [".whl"], python3 bench/gpu_check.py --out $OUT
#
# Versions: what .venv has installed (2026-12-01), inside pyproject.toml's ranges; one
# version of each. Beside the missing packages it carries the small pure-python ones whose
# version the image may not satisfy (typing-extensions >= 4.16 for pydantic, anyio >= 4.10
# and idna >= 3.18 for openai/httpx2, h11 >= 0.16 for httpcore2, annotated-doc for fastapi):
# /tmp/site comes first on PYTHONPATH, so these versions win.
#
# llguidance 1.9.1 (structured output; imported by the engine and the server) is built for
# manylinux_2_31 (glibc >= 2.31), hence that platform tag below; the image's torch 2.11 cu130
# needs glibc >= 2.28 itself, so this is the one wheel that asks more of the image.
#
# bitsandbytes 0.50.2 ships one native library per CUDA, ROCm and XPU version (43 MB as
# a wheel); the machine's torch is cu130, so the wheel is rewritten keeping only the CPU and
# CUDA 13.x libraries (and dropping the others' RECORD lines), about 4 MB.
#
# Everything that travels to the machine (tracked + untracked-not-ignored files + .whl) must
# stay under 64 MiB: the script prints the sizes and fails beyond that.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
LIMIT_BYTES=$((64 << 20))
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

WHEELS=(
    bitsandbytes==0.50.2
    llguidance==1.9.1
    fastapi==0.165.0
    starlette==1.10.0
    uvicorn==0.54.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    annotated-doc==0.0.7
    opentelemetry-api==1.45.2
    anyio==4.16.0
    idna==3.20
    h11==0.16.0
    sniffio==1.3.1
    openai==3.57.0
    httpx2==2.16.2
    httpcore2==2.16.2
    truststore==0.10.5
    jiter==0.19.0
)
# What the wheels above require and the machine's image already has (KINDS.md's list)
IMAGE_HAS="torch numpy packaging click certifi"

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${WHEELS[@]}"

# Rewrite bitsandbytes without the native libraries of other CUDA/ROCm/XPU versions, drop
# wheels not pinned above (older downloads), and check that every requirement of every wheel
# is met by another wheel here or by the image, with one version of each.
"$PY" - "$DEST" "$IMAGE_HAS" "${WHEELS[@]}" <<'EOF'
import email.parser
import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

dest, image = Path(sys.argv[1]), set(sys.argv[2].split())
pins = dict(p.split("==") for p in sys.argv[3:])
pins = {canonicalize_name(k): v for k, v in pins.items()}
KEEP_SO = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda13\d)\.so$")  # torch there is cu130
TARGET = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
              platform_system="Linux", platform_machine="x86_64", os_name="posix",
              implementation_name="cpython", platform_python_implementation="CPython", extra="")


def name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonicalize_name(name), version


def slim_bitsandbytes(path: Path) -> None:
    with zipfile.ZipFile(path) as src:
        names = src.namelist()
        drop = {n for n in names if n.endswith(".so") and not KEEP_SO.search(n)}
        if not drop:
            return  # already slimmed
        before = path.stat().st_size
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in drop).encode()
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(path)
    print(f"slimmed {path.name}: dropped {len(drop)} native libraries (other CUDA/ROCm/XPU versions), "
          f"{before / 2**20:.1f} -> {path.stat().st_size / 2**20:.1f} MiB")


wheels = {}
for path in sorted(dest.glob("*.whl")):
    name, version = name_version(path)
    if pins.get(name) != version:
        print(f"removed {path.name} (not pinned in scripts/gpu_wheels.sh)")
        path.unlink()
        continue
    if name in wheels:
        sys.exit(f"two wheels of {name}: {wheels[name].name} and {path.name}")
    wheels[name] = path
    if name == "bitsandbytes":
        slim_bitsandbytes(path)

missing = sorted(set(pins) - set(wheels))
problems = [f"no wheel downloaded for {n}=={pins[n]}" for n in missing]
for name, path in wheels.items():
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(TARGET):
            continue  # an extra, or another Python/platform
        dep = canonicalize_name(req.name)
        if dep in wheels:
            if not req.specifier.contains(name_version(wheels[dep])[1], prereleases=True):
                problems.append(f"{name} needs {req}, the wheel here is {wheels[dep].name}")
        elif dep not in image:
            problems.append(f"{name} needs {req}: neither a wheel here nor in the GPU image")
if problems:
    sys.exit("wheel set incomplete:\n  " + "\n  ".join(problems))
print(f"{len(wheels)} wheels, every requirement met by a wheel here or by the image ({', '.join(sorted(image))})")
EOF

wheels_bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
              | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((wheels_bytes + tree_bytes))
ls -l "$DEST"/*.whl | awk '{printf "  %9.2f MiB  %s\n", $5 / 1048576, $9}'
printf '%s: %.1f MiB of wheels; with the working tree (%.1f MiB) %.1f MiB travel, limit %d MiB\n' \
    "$DEST" "$(echo "$wheels_bytes / 1048576" | bc -l)" "$(echo "$tree_bytes / 1048576" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)" $((LIMIT_BYTES >> 20))
if ((total > LIMIT_BYTES)); then
    echo "too large: the device tool carries at most 64 MiB (working tree + .whl)" >&2
    exit 1
fi
