#!/usr/bin/env bash
# CI step: `pip wheel --no-build-isolation .` gives a wheel that installs and imports in a fresh venv holding
# only the same torch. The wheel reuses setup.sh's CMake build (pyproject's build-dir), so this
# costs a venv and a torch install, not a second compile.
#
#   VENV=.venv bash .ci/wheel_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
dist=${WHEEL_CI_DIST:-/tmp/ddpm_fast-ci-dist}
fresh=${WHEEL_CI_VENV:-/tmp/ddpm_fast-ci-wheel-venv}
torch_version=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")

rm -rf "$dist" "$fresh"
"$venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps . -w "$dist"
wheel=$(ls "$dist"/ddpm_fast-*.whl)
echo "== wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

python3 -m venv "$fresh"
pip=("$fresh/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==$torch_version"
"${pip[@]}" "$wheel"
# Outside the checkout, so only the installed wheel can be imported.
cd /tmp
"$fresh/bin/python" - <<'PY'
import torch, ddpm_fast, ddpm_fast.ops as ops
from ddpm_fast.weights import shipped_model_path
assert "site-packages" in ddpm_fast.__file__, ddpm_fast.__file__
assert ops.native_available(), "the wheel's native kernels did not load"
x = torch.randn(1, 64, 5, 7)
y = ops.group_norm_silu(x, 8, None, None, 1e-5)
ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 8, eps=1e-5))
torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
pipe = ddpm_fast.DDPMPipeline.from_pretrained(shipped_model_path())
print("== wheel check: ddpm_fast", ddpm_fast.__version__, "imports with torch", torch.__version__,
      "native kernels loaded, shipped model loads:", type(pipe).__name__)
PY
