#!/usr/bin/env bash
# Set up a virtual environment with ddpm_fast built from this checkout.
#   bash scripts/setup.sh           # runtime: torch (CPU build), the package and its native kernels
#   bash scripts/setup.sh --test    # + test dependencies (diffusers 0.42.1 as the oracle, pytest, scikit-learn,
#                                   #   the benchmarks' peers ONNX Runtime and OpenVINO, ruff)
# VENV=path chooses the environment (default: .venv in the repository root); PYTHON chooses the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
python=${PYTHON:-python3}
torch_pin=${TORCH_PIN:-torch==2.13.0}   # pinned: the CPU build on local disk, not a multi-GB CUDA download

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "$torch_pin" numpy pillow safetensors tqdm scikit-build-core pybind11 "cmake>=3.26" ninja
if [ "${1:-}" = "--test" ]; then
  "${pip[@]}" pytest pytest-timeout "diffusers==0.42.1" scikit-learn huggingface_hub \
    onnxruntime openvino onnx onnxscript "ruff==0.17.6"
else
  "${pip[@]}" scikit-learn
fi
# --no-build-isolation: the fast path. The extension (stable ABI: it loads on any torch >= 2.10) is compiled
# against the torch installed above instead of a fresh copy (GBs with CUDA) that pip would fetch into an
# isolated build environment; CMake's build dir (build/<wheel tag>) is reused by later installs.
"${pip[@]}" --no-build-isolation --no-deps .
"$venv/bin/python" -c "import ddpm_fast, ddpm_fast.ops as o; print('ddpm_fast', ddpm_fast.__version__, 'native kernels:', o.native_available() if hasattr(o, 'native_available') else 'n/a')"
