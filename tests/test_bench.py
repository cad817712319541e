"""The benchmark entry point ``python -m ddpm_fast.bench <subcommand>`` at tiny sizes (seconds each): every subcommand
runs, times every variant side by side, writes the JSON the README's figures come from, and its ratios and max |diff|
are consistent. ONNX Runtime and OpenVINO are timed when installed (CI installs them); torch.compile runs with the
"eager" backend (inductor's compile time is not for a test)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import ddpm_fast.ops
from ddpm_fast.bench import __main__ as bench_main
from ddpm_fast.bench import (
    common,
    engines,
    kernels,
    quality,
    sample,
    summary,
    unet,
    winograd,
)

NATIVE = ddpm_fast.ops.native_available()
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("diffusers", "onnxruntime", "openvino")}
needs_diffusers = pytest.mark.skipif(not HAVE["diffusers"], reason="diffusers is the benchmark's comparison")


def _load(path):
    report = json.loads(path.read_text())
    assert report["schema"] == common.SCHEMA and report["machine"] and report["environment"]["torch"]
    return report


def _check_ratios(entry, ref_entry):
    assert len(entry["ms"]) == len(ref_entry["ms"]) >= 2 and entry["ms_median"] > 0
    assert entry["speedup_of_ddpm_fast"] == pytest.approx(entry["ms_median"] / ref_entry["ms_median"])
    per_round = sorted(a / b for a, b in zip(entry["ms"], ref_entry["ms"]))
    assert per_round[0] - 1e-9 <= entry["speedup_of_ddpm_fast_per_round"] <= per_round[-1] + 1e-9


# -- shared code ----------------------------------------------------------------------------------------------


def test_interleaved_times_each_function_every_round_and_drops_a_failing_one():
    calls = []

    def boom():
        raise RuntimeError("broken")

    samples, errors = common.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": boom}, 3, warmup=1
    )
    assert set(samples) == {"a", "b"} and all(len(v) == 3 and min(v) > 0 for v in samples.values())
    assert errors == {"c": "RuntimeError: broken"}
    assert calls == ["a", "b"] * 5  # warm-up, sizing call, then a and b alternating in every round
    assert common.per_round_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 1.0]) == 4.0


def test_machine_names_follow_the_results_folders():
    assert common.cpu_machine_name("AMD EPYC 7B13 64-Core Processor", {"fma", "avx2"}) == "cpu-amd-epyc-avx2"
    assert common.cpu_machine_name("Intel(R) Xeon(R) Platinum 8480+", {"avx2", "avx512f"}) == "cpu-intel-xeon-avx512"
    assert common.cpu_machine_name("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", {"sse4_2"}) == "cpu-intel-core-generic"
    assert common.machine_name("cpu").startswith("cpu-")


def test_entry_point_lists_and_dispatches_every_subcommand(capsys):
    assert bench_main.main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in bench_main.SUBCOMMANDS:
        assert name in listed
        with pytest.raises(SystemExit) as exc:
            bench_main.main([name, "--help"])
        assert exc.value.code == 0
        assert "--json" in capsys.readouterr().out or name == "summary"
    assert bench_main.main(["nonsense"]) == 2
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_fast.bench", "unet", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--variants" in proc.stdout and "onnxruntime" in proc.stdout


# -- kernels --------------------------------------------------------------------------------------------------


def test_kernel_shapes_are_the_ones_the_unets_run():
    cifar = kernels.traced_layers("cifar10-32")
    assert set(cifar["attention"]) == {(1, 256, 256), (1, 16, 256)}  # 16x16 blocks and the 4x4 mid block
    big = kernels.traced_layers("256px")
    assert set(big["attention"]) == {(1, 256, 512), (1, 64, 512)}
    gn = {(v, c, h) for v, c, h, _w, _g, _e in cifar["group_norm_silu"]}
    assert {("temb", 128, 32), ("silu", 384, 32), ("plain", 256, 16), ("silu", 128, 32)} <= gn
    assert sum(cifar["group_norm_silu"].values()) == 51  # every GroupNorm of one forward
    cases = kernels.unet_cases([("256px", 8)], {"attention", "scheduler_step"})
    shapes = {(c["op"], c["variant"], tuple(c["shape"])) for c in cases}
    assert ("attention", "unet_views", (8, 1, 256, 512)) in shapes and (
        "attention",
        "contiguous",
        (8, 1, 64, 512),
    ) in shapes
    assert ("scheduler_step", "clip", (8, 3, 256, 256)) in shapes


@pytest.mark.skipif(not NATIVE, reason="the kernel benchmark times the native ops")
def test_kernel_bench_times_every_op_at_the_tiny_unets_shapes(tmp_path):
    out = tmp_path / "kernels.json"
    code = kernels.main(["--configs", "tiny:1", "--rounds", "2", "--min-time", "0", "--json", str(out)])
    assert code == 0
    report = _load(out)
    rows, skipped = report["results"], report["skipped"]
    expected = kernels.unet_cases([("tiny", 1)], set(kernels.OPS))
    timed_ops = {r["op"] for r in rows}
    skipped_ops = {s["op"]: s["reason"] for s in skipped}
    assert timed_ops | set(skipped_ops) == set(kernels.OPS) and not timed_ops & set(skipped_ops)
    if not hasattr(torch.ops.ddpm_fast, "scheduler_step_table"):
        assert "not in this build" in skipped_ops["scheduler_step_table"]
    for case in expected:
        if case["op"] in skipped_ops:
            continue
        got = [
            r
            for r in rows
            if r["op"] == case["op"]
            and r["shape"] == case["shape"]
            and (r["variant"] == case["variant"] or case["op"] == "conv3x3_winograd")
        ]
        assert len(got) == (2 if case["op"] == "conv3x3_winograd" else 1), case
    assert {r["variant"] for r in rows if r["op"] == "group_norm_silu"} == {"silu", "temb", "plain"}
    assert {r["variant"] for r in rows if r["op"] == "attention"} == {"unet_views", "contiguous"}
    for r in rows:
        assert "error" not in r, r
        assert r["torch_ms"] > 0 and r["fused_ms"] > 0 and r["speedup"] == pytest.approx(r["torch_ms"] / r["fused_ms"])
        assert (
            len(r["torch_ms_rounds"]) == 2
            and r["speedup_per_round"] > 0
            and r["used_by"] == [u for u in r["used_by"] if u.startswith("tiny b1")]
        )
        assert r["max_abs_diff"] < (2e-4 if r["op"] == "conv3x3_winograd" else 1e-4), r
    conv = [r for r in rows if r["op"] == "conv3x3_winograd"]
    assert conv and {r["tile"] for r in conv} == {2, 4}
    assert all(r["others"]["packed oneDNN"]["paths"] == ["conv:packed"] for r in conv)  # the baseline really ran packed
    step = next(r for r in rows if r["op"] == "scheduler_step")
    assert set(step["others"]) == {"diffusers DDPMScheduler.step", "ddpm_fast DDPMScheduler.step"} - (
        set() if HAVE["diffusers"] else {"diffusers DDPMScheduler.step"}
    )


@pytest.mark.skipif(not NATIVE, reason="the kernel benchmark times the native ops")
def test_kernel_bench_records_the_wrappers_routing_and_times_the_kernel_too(tmp_path):
    out = tmp_path / "kernels.json"
    assert (
        kernels.main(
            ["--configs", "cifar10-32:1", "--ops", "attention", "--rounds", "2", "--min-time", "0", "--json", str(out)]
        )
        == 0
    )
    rows = _load(out)["results"]
    short = [r for r in rows if r["shape"][2] < ddpm_fast.ops.CPU_ATTENTION_MIN_KEYS]
    long = [r for r in rows if r["shape"][2] >= ddpm_fast.ops.CPU_ATTENTION_MIN_KEYS]
    assert len(short) == len(long) == 2
    assert all("SDPA" in r["route"] and r["others"]["kernel"]["ms"] > 0 for r in short)
    assert all("route" not in r and "others" not in r for r in long)
    assert kernels.op_skip_reason("conv3x3_winograd", torch.device("cpu"), torch.float16) == "fp32-only op"


# -- unet and sample: the peers ---------------------------------------------------------------------------------

ALL_UNET = [
    "diffusers_eager",
    "diffusers_channels_last",
    "onnxruntime",
    "openvino",
    "diffusers_compile",
    "diffusers_compile_max_autotune",
    "ddpm_fast_compile",
    "ddpm_fast_reference",
    "ddpm_fast_noplans",
    "ddpm_fast",
]


def _check_peer_skips(variants):
    for name in ("onnxruntime", "openvino"):
        if HAVE[name]:
            assert "ms_median" in variants[name], variants[name]
            assert variants[name]["setup_s"] and variants[name]["info"]["version"]
        else:
            assert "not installed" in variants[name]["skipped"]


@needs_diffusers
def test_unet_bench_times_every_engine_against_diffusers(tmp_path):
    out = tmp_path / "unet.json"
    code = unet.main(
        [
            "--configs",
            "tiny:2",
            "--rounds",
            "2",
            "--compile-backend",
            "eager",
            "--variants",
            ",".join(ALL_UNET),
            "--json",
            str(out),
        ]
    )
    report = _load(out)
    (row,) = report["results"]
    v = row["variants"]
    assert code == 0, v
    assert (row["arch"], row["dtype"], row["batch"]) == ("tiny", "fp32", 2) and list(v) == ALL_UNET
    _check_peer_skips(v)
    fast = v["ddpm_fast"]
    for name, entry in v.items():
        if "skipped" in entry:
            continue
        assert entry["first_call_s"] > 0 and "build" in entry["setup_s"] or name in engines.ENGINE_PEERS
        assert entry["gflops_achieved"] > 0
        if name != "ddpm_fast":
            _check_ratios(entry, fast)
        if name != "diffusers_eager":
            # every engine computes the same function of the same weights
            assert entry["max_abs_diff_vs_diffusers_eager"] < 1e-4, (name, entry["max_abs_diff_vs_diffusers_eager"])
    if HAVE["onnxruntime"]:
        assert set(v["onnxruntime"]["setup_s"]) == {"export", "session"}
        assert v["onnxruntime"]["info"]["intra_op_threads"] == torch.get_num_threads()
    if HAVE["openvino"]:
        assert v["openvino"]["info"]["config"]["INFERENCE_NUM_THREADS"] == str(torch.get_num_threads())
    assert v["diffusers_compile_max_autotune"]["info"]["mode"].startswith("max-autotune (ignored")
    if NATIVE:
        assert any(k.startswith("conv:") for k in fast["paths"])  # which convolution paths ddpm_fast ran
    assert report["settings"]["variants"] == ALL_UNET
    md = tmp_path / "unet.md"
    assert summary.main([str(out), "--output", str(md)]) == 0
    text = md.read_text()
    assert all(f"| tiny | fp32 | 2 | {name} |" in text for name in ALL_UNET)


@needs_diffusers
def test_a_missing_peer_is_recorded_as_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    out = tmp_path / "unet.json"
    assert (
        unet.main(
            ["--configs", "tiny:1", "--rounds", "2", "--variants", "onnxruntime,openvino,ddpm_fast", "--json", str(out)]
        )
        == 0
    )
    v = _load(out)["results"][0]["variants"]
    assert "onnxruntime not installed" in v["onnxruntime"]["skipped"]
    assert "openvino not installed" in v["openvino"]["skipped"]
    assert v["ddpm_fast"]["ms_median"] > 0
    out2 = tmp_path / "bf16.json"
    assert (
        unet.main(
            [
                "--configs",
                "tiny:1",
                "--dtypes",
                "bf16",
                "--rounds",
                "1",
                "--variants",
                "onnxruntime",
                "--json",
                str(out2),
            ]
        )
        == 0
    )
    assert "fp32 only" in _load(out2)["results"][0]["variants"]["onnxruntime"]["skipped"]


@needs_diffusers
def test_sample_bench_runs_whole_pipelines_with_the_peers_on_diffusers_scheduler(tmp_path):
    out = tmp_path / "sample.json"
    variants = [
        "diffusers_eager",
        "diffusers_channels_last",
        "onnxruntime",
        "openvino",
        "diffusers_compile",
        "ddpm_fast_compile",
        "ddpm_fast_nograph",
        "ddpm_fast_reference",
        "ddpm_fast_noplans",
        "ddpm_fast",
    ]
    code = sample.main(
        [
            "--configs",
            "tiny:2",
            "--steps",
            "2",
            "--rounds",
            "2",
            "--compile-backend",
            "eager",
            "--variants",
            ",".join(variants),
            "--json",
            str(out),
        ]
    )
    report = _load(out)
    (row,) = report["results"]
    v = row["variants"]
    assert code == 0, v
    assert row["steps_per_call"] == 2 and row["unit"] == "ms per denoising step" and list(v) == variants
    _check_peer_skips(v)
    for name, entry in v.items():
        if "skipped" in entry:
            continue
        if name != "ddpm_fast":
            _check_ratios(entry, v["ddpm_fast"])
        if name != "diffusers_eager":
            # same images as diffusers: 2e-4 on the reference backend, 1e-3 on the fused one (README's figures)
            tol = 2e-4 if name in ("ddpm_fast_reference", "diffusers_channels_last", "diffusers_compile") else 1e-3
            assert entry["max_abs_diff_vs_diffusers_eager"] < tol, (name, entry["max_abs_diff_vs_diffusers_eager"])
    assert report["settings"]["steps"] == 2
    assert [t for t in report["targets"] if t["measured"] is not None] == []  # no target row measured at tiny size


# -- winograd and quality ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not NATIVE, reason="the Winograd op needs the native kernels")
@pytest.mark.parametrize("baseline", ["packed", "f2"])
def test_winograd_ab_runs_the_paths_it_names(tmp_path, baseline):
    out = tmp_path / "ab.json"
    assert winograd.main(["--arch", "tiny", "--rounds", "2", "--baseline", baseline, "--json", str(out)]) == 0
    (row,) = _load(out)["results"]
    paths_w, paths_b = row["variants"]["winograd"]["paths"], row["variants"][baseline]["paths"]
    assert paths_w.get("conv:winograd4", 0) + paths_w.get("conv:winograd2", 0) > 0
    if baseline == "packed":
        assert not any(k.startswith("conv:winograd") for k in paths_b) and paths_b["conv:packed"] > 0
    else:
        assert "conv:winograd4" not in paths_b and paths_b["conv:winograd2"] > 0
    assert sum(v for k, v in paths_w.items() if k.startswith("conv:")) == sum(
        v for k, v in paths_b.items() if k.startswith("conv:")
    )  # the same convolutions, on other paths
    assert row["max_abs_diff"] < 1e-4 and row["speedup"] == pytest.approx(
        row["variants"][baseline]["ms_median"] / row["variants"]["winograd"]["ms_median"]
    )


def test_winograd_refuses_cuda():
    with pytest.raises(SystemExit):
        winograd.main(["--device", "cuda"])


def test_quality_bench_scores_samples_between_noise_and_real_digits(tmp_path):
    out = tmp_path / "quality.json"
    assert quality.main(["--num-images", "10", "--batch-size", "10", "--schedules", "ddim:2", "--json", str(out)]) == 0
    report = _load(out)
    (row,) = report["results"]
    assert row["schedule"] == "ddim-2" and row["num_images"] == 10
    assert 0 <= row["mean_confidence"] <= 1 and 0 <= row["balance"] <= 1 and len(row["class_fractions"]) == 10
    refs = report["references"]
    assert refs["real_held_out"]["mean_confidence"] > refs["uniform_noise"]["mean_confidence"]
    assert report["classifier_held_out_accuracy"] > 0.9
    assert "| ddim-2 |" in summary.render(report)


def _bench_script(name: str):
    """bench/<name>.py as a module (the scripts there are not part of the package)."""
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not ddpm_fast.ops.native_available(), reason="needs the native kernels")
def test_panel_gemm_script_writes_its_rows(tmp_path):
    """bench/panel_gemm.py at a tiny size: one row per shape with cold and warm medians and ratios for each
    candidate, and the panel GEMM's error against float64 small."""
    module = _bench_script("panel_gemm")
    out = tmp_path / "panel.json"
    module.main(["--rounds", "1", "--flush-mb", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["results"]
    assert len(rows) == len(module.LINEAR_SHAPES) + len(module.WINOGRAD_SHAPES)
    for row in rows:
        ours = "panel_linear" if row["op"] == "linear" else "panels"
        for state in ("cold", "warm"):
            assert row[state][ours] > 0 and row[f"{state}_speedup_of_{ours}"] > 0
        if row["op"] == "linear":
            assert row["max_abs_err_vs_float64"] < 1e-4


def test_op_scaling_script_writes_its_rows(tmp_path):
    """bench/op_scaling.py on the tiny UNet: one row per (op, shapes) with its time at 1 and 2 threads, the loss
    t_2 - t_1 / 2 consistent with them and rows sorted by it; wall times and the thread count restored after."""
    module = _bench_script("op_scaling")
    out = tmp_path / "scaling.json"
    before = torch.get_num_threads()
    module.main(["--arch", "tiny", "--rounds", "1", "--flush-mb", "4", "--top", "0", "--json", str(out)])
    assert torch.get_num_threads() == before
    report = json.loads(out.read_text())
    assert report["command"].startswith("python bench/op_scaling.py --arch tiny")
    assert report["wall_ms"]["1"] > 0 and report["wall_ms"]["2"] > 0
    rows = report["rows"]
    ops = {row["op"] for row in rows}
    assert "aten::view" in ops or "aten::permute" in ops
    if NATIVE:
        assert "ddpm_fast::conv3x3_winograd" in ops and "ddpm_fast::group_norm_silu" in ops
    for row in rows:
        assert row["calls"] >= 1 and row["ms_1_thread"] >= 0 and row["ms_2_threads"] >= 0
        assert row["loss_ms"] == pytest.approx(row["ms_2_threads"] - row["ms_1_thread"] / 2)
    losses = [row["loss_ms"] for row in rows]
    assert losses == sorted(losses, reverse=True)
    with pytest.raises(SystemExit):
        module.main(["--threads", "1"])


@pytest.mark.skipif(not ddpm_fast.ops.native_available(), reason="needs the native kernels")
def test_replay_overhead_script_writes_its_times(tmp_path):
    """bench/replay_overhead.py on the tiny UNet: every candidate timed in every round, the graph's op and view
    counts, the stubbed graphs cheaper than the real one (they run no kernel), the thread count restored after."""
    module = _bench_script("replay_overhead")
    out = tmp_path / "replay.json"
    before = torch.get_num_threads()
    module.main(["--arch", "tiny", "--rounds", "3", "--json", str(out)])
    assert torch.get_num_threads() == before
    report = json.loads(out.read_text())
    assert report["command"].startswith("python bench/replay_overhead.py --arch tiny")
    names = {"forward", "graph", "graph_views_only", "graph_python_only", "state_check"}
    assert set(report["ms"]) == names and all(len(v) == 3 for v in report["ms"].values())
    assert 0 < report["graph_view_ops"] < report["graph_ops"] and report["graph_constants"] > 0
    m = report["ms_median"]
    assert m["graph_python_only"] < m["graph"] and m["graph_views_only"] < m["graph"]
    assert report["views_ms"] == pytest.approx(m["graph_views_only"] - m["graph_python_only"])


@pytest.mark.parametrize("choice", ["steady_model", "cat_free", "malloc_keep", "own_gemm"])
def test_ab_paths_script_times_both_settings(tmp_path, choice):
    """bench/ab_paths.py on the tiny UNet: both settings timed in every round, the same outputs either way; an
    in-process choice's real value restored after, a process-state one's page faults recorded per setting."""
    module = _bench_script("ab_paths")
    patched = module.PREDICATES.get(choice)  # (module, attribute) an in-process choice replaces while off
    real = patched and getattr(*patched)
    out = tmp_path / "ab.json"
    rounds = 1 if choice in module.CHILD_ENV else 2
    args = ["--choice", choice, "--arch", "tiny", "--batch", "2", "--rounds", str(rounds), "--steps", "2"]
    module.main([*args, "--calls", "1", "--json", str(out)])
    assert patched is None or getattr(*patched) is real
    report = json.loads(out.read_text())
    assert report["command"].startswith(f"python bench/ab_paths.py --choice {choice} --arch tiny")
    assert all(len(report["ms"][k]) == rounds and min(report["ms"][k]) > 0 for k in ("on", "off"))
    assert report["unit"] == ("ms per denoising step" if choice == "steady_model" else "ms per UNet forward")
    assert report["max_abs_diff"] < 1e-5
    if choice in module.CHILD_ENV:
        assert set(report["page_faults_per_forward"]) == {"on", "off"}
    else:
        assert "page_faults_per_forward" not in report


def test_gemm_choice_script_times_both_gemms(tmp_path):
    """bench/gemm_choice.py at its tiny size: both GEMM choices timed in every round, at every case, the same
    outputs within float rounding."""
    out = tmp_path / "gemm.json"
    _bench_script("gemm_choice").main(["--tiny", "--rounds", "2", "--calls", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["command"].startswith("python bench/gemm_choice.py --rounds 2")
    names = set(report["cases"])
    assert any(n.startswith("winograd F2") for n in names) and any(n.startswith("winograd F4") for n in names)
    assert any(n.startswith("attention") for n in names)
    for case in report["cases"].values():
        assert all(len(case["ms"][s]) == 2 and min(case["ms"][s]) > 0 for s in ("ours", "torch"))
        assert case["max_abs_diff"] < 1e-4
