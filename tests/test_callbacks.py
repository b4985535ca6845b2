"""Callbacks in fit (early stopping, reduce-LR-on-plateau, best checkpoint)
and what they need from the server: SetOptimizer and named checkpoints,
both logged mutations replayed bit-exactly after a SIGKILL."""
import dataclasses

import grpc
import numpy as np
import pytest

from gradserve.client import Client
from gradserve.client.callbacks import BestCheckpoint, Callback, EarlyStopping, ReduceLROnPlateau
from gradserve.nnkernels import Model, ModelSpec
from service_fixtures import ServerProcess, client, server  # noqa: F401  (fixtures)

SPEC = dict(input_size=5, hidden=[(16, "tanh")], output=(3, "softmax"),
            optimizer={"name": "adam", "lr": 0.01}, schedule={"name": "step", "step_size": 2, "gamma": 0.5}, seed=3)
NEVER_AGAIN = 1e9  # a min_delta no later epoch can beat: epoch 0 stays the best, deterministically


def batch(k: int):
    rng = np.random.default_rng(500 + k)
    return rng.standard_normal((8, 5)).astype(np.float32), rng.integers(0, 3, 8)


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, n)


class Recorder(Callback):
    """Keeps each epoch's logs and weights (fetched after the other callbacks ran)."""

    def on_train_begin(self, model):
        self.logs, self.weights = [], []

    def on_epoch_end(self, epoch, logs, model):
        self.logs.append(dict(logs))
        self.weights.append(model.get_weights())


def assert_weights_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def with_lr(model: Model, **changes) -> Model:
    """What SetOptimizer does, in process: the same state on the changed spec."""
    optimizer = dataclasses.replace(model.spec.optimizer, **changes)
    return Model(dataclasses.replace(model.spec, optimizer=optimizer), model.state_dict())


# -- SetOptimizer --------------------------------------------------------------------
def test_set_optimizer_changes_the_base_lr_of_the_schedule(client):
    remote = client.create_model(**SPEC)
    remote.train_step(*batch(0))
    remote.train_step(*batch(1))
    optimizer = remote.set_optimizer(lr=0.04, weight_decay=0.001)
    assert optimizer["lr"] == 0.04 and optimizer["weight_decay"] == 0.001
    assert client.get_model(remote.model_id).info.spec["optimizer"]["lr"] == 0.04
    # step 3 runs at t=2: 0.04 * 0.5 ** (2 // 2)
    assert remote.train_step(*batch(2)).lr == pytest.approx(0.02)


@pytest.mark.parametrize("changes, field", [({"amsgrad": True}, "optimizer.amsgrad"),
                                            ({"name": "sgd"}, "optimizer.name"),
                                            ({"lr": -1.0}, "optimizer.lr"),
                                            ({"beta1": 1.0}, "optimizer.beta1"),
                                            ({}, "optimizer")])
def test_set_optimizer_refuses_what_it_cannot_change_naming_the_field(client, changes, field):
    remote = client.create_model(**SPEC)
    with pytest.raises(grpc.RpcError) as err:
        remote.set_optimizer(**changes)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert remote.refresh().spec["optimizer"]["lr"] == 0.01  # unchanged


def test_set_optimizer_refuses_momentum_on_or_off(client):
    remote = client.create_model(**{**SPEC, "optimizer": {"name": "sgd", "lr": 0.1}})
    with pytest.raises(grpc.RpcError) as err:
        remote.set_optimizer(momentum=0.9)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "momentum" in err.value.details()


