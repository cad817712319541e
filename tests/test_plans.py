"""CPU forward plans (ddpm_fast.models.plans): a replay gives the eager forward's output bit for bit, and is
dropped whenever it could be stale (parameters changed in any documented way, submodules replaced, hooks,
train mode) or turned off. The oracle is the same model's eager forward with plans off."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch

import ddpm_fast
from ddpm_fast import fast_path
from helpers import TINY, seed_of

pytestmark = pytest.mark.usefixtures("fused_backend")


def _model(seed: int = 0, **overrides) -> ddpm_fast.UNet2DModel:
    torch.manual_seed(seed)
    model = ddpm_fast.UNet2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # non-zero everywhere (diffusers zero-initialises nothing here, but be sure)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _eager(model, *args, **kwargs) -> torch.Tensor:
    with fast_path.cpu_plans(False):
        return model(*args, **kwargs).sample


def _calls(model, sample, timestep, n=3, **kwargs):
    """n calls, with the paths each one noted."""
    outs, paths = [], []
    for _ in range(n):
        with fast_path.record_paths() as p:
            outs.append(model(sample, timestep, **kwargs).sample)
        paths.append(p)
    return outs, paths


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("timestep", ["int", "0d", "1d"])
def test_replay_equals_eager_bit_for_bit(batch, fmt, timestep):
    model = _model()
    gen = torch.Generator().manual_seed(seed_of(batch, fmt, timestep))
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    t = {"int": 321, "0d": torch.tensor(321), "1d": torch.full((batch,), 321)}[timestep]
    with torch.no_grad():
        ref = _eager(model, x, t)
        outs, paths = _calls(model, x, t)
    assert paths[0]["plan:record"] == 0 and paths[0]["plan:replay"] == 0  # first call: eager
    assert paths[1]["plan:record"] == 1 and paths[2]["plan:replay"] == 1
    for out in outs:
        assert torch.equal(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(
            memory_format=torch.channels_last
        )
    # A replay notes the same convolution paths as the eager forward it recorded.
    conv = {k: v for k, v in paths[0].items() if k.startswith("conv:")}
    assert conv and {k: v for k, v in paths[2].items() if k.startswith("conv:")} == conv


def test_replay_under_inference_mode_and_new_input_values():
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        _calls(model, x, 10, n=2)
        for step in (999, 500, 0):
            y = torch.randn(1, 3, 16, 16)
            with fast_path.record_paths() as p:
                out = model(y, step).sample
            assert p["plan:replay"] == 1
            assert torch.equal(out, _eager(model, y, step))


def test_a_new_signature_is_recorded_separately():
    model = _model()
    with torch.no_grad():
        for shape in [(1, 3, 16, 16), (2, 3, 16, 16), (1, 3, 32, 32)]:
            x = torch.randn(*shape)
            outs, paths = _calls(model, x, 5)
            assert paths[2]["plan:replay"] == 1
            assert torch.equal(outs[2], _eager(model, x, 5))
        x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
        model64 = _model().double()
        outs, paths = _calls(model64, x, 5)
        assert torch.equal(outs[2], _eager(model64, x, 5))
    assert len(model._plans) == 3


def _replaying(model, x, t):
    with torch.no_grad():
        _calls(model, x, t, n=2)
        with fast_path.record_paths() as p:
            model(x, t)
    assert p["plan:replay"] == 1


def _edits():
    def in_place(m):
        with torch.no_grad():
            m.conv_in.weight.mul_(1.5)

    def through_data(m):  # diffusers' EMAModel.copy_to writes through .data
        m.down_blocks[0].resnets[0].conv1.weight.data.mul_(0.5)

    def time_embedding_through_data(m):  # a parameter no prepared copy is made from
        m.time_embedding.linear_1.weight.data.mul_(-1.0)

    def data_assignment(m):
        w = m.conv_out.weight
        w.data = w.data * 2.0

    def load_state_dict(m):
        m.load_state_dict(_model(seed=1).state_dict())

    def load_assign(m):
        m.load_state_dict(_model(seed=2).state_dict(), assign=True)

    def replace_submodule(m):
        m.conv_act = torch.nn.Tanh().eval()  # a parameter-free module: only its identity shows it

    def replace_norm_parameter(m):
        norm = m.conv_norm_out
        norm.weight = torch.nn.Parameter(norm.weight.detach() * 3.0)

    return [
        in_place,
        through_data,
        time_embedding_through_data,
        data_assignment,
        load_state_dict,
        load_assign,
        replace_submodule,
        replace_norm_parameter,
    ]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_a_changed_model_is_never_replayed_stale(edit):
    model = _model()
    x, t = torch.randn(1, 3, 16, 16), 7
    _replaying(model, x, t)
    with torch.no_grad():
        before = _eager(model, x, t)
        edit(model)
        after = model(x, t).sample
        assert torch.equal(after, _eager(model, x, t))
        if edit.__name__ != "replace_submodule":  # conv_act is not used by the fused path (its GroupNorm+SiLU is)
            assert not torch.equal(after, before)
        # ... and plans come back for the new model.
        outs, paths = _calls(model, x, t)
        assert paths[2]["plan:replay"] == 1 and torch.equal(outs[2], _eager(model, x, t))


def test_hooks_and_train_mode_bypass_the_plan():
    model = _model()
    x, t = torch.randn(1, 3, 16, 16), 7
    _replaying(model, x, t)
    seen = []
    handle = model.down_blocks[0].resnets[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        with fast_path.record_paths() as p:
            out = model(x, t).sample
        assert seen and p["plan:replay"] == 0 and torch.equal(out, _eager(model, x, t))
    handle.remove()
    seen.clear()
    global_handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append(1))
    try:
        with torch.no_grad(), fast_path.record_paths() as p:
            model(x, t)
        assert seen and p["plan:replay"] == 0
    finally:
        global_handle.remove()
    model.down_blocks[1].train()  # one submodule in train mode (its dropout would be live)
    with torch.no_grad(), fast_path.record_paths() as p:
        model(x, t)
    assert p["plan:replay"] == 0 and p["plan:record"] == 0
    model.eval()
    _replaying(model, x, t)


def test_no_plan_when_off_training_reference_or_grad():
    x, t = torch.randn(1, 3, 16, 16), 7
    model = _model()
    with torch.no_grad(), fast_path.cpu_plans(False):
        _, paths = _calls(model, x, t)
    assert not any(k.startswith("plan:") for p in paths for k in p)
    with torch.no_grad(), ddpm_fast.backend("reference"):
        _, paths = _calls(model, x, t)
    assert not any(k.startswith("plan:") for p in paths for k in p)
    model.train()
    with torch.no_grad():
        _, paths = _calls(model, x, t)
    assert not any(k.startswith("plan:") for p in paths for k in p)
    model.eval()
    _, paths = _calls(model, x, t)  # grad mode on, parameters require grad: the reference path, with autograd
    assert not any(k.startswith("plan:") for p in paths for k in p)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with fast_path.cpu_plans("no"):
            pass


def test_environment_variable_turns_plans_off():
    code = "import torch, ddpm_fast\nfrom ddpm_fast import fast_path\nprint(fast_path.current().cpu_plans)\n"
    for value, expected in [("0", "False"), ("off", "False"), ("1", "True")]:
        env = {**os.environ, "DDPM_FAST_CPU_PLANS": value}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert res.stdout.strip() == expected, res.stderr
    env = {**os.environ, "DDPM_FAST_CPU_PLANS": "sometimes"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "DDPM_FAST_CPU_PLANS" in res.stderr


def test_models_with_plans_copy_and_pickle():
    model = _model()
    x, t = torch.randn(1, 3, 16, 16), 7
    _replaying(model, x, t)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(clone._plans) == 0
        with torch.no_grad():
            assert torch.equal(clone(x, t).sample, _eager(model, x, t))


def test_class_conditioned_model_records_its_labels():
    model = _model(num_class_embeds=4)
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    with torch.no_grad():
        outs, paths = _calls(model, x, 9, class_labels=labels)
        assert paths[2]["plan:replay"] == 1
        assert torch.equal(outs[2], _eager(model, x, 9, class_labels=labels))
        other = torch.tensor([0, 2])
        assert torch.equal(model(x, 9, class_labels=other).sample, _eager(model, x, 9, class_labels=other))
        with pytest.raises(ValueError, match="class_labels must be given"):
            model(x, 9)


def test_pipeline_steps_replay_one_plan():
    """A pipeline passes each step's timestep as a view of another element of its schedule: one recording
    serves every step, and the images equal the eager pipeline's bit for bit."""
    model = _model()
    scheduler = ddpm_fast.DDPMScheduler(num_train_timesteps=50)
    pipe = ddpm_fast.DDPMPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with fast_path.record_paths() as paths:
        images = pipe(batch_size=1, num_inference_steps=6, generator=torch.Generator().manual_seed(3), output_type="pt")
    assert paths["plan:record"] == 1 and paths["plan:replay"] == 4
    with fast_path.cpu_plans(False):
        eager = pipe(batch_size=1, num_inference_steps=6, generator=torch.Generator().manual_seed(3), output_type="pt")
    assert torch.equal(images.images, eager.images)


def _count_state_checks(monkeypatch) -> list[int]:
    from ddpm_fast.models import plans

    checks = [0]
    real = plans._State.current

    def counted(self):
        checks[0] += 1
        return real(self)

    monkeypatch.setattr(plans._State, "current", counted)
    return checks


def test_steady_model_checks_the_state_once_per_block(monkeypatch):
    """Inside steady_model() a replaying model checks its state at its first call only; outside, at every call."""
    from ddpm_fast.models.plans import steady_model

    model, other = _model(), _model(seed=1)
    x, t = torch.randn(1, 3, 16, 16), 7
    _replaying(model, x, t)
    _replaying(other, x, t)
    checks = _count_state_checks(monkeypatch)
    with torch.no_grad():
        _calls(model, x, t, n=3)
        assert checks[0] == 3
        checks[0] = 0
        with steady_model():
            outs, paths = _calls(model, x, t, n=3)
            _calls(other, x, t, n=2)  # each model keeps its own record
            assert checks[0] == 2
        assert all(p["plan:replay"] == 1 for p in paths) and torch.equal(outs[2], _eager(model, x, t))
        checks[0] = 0
        _calls(model, x, t, n=2)  # the block's record is gone with it
        assert checks[0] == 2


@pytest.mark.parametrize("edit", _edits()[:2], ids=lambda f: f.__name__)
def test_steady_model_blocks_see_changes_made_between_them(edit):
    """A change between two steady blocks (between two pipeline calls) is seen by the next block's first call."""
    from ddpm_fast.models.plans import steady_model

    model = _model()
    x, t = torch.randn(1, 3, 16, 16), 7
    _replaying(model, x, t)
    with torch.no_grad():
        with steady_model():
            before = model(x, t).sample
        edit(model)
        with steady_model():
            after = model(x, t).sample
            again = model(x, t).sample
        assert not torch.equal(after, before)
        assert torch.equal(after, _eager(model, x, t)) and torch.equal(again, after)


