"""The compiled run of steps (Model.train_steps, cpu.epochs): every step
inside one Numba call equals train_step on the same gathered batch, bit for
bit, and the serial twins of the parallel kernels give the same bits."""
import numpy as np
import pytest

from gradserve.nnkernels import (
                                 InputError,
                                 LayerSpec,
                                 Model,
                                 ModelSpec,
                                 NonFiniteError,
                                 OptimizerSpec,
                                 OutputSpec,
                                 RegularizationSpec,
                                 ScheduleSpec,
                                 runtime,
)
from gradserve.nnkernels.cpu import epochs
from gradserve.nnkernels.cpu.kernels import Targets, TrainSettings, perturb_weights_kernel, train_kernel
from gradserve.nnkernels.cpu.optimizer import optimizer_kernel
from gradserve.nnkernels.cpu.twins import serial_twin
from gradserve.nnkernels.kernel_args import optimizer_coefficients
from gradserve.wire.shuffle import batch_index, epoch_order, steps_per_epoch

SPECS = {
    # (labels for the adam one, probabilities for adamw: see data())
    # dropout and every noise kind but the targets': the per-step keys must advance as train_step's;
    # clipping; a cosine schedule
    "softmax-labels-dropout-noise-clip-cosine": ModelSpec(
        input_size=9, hidden=(LayerSpec(24, "relu", dropout=0.3, noise_std=0.1), LayerSpec(12, "gelu", dropout=0.1)),
        output=OutputSpec(5, "softmax"), optimizer=OptimizerSpec("adam", lr=0.02, amsgrad=True),
        schedule=ScheduleSpec("cosine", t_max=17, eta_min=1e-4),
        regularization=RegularizationSpec(input_noise_std=0.2, weight_noise_std=0.05, clip_grad_norm=0.5), seed=3),
    # target noise (regression only)
    "mse-float64-sgd-nesterov-step-schedule": ModelSpec(
        input_size=9, hidden=(LayerSpec(16, "tanh"),), output=OutputSpec(3),
        optimizer=OptimizerSpec("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        schedule=ScheduleSpec("step", step_size=5, gamma=0.5), regularization=RegularizationSpec(target_noise_std=0.3),
        dtype="float64", seed=4),
    "bce-rmsprop-exponential": ModelSpec(
        input_size=9, hidden=(LayerSpec(20, "elu", dropout=0.2),), output=OutputSpec(2, "sigmoid"),
        optimizer=OptimizerSpec("rmsprop", lr=0.01, centered=True, momentum=0.5),
        schedule=ScheduleSpec("exponential", gamma=0.97), seed=5),
    "softmax-probabilities-adamw": ModelSpec(
        input_size=9, hidden=(LayerSpec(32, "silu"),), output=OutputSpec(4, "softmax"),
        optimizer=OptimizerSpec("adamw", lr=0.01, weight_decay=0.05), seed=6),
}


def data(spec: ModelSpec, rows: int, seed: int = 0):
    """Inputs, and targets of the spec's kind: class labels where its name says so (see SPECS)."""
    rs = np.random.default_rng(seed)
    X = rs.standard_normal((rows, spec.input_size)).astype(spec.dtype)
    units = spec.output.units
    if spec.output.kind == "softmax" and spec.optimizer.name == "adam":
        return X, rs.integers(0, units, rows)
    if spec.output.kind == "softmax":
        return X, rs.dirichlet(np.ones(units), rows).astype(spec.dtype)
    if spec.output.kind == "sigmoid":
        return X, (rs.random((rows, units)) > 0.5).astype(spec.dtype)
    return X, rs.standard_normal((rows, units)).astype(spec.dtype)


def one_by_one(model: Model, X, y, order, batch_size: int, first: int, steps: int):
    results = []
    for b in range(first, first + steps):
        rows = batch_index(order, b, batch_size)
        results.append(model.train_step(X[rows], y[rows]))
    return results


def assert_same_state(a: Model, b: Model):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("batch_size", [7, runtime.PARALLEL_MIN_ROWS])  # serial twins / parallel kernels
def test_a_compiled_run_equals_the_same_batches_through_train_step_bit_for_bit(name, batch_size):
    spec = SPECS[name]
    X, y = data(spec, 3 * batch_size + batch_size // 2)  # a partial last batch
    run, steps = Model(spec), Model(spec)
    spe = steps_per_epoch(len(X), batch_size)
    for epoch in range(3):
        order = epoch_order(11, epoch, len(X))
        # an epoch in two runs, the second starting mid-epoch
        got = run.train_steps(X, y, order, batch_size, 0, 1).results
        got += run.train_steps(X, y, order, batch_size, 1).results
        want = one_by_one(steps, X, y, order, batch_size, 0, spe)
        assert got == want  # StepResult: step, loss, accuracy, grad_norm and lr, exactly
        assert_same_state(run, steps)
    assert run.step == 3 * spe


def test_read_only_and_wider_data_are_gathered_as_train_step_casts_its_batches():
    spec = SPECS["softmax-labels-dropout-noise-clip-cosine"]
    X, y = data(spec, 50)
    X64 = X.astype(np.float64) + 1e-9  # not representable in float32: the gather rounds as astype does
    X64.setflags(write=False)
    y32 = y.astype(np.int32)
    y32.setflags(write=False)
    order = epoch_order(2, 0, len(X))
    run, steps = Model(spec), Model(spec)
    r = run.train_steps(X64, y32, order, 8)
    assert r.error is None and r.rows == [8] * 6 + [2]
    assert r.results == one_by_one(steps, X64, y32, order, 8, 0, 7)
    assert_same_state(run, steps)


def test_a_run_stops_before_its_first_non_finite_step_keeping_the_finite_ones():
    # plain SGD with a learning rate far too large on a regression: float32 overflows after a few steps
    spec = ModelSpec(input_size=4, hidden=(LayerSpec(8, "relu"),), output=OutputSpec(1),
                     optimizer=OptimizerSpec("sgd", lr=3.0), seed=1)
    rs = np.random.default_rng(0)
    X = (rs.standard_normal((64, 4)) * 3).astype(np.float32)
    y = rs.standard_normal((64, 1)).astype(np.float32)
    run, steps = Model(spec), Model(spec)
    error = None
    for epoch in range(50):
        order = epoch_order(2, epoch, len(X))
        r = run.train_steps(X, y, order, 8)
        if r.error is not None:
            error = r.error
            break
    assert isinstance(error, NonFiniteError)
    applied = epoch * 8 + len(r.results)
    assert run.step == applied and len(r.results) < 8
    for e in range(epoch + 1):
        order = epoch_order(2, e, len(X))
        for b in range(8):
            if steps.step == applied:
                break
            rows = batch_index(order, b, 8)
            steps.train_step(X[rows], y[rows])
    assert all(np.isfinite(v).all() for v in run.state_dict().values())
    assert_same_state(run, steps)  # the model is at its last finite step
    with pytest.raises(NonFiniteError) as raised:  # and train_step refuses the same next step, alike
        steps.train_step(X[batch_index(order, b, 8)], y[batch_index(order, b, 8)])
    assert str(raised.value) == str(error)
    assert_same_state(run, steps)


@pytest.mark.parametrize("budget", [1, 2])
def test_a_run_gives_the_same_bits_serial_or_parallel_whatever_the_thread_count(budget):
    spec = SPECS["softmax-labels-dropout-noise-clip-cosine"]
    X, y = data(spec, 3 * 256 + 40)
    order = epoch_order(5, 0, len(X))
    reference = Model(spec)
    want = one_by_one(reference, X, y, order, 256, 0, 4)  # parallel kernels, the default budget
    before = runtime.thread_budget()
    runtime.set_thread_budget(budget)  # 1: the serial twins; 2: the parallel kernels on two threads
    try:
        run = Model(spec)
        assert run.train_steps(X, y, order, 256).results == want
    finally:
        runtime.set_thread_budget(before)
    assert_same_state(run, reference)


@pytest.mark.parametrize("threads", [1, 2])
def test_serial_twins_of_the_train_and_optimizer_kernels_give_the_parallel_bits(threads):
    import numba
    spec = SPECS["softmax-labels-dropout-noise-clip-cosine"]
    X, y = data(spec, 700)  # several product tiles and activation row blocks
    par, ser = Model(spec), Model(spec)
    par.train_step(X[:64], y[:64])
    ser.train_step(X[:64], y[:64])
    outs = []
    for model, train, opt in ((par, train_kernel, optimizer_kernel),
                              (ser, serial_twin(train_kernel), serial_twin(optimizer_kernel))):
        b = model.backend
        bufs = b._workspace(len(X)).buffers(len(X), b._partials, b._train_tiles)
        settings = TrainSettings(b._out_kind, 0.0, 1.0 / len(X), b._noise_std, np.uint64(12345), 0.0, np.uint64(0))
        if bufs.wn.shape[0]:
            b.layers["wnoise_key"] = 777
            perturb_weights_kernel(b.params, b.layers, bufs.wn)
        numba.set_num_threads(threads)
        try:
            loss, correct, sq = train(X, Targets(y, b._no_targets), b.params, b.grads, b.layers, settings, bufs)
            coef = np.zeros(1, b._coef.dtype)
            coef[0] = optimizer_coefficients(spec.optimizer, 0.01, 2, 0.7)
            opt(b.params, b.grads, b._slots, b._opt_code, coef)
        finally:
            runtime._thread_setting.k = None  # kernel_threads sets it afresh next time
        outs.append((loss, correct, sq, b.grads.copy()))
    assert outs[0][:3] == outs[1][:3]
    np.testing.assert_array_equal(outs[0][3], outs[1][3])
    assert_same_state(par, ser)


def test_a_serial_twin_is_compiled_without_parallel_from_the_same_code():
    twin = serial_twin(train_kernel)
    assert twin is serial_twin(train_kernel)  # one per function
    assert twin.py_func.__code__ is train_kernel.py_func.__code__
    assert not twin.targetoptions.get("parallel") and train_kernel.targetoptions["parallel"]
    # its parallel callees are swapped for their own twins
    callee = twin.py_func.__globals__["_forward_layers"]
    assert callee.py_func.__qualname__ == "_forward_layers__serial" and not callee.targetoptions.get("parallel")
    assert serial_twin(epochs._clip) is epochs._clip  # a serial function is its own twin
    # the run of steps (a serial loop calling parallel kernels) has a twin calling theirs
    loop = serial_twin(epochs.run_steps_kernel).py_func.__globals__
    assert loop["train_kernel"] is twin and not loop["optimizer_kernel"].targetoptions.get("parallel")


def test_a_run_refuses_rows_outside_the_data_and_batches_outside_the_order():
    spec = SPECS["softmax-probabilities-adamw"]
    X, y = data(spec, 20)
    model = Model(spec)
    with pytest.raises(InputError, match="order"):
        model.train_steps(X, y, np.arange(21), 4)
    with pytest.raises(InputError, match="steps"):
        model.train_steps(X, y, np.arange(20), 4, first=3, steps=3)
    with pytest.raises(InputError, match="inputs"):
        model.train_steps(X[:, :3], y, np.arange(20), 4)
    assert model.step == 0
    assert model.train_steps(X, y, np.arange(20), 4, first=5).results == []
