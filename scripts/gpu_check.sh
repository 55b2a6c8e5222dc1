#!/usr/bin/env bash
# Prove every CUDA path on a GPU machine, in one command, from the repository root:
#
#   scripts/gpu_check.sh                 # logs and the timing table in benchmarks/
#   OUT=/some/dir scripts/gpu_check.sh   # ... or in $OUT (a remote runner's output folder)
#
# Steps (each timed, each PASS / FAIL / SKIP in the summary at the end):
#   1. environment: a Python with torch (PYTHON=..., else .venv/bin/python, else python3); the
#      modules the CUDA tests import are checked and only the missing ones installed: from wheels in
#      $WHEELS (default .whl, installed into $OUT-independent /tmp/compress-gpu-site with --no-deps),
#      else from the package index (`make install` style, pip's own timeout); a machine without an
#      index and without the wheels is reported, not waited on;
#   2. nvidia-smi;
#   3. pytest -m cuda over every test file that marks tests `cuda` (tests/cuda/, ...);
#   4. the end-to-end CUDA recipe recipes/cuda_e2e.yaml through the CLI, then its checkpoint
#      reloaded on CUDA and its test accuracy compared with the report's;
#   5. benchmarks/gpu_bench.py: CUDA-event timings of fp32 vs AMP training steps and fp16 / bf16 /
#      int8_weight_only inference (resnet18/50, vit_b_16, 224 px, batch 1 and 64) -> gpu_results.md.
# Exit status: 0 when every step passed (or, without CUDA, "no CUDA: skipped"), 1 when any failed.
# Budget on one H100: about 3 minutes; the step timeouts add up to 8 minutes.
#
# Wheels for a machine without an index (run where pip reaches one; the GPU image's Python is 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl torchao zstandard pydantic pydantic-core annotated-types typing-inspection
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: >"$LOG"
WHEELS="${WHEELS:-.whl}"
SITE=/tmp/compress-gpu-site
WORK="$(mktemp -d /tmp/compress-gpu-check.XXXXXX)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
declare -a SUMMARY=()
FAILED=0

say() { echo "gpu_check: $*" | tee -a "$LOG"; }
record() { # record NAME STATUS SECONDS [NOTE]
  SUMMARY+=("$(printf '%-12s %-5s %5ss  %s' "$1" "$2" "$3" "${4:-}")")
  [ "$2" = FAIL ] && FAILED=1
  return 0
}
step() { # step NAME TIMEOUT_S COMMAND...: run, log, record PASS/FAIL
  local name=$1 limit=$2 t0 rc
  shift 2
  say "== $name: $*"
  t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local note=""
  [ "$rc" = 124 ] && note="timed out after ${limit}s"
  [ "$rc" != 0 ] && [ -z "$note" ] && note="exit $rc"
  record "$name" "$([ "$rc" = 0 ] && echo PASS || echo FAIL)" "$(($(date +%s) - t0))" "$note"
}
finish() {
  {
    echo
    echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), output in $OUT):"
    printf '  %s\n' "${SUMMARY[@]}"
  } | tee -a "$LOG" | tee "$OUT/gpu_check_summary.txt"
  rm -rf "$WORK"
  exit "$FAILED"
}

# ---------------------------------------------------------------- 1. environment
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d "$SITE" ]; then export PYTHONPATH="$PYTHONPATH:$SITE"; fi

has_cuda() { # a GPU is there: nvidia-smi lists one, or this Python's torch sees one
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then return 0; fi
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}
if ! has_cuda; then
  say "no CUDA: skipped (no nvidia-smi GPU, and ${PY}'s torch sees no CUDA device)"
  record all SKIP 0 "no CUDA: skipped"
  finish
fi

t0=$(date +%s)
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  if [ ! -x .venv/bin/python ] && command -v make >/dev/null 2>&1; then
    say "no torch for $PY: trying make install (needs the package index)"
    timeout 600 make install 2>&1 | tee -a "$LOG" && PY=.venv/bin/python
  fi
