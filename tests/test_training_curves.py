"""--tensorboard-dir: per-model training curves as TensorBoard event files,
read back with TensorBoard's own EventAccumulator."""
import numpy as np
import pytest

from tensorboard.backend.event_processing import event_accumulator

from gradserve.client import Client
from gradserve.nnkernels import StepResult
from gradserve.server.curves import TrainingCurves
from service_fixtures import ServerProcess



def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_each_model_gets_a_run_with_loss_accuracy_lr_and_grad_norm_per_step(tmp_path):
    logdir = tmp_path / "tb"
    proc = ServerProcess(tmp_path / "g.db", "--tensorboard-dir", str(logdir))
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((32, 4)).astype(np.float32), rng.integers(0, 2, 32)
    try:
        with Client(proc.target, timeout=60) as c:
            clf = c.create_model(4, [(8, "relu")], (2, "softmax"), model_id="clf",
                                 optimizer={"name": "sgd", "lr": 0.1}, schedule={"name": "exponential", "gamma": 0.5})
            steps = [clf.train_step(X[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
            steps += list(clf.train_stream([(X[:8], y[:8]), (X[8:16], y[8:16])]))
            reg = c.create_model(4, [], (1, "identity"), model_id="reg")
            reg_steps = [reg.train_step(X, X[:, :1]) for _ in range(3)]
    finally:
        assert proc.stop() == 0  # closing the writers flushes them
    assert sorted(p.name for p in logdir.iterdir()) == ["clf", "reg"]
    got = scalars(logdir / "clf")
    assert sorted(got) == ["train/accuracy", "train/grad_norm", "train/loss", "train/lr"]
    assert got["train/loss"] == [(r.step, pytest.approx(r.loss, rel=1e-6)) for r in steps]
    assert got["train/accuracy"] == [(r.step, pytest.approx(r.accuracy, rel=1e-6)) for r in steps]
    assert got["train/grad_norm"] == [(r.step, pytest.approx(r.grad_norm, rel=1e-6)) for r in steps]
    assert [v for _, v in got["train/lr"]] == pytest.approx([0.1 * 0.5 ** t for t in range(6)])
    got = scalars(logdir / "reg")
    assert "train/accuracy" not in got  # regression has none
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3]
    assert [v for _, v in got["train/loss"]] == pytest.approx([r.loss for r in reg_steps], rel=1e-6)


def test_a_retried_step_is_written_once_and_dot_ids_stay_inside_the_dir(tmp_path):
    curves = TrainingCurves(tmp_path)
    for step in (1, 2, 2, 3):  # step 2 answered twice (a retry from the kept replies)
        curves.step("..", StepResult(step, float(step), None, 1.0, 0.1))
    curves.close()
    assert [p.name for p in tmp_path.iterdir()] == ["_.."]
    assert [s for s, _ in scalars(tmp_path / "_..")["train/loss"]] == [1, 2, 3]