def test_optimizer_changes_and_checkpoint_restores_replay_bit_exactly_after_sigkill(tmp_path):
    store = tmp_path / "g.db"
    proc = ServerProcess(store, "--durability", "step")
    local = Model(ModelSpec.from_dict({**_spec_dict(SPEC), "device": "cpu"}))
    with Client(proc.target, timeout=60) as c:
        remote = c.create_model(**SPEC, model_id="m")
        for k in range(3):
            remote.train_step(*batch(k)), local.train_step(*batch(k))
        remote.set_optimizer(lr=0.03)
        local = with_lr(local, lr=0.03)
        assert remote.save_checkpoint("after3") == 3
        saved = local.state_dict()
        for k in range(3, 5):
            remote.train_step(*batch(k)), local.train_step(*batch(k))
        remote.save()  # a snapshot carrying lr=0.03: the restart loads it, then replays the log after it
        remote.set_optimizer(lr=0.002, beta2=0.99)
        local = with_lr(local, lr=0.002, beta2=0.99)
        for k in range(5, 7):
            remote.train_step(*batch(k)), local.train_step(*batch(k))
        assert remote.restore_checkpoint("after3") == 3
        local = Model(dataclasses.replace(local.spec, optimizer=dataclasses.replace(local.spec.optimizer, lr=0.03,
                                                                                    beta2=0.999)),
                      {**saved, "step": np.array(local.step)})
        remote.train_step(*batch(7)), local.train_step(*batch(7))
        assert [t for t, _, _ in remote.list_checkpoints()] == ["after3"]
    proc.kill()

    restarted = ServerProcess(store, "--durability", "step")
    try:
        with Client(restarted.target, timeout=60) as c:
            remote = c.get_model("m")
            # snapshot at version 6, then set_optimizer, 2 steps, restore, 1 step from the log
            assert "event=model_loaded model_id=m step=8 version=11 snapshot_version=6 replayed=5" in restarted.log()
            assert remote.info.step == local.step == 8
            assert remote.info.spec["optimizer"]["lr"] == 0.03 and remote.info.spec["optimizer"]["beta2"] == 0.999
            assert_weights_equal(remote.get_weights(), local.get_weights())
            r, l = remote.train_step(*batch(8)), local.train_step(*batch(8))
            assert (r.step, r.loss, r.lr) == (l.step, l.loss, l.lr)
            assert_weights_equal(remote.get_weights(), local.get_weights())  # the optimizer state matched too
            assert [t for t, _, _ in remote.list_checkpoints()] == ["after3"]
    finally:
        assert restarted.stop() == 0


def _spec_dict(kwargs: dict) -> dict:
    from gradserve.client import build_spec
    return build_spec(**kwargs)


def test_restore_of_an_unknown_tag_is_not_found(client):
    remote = client.create_model(**SPEC)
    with pytest.raises(grpc.RpcError) as err:
        remote.restore_checkpoint("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        remote.save_checkpoint("bad tag!")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("tag")


# -- callbacks in fit -------------------------------------------------------------------
def test_early_stopping_stops_after_patience_and_restores_the_best_weights(client):
    remote = client.create_model(**SPEC)
    X, y = data()
    stop = EarlyStopping(monitor="loss", patience=2, min_delta=NEVER_AGAIN, restore_best_weights=True)
    rec = Recorder()
    history = remote.fit(X, y, epochs=10, batch_size=16, progress=False, callbacks=[stop, rec])
    assert len(history["loss"]) == 3 and stop.stopped_epoch == 2 and stop.best_epoch == 0
    assert remote.refresh().step == 3 * 4  # steps go on; weights go back
    assert_weights_equal(remote.get_weights(), rec.weights[0])


def test_early_stopping_monitors_val_loss_by_default_and_says_when_fit_has_none(client):
    remote = client.create_model(**SPEC)
    X, y = data()
    history = remote.fit(X, y, epochs=3, batch_size=32, progress=False, validation_data=data(32, seed=1),
                         callbacks=[EarlyStopping(patience=5)])
    assert len(history["val_loss"]) == 3
    with pytest.raises(KeyError, match="val_loss.*validation_data"):
        remote.fit(X, y, epochs=1, progress=False, callbacks=[EarlyStopping()])


def test_reduce_lr_on_plateau_scales_the_lr_by_factor_down_to_min_lr(client):
    remote = client.create_model(**{**SPEC, "schedule": None})
    X, y = data()
    reduce = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=NEVER_AGAIN, min_lr=0.0025)
    rec = Recorder()
    remote.fit(X, y, epochs=6, batch_size=32, progress=False, callbacks=[reduce, rec])
    # epoch 0 is the best; every later one reduces (patience 1), the change acting from the next epoch on
    assert [log["lr"] for log in rec.logs] == pytest.approx([0.01, 0.01, 0.005, 0.0025, 0.0025, 0.0025])
    assert [(e, new) for e, _, new in reduce.reductions] == [(1, 0.005), (2, 0.0025)]
    assert remote.refresh().spec["optimizer"]["lr"] == 0.0025