def test_pipeline_checks_the_model_once_per_call(monkeypatch):
    """DDPMPipeline's denoising loop runs in steady_model(): one state check per call, not one per step; a weight
    changed between two calls is seen by the second."""
    model = _model()
    pipe = ddpm_fast.DDPMPipeline(unet=model, scheduler=ddpm_fast.DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(batch_size=1, num_inference_steps=6, generator=torch.Generator().manual_seed(3), output_type="pt")

    run()  # eager, record, replays
    checks = _count_state_checks(monkeypatch)
    first = run().images
    assert checks[0] == 1
    with torch.no_grad():
        model.conv_out.weight.mul_(2.0)
    second = run().images
    with fast_path.cpu_plans(False):
        eager = run().images
    assert torch.equal(second, eager) and not torch.equal(second, first)


def test_recording_under_inference_mode_keeps_the_eager_ops():
    """Recorded inside inference mode, make_fx would take other decompositions (nearest upsampling as an index
    op); the plan records outside it, so its graph holds the ops the eager forward runs."""
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        outs, paths = _calls(model, x, 5)
    assert paths[2]["plan:replay"] == 1 and torch.equal(outs[2], outs[0])
    (graph,) = model._plans.graphs()
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert "aten.upsample_nearest2d.default" in targets
    assert not {"aten._unsafe_index.Tensor", "aten.index.Tensor"} & targets


def test_replay_calls_each_op_through_its_cpp_entry_point(monkeypatch):
    """The recorded graph calls its view ops as Tensor methods and every other op overload straight through
    ``overload._op``, and holds its constants as plain attributes; its overloads print as recorded, and a plan
    recorded without that rewrite (the op overloads called from Python, the constants read through
    ``nn.Module.__getattr__``) gives the same output bit for bit."""
    from ddpm_fast.models import plans

    x = torch.randn(1, 3, 16, 16)
    direct = _model()
    with torch.no_grad():
        outs, paths = _calls(direct, x, 5)
    assert paths[2]["plan:replay"] == 1
    (graph,) = direct._plans.graphs()
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    wrapped = [t for t in targets if isinstance(t, plans._Direct)]
    assert wrapped and not any(isinstance(t, torch._ops.OpOverload) for t in targets)
    assert all(t.func is t.overload._op and str(t) == str(t.overload) for t in wrapped)
    assert "ddpm_fast.group_norm_silu.default" in {str(t) for t in wrapped}
    assert "torch.ops." not in graph.code
    methods = {n.target for n in graph.graph.nodes if n.op == "call_method"}
    assert methods and methods <= set(plans._VIEW_METHODS.values())
    constants = [n.target for n in graph.graph.nodes if n.op == "get_attr"]
    assert constants and all(name in vars(graph) for name in constants)
    assert not dict(graph.named_parameters()) and not dict(graph.named_buffers())
    model_params = {id(p) for p in direct.parameters()}
    assert any(id(vars(graph)[name]) in model_params for name in constants)

    monkeypatch.setattr(plans, "direct_replay", lambda: False)
    through_python = _model()
    with torch.no_grad():
        outs_py, paths_py = _calls(through_python, x, 5)
    assert paths_py[2]["plan:replay"] == 1
    (graph_py,) = through_python._plans.graphs()
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in graph_py.graph.nodes)
    assert not any(n.op == "call_method" for n in graph_py.graph.nodes)
    assert dict(graph_py.named_parameters())
    assert torch.equal(outs_py[2], outs[2]) and torch.equal(outs[2], outs[0])
