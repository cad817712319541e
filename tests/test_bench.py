"""The benchmark entry points at tiny sizes: they run, time every variant side by side and write the JSON the
README's figures come from (the full runs are in bench/ and take minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm_fast.ops
from ddpm_fast.bench import kernels as bench_kernels
from ddpm_fast.bench import sample as bench_sample

REPO = Path(__file__).resolve().parents[1]


def test_kernel_bench_writes_every_op_and_both_winograd_tiles(tmp_path, monkeypatch):
    # one small shape per op keeps this to seconds
    monkeypatch.setattr(bench_kernels, "GN_QUICK", [(1, 64, 8, 8)])
    monkeypatch.setattr(bench_kernels, "ATTN_QUICK", [(1, 1, 130, 16)])
    monkeypatch.setattr(bench_kernels, "CONV_QUICK", [(1, 64, 64, 16)])
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--quick", "--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    ops = {r["op"] for r in rows}
    assert {"group_norm_silu", "attention", "scheduler_step"} <= ops
    if ddpm_fast.ops.native_available():
        conv = [r for r in rows if r["op"] == "conv3x3_winograd"]
        assert sorted(r["tile"] for r in conv) == [2, 4]
    for r in rows:
        assert r["torch_ms"] > 0 and r["fused_ms"] > 0 and r["speedup"] == pytest.approx(r["torch_ms"] / r["fused_ms"])


def test_sample_bench_compares_with_diffusers(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    tiny = {
        "unet": {"sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
                 "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                 "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": None},
        "scheduler": dict(bench_sample.ARCHS["cifar10-32"]["scheduler"]),
    }
    monkeypatch.setitem(bench_sample.ARCHS, "tiny", {**bench_sample.ARCHS["cifar10-32"], **tiny})
    out = tmp_path / "sample.json"
    code = bench_sample.main(["--archs", "tiny", "--dtypes", "fp32", "--batches", "2", "--steps", "2", "--runs", "2",
                              "--variants", "ddpm_fast,diffusers_eager", "--json", str(out)])
    assert code == 0
    (row,) = json.loads(out.read_text())["results"]
    fast, ref = row["variants"]["ddpm_fast"], row["variants"]["diffusers_eager"]
    assert len(fast["ms_per_step"]) == 2 and fast["ms_per_step_median"] > 0
    assert ref["speedup_of_ddpm_fast"] == pytest.approx(ref["ms_per_step_median"] / fast["ms_per_step_median"])
    assert row["max_abs_diff_vs_ddpm_fast"]["diffusers_eager"] < 1e-3  # same images as diffusers


@pytest.mark.skipif(not ddpm_fast.ops.native_available(), reason="the Winograd op needs the native kernels")
def test_winograd_ab_script(tmp_path):
    out = tmp_path / "ab.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "winograd_ab.py"), "--arch", "cifar10-32", "--rounds", "1",
                    "--baseline", "f2", "--json", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["baseline"] == "f2" and set(result["ms_median"]) == {"winograd", "f2"}
    assert result["max_abs_diff"] < 1e-4 and torch.isfinite(torch.tensor(result["speedup"]))
