"""The registries are complete and consistent, and every backend handles
every entry: the NumPy reference and the CPU kernels here, the CUDA kernels
in tests/cuda/test_cuda_registry.py (same walk, under the simulator)."""
import dataclasses
import math

import numpy as np
import pytest

from gradserve.nnkernels import (
    InitSpec,
    LayerSpec,
    ModelSpec,
    OptimizerSpec,
    OutputSpec,
    ScheduleSpec,
    init_params,
    kernel_args,
)
from gradserve.nnkernels import reference as R
from gradserve.nnkernels.registry import (
    ACTIVATION_PARAMETERS,
    ACTIVATIONS,
    CODED,
    HYPERPARAMETERS,
    INIT_FIELDS,
    INITIALIZERS,
    OPTIMIZERS,
    SCHEDULE_FIELDS,
    SCHEDULES,
    SHARED_HYPERPARAMETERS,
    ActivationCode,
    OptimizerCode,
    OutputCode,
    scheduled_lr,
    state_names,
)
from registry_walk import assert_backend_handles_every_registry_entry

ENUMS = {"activation": ActivationCode, "output kind": OutputCode, "optimizer": OptimizerCode}


@pytest.mark.parametrize("what", list(CODED))
def test_codes_are_dense_unique_and_named_by_the_enum(what):
    entries = CODED[what]
    assert sorted(e.code for e in entries.values()) == list(range(len(entries)))
    assert {m.name.lower(): m.value for m in ENUMS[what]} == {name: e.code for name, e in entries.items()}


def test_spec_fields_are_the_registry_settings():
    names = lambda part: {f.name for f in dataclasses.fields(part)} - {"name"}  # noqa: E731
    assert names(OptimizerSpec) == set(HYPERPARAMETERS)
    assert names(ScheduleSpec) == set(SCHEDULE_FIELDS)
    assert names(InitSpec) == set(INIT_FIELDS)
    assert set(ACTIVATION_PARAMETERS) <= names(LayerSpec)
    assert all(a.param in (None, *ACTIVATION_PARAMETERS) for a in ACTIVATIONS.values())
    assert all(set(o.defaults) == set(SHARED_HYPERPARAMETERS) and set(o.uses) <= set(HYPERPARAMETERS)
               for o in OPTIMIZERS.values())
    assert all(set(s.uses) <= set(SCHEDULE_FIELDS) for s in SCHEDULES.values())
    assert all(set(i.uses) <= set(INIT_FIELDS) for i in INITIALIZERS.values())


def test_reference_has_a_formula_for_every_entry():
    assert set(R.ACTIVATIONS) == set(ACTIVATIONS)
    assert set(R.OUTPUTS) == set(CODED["output kind"])
    assert set(R.OPTIMIZERS) == set(OPTIMIZERS)


def test_every_optimizer_has_coefficients_and_state_slots():
    for name, entry in OPTIMIZERS.items():
        opt = OptimizerSpec(name)
        values = kernel_args.optimizer_coefficients(opt, 0.01, 2, 1.0)
        assert len(values) == len(kernel_args.COEFFICIENTS) and all(math.isfinite(v) for v in values), name
        empty = np.empty(0)
        slots = kernel_args.state_slots(opt, {n: np.ones(1) for n in state_names(opt)}, empty)
        assert [s is not empty for s in slots][:len(entry.state)] == [b.kept(opt) for b in entry.state], name


def test_cpu_backend_handles_every_registry_entry():
    assert_backend_handles_every_registry_entry("cpu")


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_gives_a_positive_rate(name):
    schedule = ScheduleSpec(name, step_size=2, gamma=0.5, t_max=10, eta_min=1e-4)
    rates = [scheduled_lr(schedule, 0.1, t) for t in range(12)]
    assert rates[0] == 0.1 and all(0 < r <= 0.1 for r in rates)


@pytest.mark.parametrize("name", list(INITIALIZERS))
def test_every_initializer_draws_finite_seeded_values(name):
    spec = ModelSpec(input_size=5, hidden=(LayerSpec(4),), output=OutputSpec(2), dtype="float64",
                     weight_init=InitSpec(name, value=0.3, a=-0.2, b=0.4), bias_init=InitSpec(name, value=0.3))
    params = init_params(spec)
    assert params.shape == (spec.num_params,) and np.all(np.isfinite(params))
    np.testing.assert_array_equal(params, init_params(spec))


def test_production_code_imports_nothing_from_the_reference():
    """reference.py is the tests' oracle: the server, the client and the
    kernels read the registries instead, so the oracle stays independent."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in [*root.glob("server/gradserve/**/*.py"), *root.glob("client/gradserve/**/*.py"),
                 *root.glob("nnkernels/gradserve/**/*.py")]:
        if path.name == "reference.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.split(".")[-1] == "reference" or ".reference." in n for n in names):
                offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders
