#!/usr/bin/env bash
# The GPU check as one command, for a GPU machine that has its own Python and torch but no network.
#
#   bench/gpu_check.sh prepare      # here, with pip's network: the wheels that machine lacks, into .whl/ (git-ignored)
#   bench/gpu_check.sh [ARGS...]    # there, from the repository root: install .whl/ into /tmp/site, run the check
#
# The wheels are the versions this checkout's .venv runs (diffusers, peft, bitsandbytes, importlib_metadata), for
# CPython 3.12 on x86-64 Linux; bitsandbytes is cut to its CPU and CUDA 13 libraries (43 MB -> 7 MB; 14 MB of wheels in all) so the
# whole tree stays far inside a 64 MiB transfer. With the workplace's device tool:
#   run(command="bench/gpu_check.sh", carry=[".whl"], timeout_s=420)
# It runs the SDXL training rows (`--arch sdxl`), then the SD 1.5 check; ARGS go to the latter (e.g. --methods lora,dora).
# Results: bench/results/gpu_check{_sdxl,}.{json,md}, also copied to $OUT when that is set (the device tool brings $OUT back).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
    py=.venv/bin/python
    versions=$($py - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("diffusers", "peft", "bitsandbytes", "importlib_metadata")))
EOF
)
    mkdir -p .git/info .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -f .whl/*.whl
    # shellcheck disable=SC2086
    $py -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl $versions
    $py - <<'EOF'
"""Drop bitsandbytes' libraries for CUDA 11/12, ROCm and XPU (the GPU machine runs CUDA 13), and their RECORD lines."""
import glob, os, re, zipfile
for path in glob.glob(".whl/bitsandbytes-*.whl"):
    unwanted = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
    slim = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if unwanted.search(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not unwanted.search(line.split(b",")[0].decode()))
            dst.writestr(item, data)
    os.replace(slim, path)
EOF
    du -ch .whl/*.whl
    exit 0
fi

if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
# SDXL's training rows first (about a minute), copied out at once: they come back even if the SD 1.5 checks run out
# of time. ARGS go to the SD 1.5 check.
python3 bench/gpu_check.py --arch sdxl || status=$?
if [[ -n "${OUT:-}" ]]; then
    cp bench/results/gpu_check_sdxl.json bench/results/gpu_check_sdxl.md "$OUT"/ 2>/dev/null || true
fi
python3 bench/gpu_check.py "$@" || status=$?
if [[ -n "${OUT:-}" ]]; then
    cp bench/results/gpu_check.json bench/results/gpu_check.md "$OUT"/ 2>/dev/null || true
fi
exit $status
