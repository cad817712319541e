"""Runs the CUDA glue of every op without a GPU: each op's CUDA kernel is called through
``redispatch`` with CPU tensors, which its argument checks must refuse with a RuntimeError naming the
argument (not a crash). Loads the module built by .ci/build_cuda.sh; usage: python cuda_glue_errors.py _C.so
"""

import sys

import torch

torch.ops.load_library(sys.argv[1])
cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
ops = torch.ops.ddpm_fast
x = torch.randn(2, 64, 4, 4)
calls = {
    "group_norm_silu": (ops.group_norm_silu.default, (x, 3, None, None, 1e-5, None, True), "x must be a CUDA tensor"),
    "attention": (ops.attention.default, (x, x, x, None), "q must be a CUDA tensor"),
    "scheduler_step": (ops.scheduler_step.default, (x, x, None, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, None),
                       "sample must be a CUDA tensor"),
}
for name, (op, args, expected) in calls.items():
    try:
        op.redispatch(cuda, *args)
    except RuntimeError as e:
        assert expected in str(e), f"{name}: unexpected message: {e}"
        print(f"{name} (CUDA kernel, CPU input): RuntimeError: {str(e).splitlines()[0]}")
    else:
        raise SystemExit(f"{name}: the CUDA kernel accepted CPU tensors")
