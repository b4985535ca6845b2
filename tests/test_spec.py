"""ModelSpec validation: every invalid value raises SpecError naming its field."""
import pytest

from gradserve.nnkernels import (
    InitSpec,
    LayerSpec,
    LossSpec,
    ModelSpec,
    OptimizerSpec,
    OutputSpec,
    RegularizationSpec,
    ScheduleSpec,
    SpecError,
)


def spec(**kw):
    base = dict(input_size=3, hidden=(LayerSpec(4),), output=OutputSpec(2, "softmax"))
    base.update(kw)
    return ModelSpec(**base)


@pytest.mark.parametrize("kwargs, field", [
    (dict(input_size=0), "input_size"),
    (dict(hidden=(LayerSpec(0),)), "hidden[0].units"),
    (dict(hidden=(LayerSpec(4), LayerSpec(3, "swish"))), "hidden[1].activation"),
    (dict(hidden=(LayerSpec(4, dropout=1.0),)), "hidden[0].dropout"),
    (dict(hidden=(LayerSpec(4, "elu", alpha=0.0),)), "hidden[0].alpha"),
    (dict(output=OutputSpec(1, "softmax")), "output.units"),
    (dict(output=OutputSpec(2, "linear")), "output.kind"),
    (dict(loss=LossSpec("mse")), "loss.name"),
    (dict(loss=LossSpec(label_smoothing=1.5)), "loss.label_smoothing"),
    (dict(optimizer=OptimizerSpec("lbfgs")), "optimizer.name"),
    (dict(optimizer=OptimizerSpec("adam", lr=-1.0)), "optimizer.lr"),
    (dict(optimizer=OptimizerSpec("adam", beta1=1.0)), "optimizer.beta1"),
    (dict(optimizer=OptimizerSpec("sgd", nesterov=True)), "optimizer.nesterov"),
    (dict(optimizer=OptimizerSpec("adam", momentum=0.9)), "optimizer.momentum"),
    (dict(optimizer=OptimizerSpec("sgd", lr=float("nan"))), "optimizer.lr"),
    (dict(schedule=ScheduleSpec("cosine", t_max=0)), "schedule.t_max"),
    (dict(schedule=ScheduleSpec("linear")), "schedule.name"),
    (dict(weight_init=InitSpec("uniform", a=1.0, b=0.0)), "weight_init.b"),
    (dict(bias_init=InitSpec("orthogonal")), "bias_init.name"),
    (dict(regularization=RegularizationSpec(clip_grad_norm=-1.0)), "regularization.clip_grad_norm"),
    (dict(dtype="float16"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(seed=-1), "seed"),
])
def test_invalid_spec_raises_spec_error_naming_the_field(kwargs, field):
    with pytest.raises(SpecError) as info:
        spec(**kwargs)
    assert info.value.field == field


def test_spec_round_trips_through_dict():
    s = spec(optimizer=OptimizerSpec("adamw", lr=0.01), schedule=ScheduleSpec("step", step_size=3),
             dtype="float64", seed=7)
    assert ModelSpec.from_dict(s.to_dict()) == s


def test_from_dict_rejects_unknown_keys():
    d = spec().to_dict()
    d["optimizer"]["betas"] = [0.9, 0.99]
    with pytest.raises(SpecError) as info:
        ModelSpec.from_dict(d)
    assert info.value.field == "optimizer.betas"


def test_optimizer_defaults_follow_torch():
    assert OptimizerSpec("adagrad").eps == 1e-10
    assert OptimizerSpec("adamw").weight_decay == 1e-2
    assert OptimizerSpec("adam").lr == 1e-3


def test_all_step_hidden_layers_are_not_trainable():
    assert not spec(hidden=(LayerSpec(4, "step"), LayerSpec(3, "step"))).trainable
    assert spec(hidden=(LayerSpec(4, "step"), LayerSpec(3, "relu"))).trainable
    assert spec(hidden=()).trainable
