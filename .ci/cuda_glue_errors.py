"""Checks the registrations of a build against the sources, and runs the CUDA glue of every op without a GPU.

    python cuda_glue_errors.py BUILD_DIR CSRC_DIR

Loads BUILD_DIR's _C*.so (schemas, CPU kernels) and libddpm_fast_cuda.so (CUDA kernels) into torch, then:
1. The ops registered are exactly the schemas of CSRC_DIR/ops.cpp, and each has a CPU / CUDA kernel exactly
   when CSRC_DIR/cpu/*.cpp / CSRC_DIR/cuda/*.cu register one (nothing here is a hand-kept list).
2. Each op's CUDA kernel, called through ``redispatch`` with CPU tensors built from its schema, must refuse them
   with a RuntimeError "<op> (CUDA): <argument> must be a CUDA tensor, got device cpu" naming one of its
   tensor arguments (an exception thrown from the glue must not crash the process).
"""

from __future__ import annotations

import glob
import os
import re
import sys

import torch

build, csrc = sys.argv[1], sys.argv[2]


def _read(pattern: str) -> str:
    return "".join(open(p).read() for p in sorted(glob.glob(os.path.join(csrc, pattern))))


schemas = re.findall(r'm\.def\("(\w+)\(', _read("ops.cpp"))
cpu_impls = set(re.findall(r'm\.impl\("(\w+)"', _read("cpu/*.cpp")))
cuda_impls = set(re.findall(r'm\.impl\("(\w+)"', _read("cuda/*.cu")))
assert schemas, f"no m.def(...) schema found in {csrc}/ops.cpp"
assert len(set(schemas)) == len(schemas), f"duplicate schemas: {schemas}"
assert cuda_impls <= set(schemas) and cpu_impls <= set(schemas), (cpu_impls, cuda_impls, schemas)

(c_so,) = glob.glob(os.path.join(build, "_C*.so"))
torch.ops.load_library(c_so)
torch.ops.load_library(os.path.join(build, "libddpm_fast_cuda.so"))

registered = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ddpm_fast::"))
assert registered == sorted(schemas), f"registered ops {registered} != schemas in ops.cpp {sorted(schemas)}"
for name in schemas:
    for key, impls in (("CPU", cpu_impls), ("CUDA", cuda_impls)):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_fast::{name}", key)
        assert has == (name in impls), f"{name}: {key} kernel registered={has}, in the sources={name in impls}"
print(f"ops: {len(schemas)} schemas; CPU kernels for {sorted(cpu_impls)}; CUDA kernels for {sorted(cuda_impls)}")


def _arg(a: torch._C.Argument):
    t = str(a.type)
    if t == "Tensor":
        return torch.randn(2, 64, 4, 4)
    if t.endswith("?") or t.startswith("Optional["):
        return None
    return {"float": 1.0, "int": 1, "bool": True}[t]


cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
for name in sorted(cuda_impls):
    op = getattr(torch.ops.ddpm_fast, name).default
    tensor_args = [a.name for a in op._schema.arguments if "Tensor" in str(a.type)]
    args = [_arg(a) for a in op._schema.arguments]
    try:
        op.redispatch(cuda, *args)
    except RuntimeError as e:
        m = re.match(rf"{name} \(CUDA\): (\w+) must be a CUDA tensor, got device cpu", str(e))
        assert m and m.group(1) in tensor_args, f"{name}: unexpected message: {e}"
        print(f"{name} (CUDA kernel, CPU input): RuntimeError: {str(e).splitlines()[0]}")
    else:
        raise SystemExit(f"{name}: the CUDA kernel accepted CPU tensors")