fi
# module -> pip requirement (pyproject.toml's ranges); the CUDA tests import all of them
REQUIRED="torch:torch torchvision:torchvision typer:typer yaml:pyyaml rich:rich pydantic:pydantic
safetensors:safetensors zstandard:zstandard numpy:numpy sklearn:scikit-learn matplotlib:matplotlib
onnx:onnx onnxruntime:onnxruntime onnxscript:onnxscript torchao:torchao>=0.14,<0.19
torchmetrics:torchmetrics>=1.4,<2 pytest:pytest"
missing() { # the pairs whose module this Python cannot find (found, not imported: fast)
  # shellcheck disable=SC2086
  "$PY" -c 'import importlib.util as u, sys
for pair in sys.argv[1:]:
    if u.find_spec(pair.split(":")[0]) is None:
        print(pair)' $REQUIRED 2>/dev/null || echo "$REQUIRED"
}
MISSING=$(missing)
if [ -n "$MISSING" ]; then
  say "missing: $(echo "$MISSING" | cut -d: -f1 | tr '\n' ' ')"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing the wheels in $WHEELS into $SITE (--no-deps, no index)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    read -ra SPECS <<<"$(echo "$MISSING" | cut -d: -f2- | tr '\n' ' ')"
    say "installing from the package index: ${SPECS[*]}"
    "$PY" -m pip install -q --timeout 15 --retries 1 "${SPECS[@]}" 2>&1 | tail -3 | tee -a "$LOG"
  fi
  MISSING=$(missing)
fi
if [ -n "$MISSING" ]; then
  record environment FAIL "$(($(date +%s) - t0))" \
    "still missing: $(echo "$MISSING" | cut -d: -f1 | tr '\n' ' ')(no index reachable? carry wheels in $WHEELS)"
  say "cannot run the CUDA checks without those modules"
  finish
fi
say "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'))"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  record environment FAIL "$(($(date +%s) - t0))" "a GPU is present but ${PY}'s torch sees no CUDA device"
  finish
fi
record environment PASS "$(($(date +%s) - t0))"

# ---------------------------------------------------------------- 2. the GPU
step nvidia-smi 30 nvidia-smi

# ---------------------------------------------------------------- 3. the cuda tests
# tests/cuda (its `device` fixture marks the CUDA half of every test there) and any other test file
# that marks tests `cuda`
mapfile -t CUDA_FILES < <( (echo tests/cuda; grep -rlE 'pytest\.mark\.cuda' tests --include='test_*.py' |
  grep -v '^tests/cuda/') | sort -u)
say "test files with cuda tests: ${CUDA_FILES[*]}"
step pytest-cuda 240 "$PY" -m pytest -p no:cacheprovider -m cuda -rs -q --junitxml="$OUT/pytest_cuda.xml" "${CUDA_FILES[@]}"

# ---------------------------------------------------------------- 4. the end-to-end recipe
e2e() {
  "$PY" -m compress_cli run recipes/cuda_e2e.yaml --output "$WORK/cuda_e2e" --force || return 1
  cp "$WORK/cuda_e2e/report.md" "$OUT/cuda_e2e_report.md"
  "$PY" - "$WORK/cuda_e2e" <<'EOF'
import json, sys
import torch
import compress_cli
from compress_cli.runtime.measure import evaluate
from compress_cli.runtime.runners import EagerRunner
from compress_cli.testing import digits_bundle

out = sys.argv[1]
report = json.load(open(f"{out}/report.json"))
model = compress_cli.load(f"{out}/model")
data = digits_bundle(seed=0, batch_size=64)
acc = evaluate(EagerRunner(model, torch.device("cuda")), data.loader("test"), data.get_task())["accuracy"]
want = report["final"]["accuracy"]
print(f"reloaded on CUDA: test accuracy {acc:.4f}, the report's {want:.4f}; notes: "
      + " | ".join(f"{s['type']}: {s['notes']}" for s in report["stages"]))
sys.exit(0 if abs(acc - want) <= 1 / len(data.test_dataset) + 1e-9 else 1)
EOF
}
export -f e2e
export PY WORK OUT
step recipe 90 bash -c e2e

# ---------------------------------------------------------------- 5. timings
step benchmark 150 "$PY" benchmarks/gpu_bench.py --out "$OUT"

finish