def test_reduce_lr_on_plateau_waits_out_its_cooldown(client):
    remote = client.create_model(**{**SPEC, "schedule": None})
    X, y = data()
    reduce = ReduceLROnPlateau(monitor="loss", factor=0.1, patience=1, cooldown=2, min_delta=NEVER_AGAIN)
    remote.fit(X, y, epochs=6, batch_size=64, progress=False, callbacks=[reduce])
    # Keras counts the cooldown down at the start of each epoch: cooldown=2 leaves one epoch uncounted
    assert [e for e, _, _ in reduce.reductions] == [1, 3, 5]


def test_best_checkpoint_saves_the_best_epoch_and_restores_it_at_the_end(client):
    remote = client.create_model(**SPEC)
    X, y = data()
    best = BestCheckpoint("best", monitor="loss", min_delta=NEVER_AGAIN, restore_on_train_end=True)
    rec = Recorder()
    remote.fit(X, y, epochs=3, batch_size=16, progress=False, callbacks=[best, rec])
    assert best.best_epoch == 0 and best.saved_step == 4
    assert [(t, s) for t, s, _ in remote.list_checkpoints()] == [("best", 4)]
    assert remote.refresh().step == 12
    assert_weights_equal(remote.get_weights(), rec.weights[0])


def test_async_client_sets_the_optimizer_and_restores_checkpoints(server):
    import asyncio

    from gradserve.client import AsyncClient

    async def scenario():
        async with AsyncClient(server.target, timeout=60) as ac:
            remote = await ac.create_model(**SPEC)
            assert (await remote.set_optimizer(lr=0.5))["lr"] == 0.5
            assert await remote.save_checkpoint("zero") == 0
            before = await remote.get_weights()
            await remote.train_step(*batch(0))
            assert await remote.restore_checkpoint("zero") == 0
            assert [t for t, _, _ in await remote.list_checkpoints()] == ["zero"]
            restored = await remote.get_weights()
            assert await remote.accumulate_gradients(*batch(1)) == 8
            assert (await remote.optimizer_step()).step == 2
            zeros = {name: np.zeros_like(w) for name, w in restored.items()}
            assert (await remote.apply_gradients(zeros)).step == 3
            return before, restored, remote.info.step

    before, after, step = asyncio.run(scenario())
    assert step == 1
    assert_weights_equal(after, before)


def test_checkpoints_need_a_store_and_optimizer_changes_work_in_memory():
    from gradserve.server.registry import Durability, DurabilityOff, ModelRegistry
    registry = ModelRegistry(None, durability=Durability("none"))
    handle, _ = registry.create(_spec_dict(SPEC))
    with pytest.raises(DurabilityOff, match="durability none"):
        registry.save_checkpoint(handle, "t")
    assert registry.set_optimizer(handle, {"lr": 0.5}).lr == 0.5
    assert registry.describe(handle)["spec"]["optimizer"]["lr"] == 0.5


def test_a_refused_step_after_an_optimizer_change_rolls_back_onto_the_changed_optimizer():
    from gradserve.server.registry import Durability, ModelRegistry, StateOverflow
    registry = ModelRegistry(None, durability=Durability("none"))
    handle, _ = registry.create(_spec_dict({**SPEC, "hidden": [], "output": (1, "identity"),
                                            "optimizer": {"name": "sgd", "lr": 0.01}}))
    registry.set_optimizer(handle, {"lr": 3e38})  # float32 parameters overflow on the next step
    before = handle.model.get_weights()
    X, _ = batch(0)
    y = np.full((8, 1), 1e4, np.float32)
    with pytest.raises(StateOverflow):
        registry.train_step(handle, X, y)
    assert handle.model.step == 0 and handle.model.spec.optimizer.lr == 3e38
    assert_weights_equal(handle.model.get_weights(), before)
    registry.set_optimizer(handle, {"lr": 0.01})
    assert registry.train_step(handle, X, y)[0].lr == pytest.approx(0.01 * 0.5 ** 0)
