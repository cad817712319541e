#!/usr/bin/env bash
# CI step: one wheel, another torch. The wheel is built ONCE, with `pip wheel --no-build-isolation` against the
# setup venv's torch (2.13.0, CPU build; it reuses setup.sh's CMake build dir, so no second compile), then
# installed UNCHANGED into a fresh venv holding torch 2.14.1 (the CUDA build on local disk, which runs CPU ops),
# and the op tests and the pipeline-against-diffusers tests run there, from outside the checkout, against the
# installed wheel. The stable ABI is what makes that work; the old exact-version build refused to load.
# The fresh venv is left in place for .ci/build_cuda.sh (which needs torch 2.14.1 too).
#
#   VENV=.venv bash .ci/wheel_check.sh
#
# Environment (all optional): VENV (the build venv, default .venv), WHEEL_CI_DIST (default
# /tmp/ddpm_fast-ci-dist), WHEEL_CI_VENV (the fresh venv, default /tmp/ddpm_fast-ci-wheel-venv),
# WHEEL_CI_TORCH (default torch==2.14.1).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
venv=${VENV:-.venv}
dist=${WHEEL_CI_DIST:-/tmp/ddpm_fast-ci-dist}
fresh=${WHEEL_CI_VENV:-/tmp/ddpm_fast-ci-wheel-venv}
other_torch=${WHEEL_CI_TORCH:-torch==2.14.1}
start=$(date +%s)
step() { echo "== wheel_check [$(( $(date +%s) - start )) s] $*"; }
built_with=$("$venv/bin/python" -c "import torch; print(torch.__version__)")

rm -rf "$dist" "$fresh"
step "building the wheel against torch $built_with ($venv)"
"$venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps . -w "$dist"
wheel=$(ls "$dist"/ddpm_fast-*.whl)
step "wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1)): $("$venv/bin/python" -c "import sys, zipfile; print(' '.join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(('.so', '_build_info.py'))))" "$wheel")"

step "fresh venv $fresh with $other_torch"
python3 -m venv "$fresh"
pip=("$fresh/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "$other_torch" "diffusers==0.42.1" pytest pytest-timeout numpy pillow safetensors tqdm
"${pip[@]}" "$wheel"  # unchanged, with its dependencies (all satisfied already: torch>=2.10)
step "installed $(basename "$wheel") next to torch $("$fresh/bin/python" -c 'import torch; print(torch.__version__)')"

# Outside the checkout, so only the installed wheel can be imported.
cd /tmp
"$fresh/bin/python" - "$built_with" <<'PY'
import sys
import torch, ddpm_fast, ddpm_fast.ops as ops
from ddpm_fast import _native
from ddpm_fast.weights import shipped_model_path
assert "site-packages" in ddpm_fast.__file__, ddpm_fast.__file__
assert torch.__version__ != sys.argv[1], "the second venv must hold another torch than the wheel was built with"
assert ops.native_available(), f"the wheel's native kernels did not load: {_native.load_error()}"
c = _native.load()
assert c.torch_version == sys.argv[1], (c.torch_version, sys.argv[1])
x = torch.randn(1, 64, 5, 7)
y = ops.group_norm_silu(x, 8, None, None, 1e-5)
ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 8, eps=1e-5))
torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
pipe = ddpm_fast.DDPMPipeline.from_pretrained(shipped_model_path())
print(f"== wheel check: ddpm_fast {ddpm_fast.__version__} built against torch {c.torch_version} (for torch >= "
      f"{_native.target_version()}) loads with torch {torch.__version__}: native kernels ({_native.cpu_isa()}), "
      f"CUDA kernels: {_native.has_cuda()} ({_native.cuda_error()}); shipped model loads: {type(pipe).__name__}")
PY

# The op tests (none may be skipped: the native kernels must be what runs) and the pipeline against diffusers.
log=$(mktemp)
"$fresh/bin/python" -m pytest -q -p no:cacheprovider -p no:logging -rs "$repo/tests/test_ops.py" | tee "$log"
if grep -qE "[0-9]+ skipped" "$log"; then
  echo "wheel_check: FAILED: op tests were skipped under $other_torch" >&2
  exit 1
fi
"$fresh/bin/python" -m pytest -q -p no:cacheprovider -p no:logging "$repo/tests/test_pipeline.py" | tail -3
step "OK: the wheel built against torch $built_with passed the op and pipeline tests under $other_torch"
