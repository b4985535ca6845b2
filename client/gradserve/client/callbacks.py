"""Keras-style callbacks for ``RemoteModel.fit``: early stopping,
reduce-LR-on-plateau and a checkpoint of the best epoch.

A callback sees ``on_train_begin(model)``, ``on_epoch_end(epoch, logs,
model)`` after every epoch (``logs``: the epoch's ``loss``, ``accuracy``,
``val_loss``, ``val_accuracy`` as in fit's history, and ``lr``, the rate of
the epoch's last step) and ``on_train_end(model)`` once training ends
(stopped early or not). Setting ``model.stop_training = True`` ends fit
after the current epoch, as in Keras. ``model`` is the ``RemoteModel``; the
callbacks act on the server through it (SetOptimizer, SaveCheckpoint,
RestoreCheckpoint, GetWeights/SetWeights).

Every callback monitors ``val_loss`` by default (``mode="min"``; ``"max"``
for accuracies; ``"auto"`` picks max for names with ``acc`` in them). A
value is an improvement over ``best`` when it is below ``best - min_delta``
(``min``) or above ``best + min_delta`` (``max``): Keras' absolute
threshold.
"""
from __future__ import annotations

import math


class Callback:
    """Base class: every hook does nothing."""

    def on_train_begin(self, model) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict, model) -> None:
        pass

    def on_train_end(self, model) -> None:
        pass


class _Monitor:
    """The monitored value and what counts as an improvement."""

    def __init__(self, monitor: str, mode: str, min_delta: float):
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)

    def worst(self) -> float:
        return math.inf if self.mode == "min" else -math.inf

    def current(self, logs: dict) -> float:
        if self.monitor not in logs:
            hint = "; pass validation_data to fit" if self.monitor.startswith("val_") else ""
            raise KeyError(f"{type(self).__name__} monitors {self.monitor!r}, which this fit does not report "
                           f"(it reports {', '.join(sorted(logs))}){hint}")
        return float(logs[self.monitor])

    def improves(self, current: float, best: float) -> bool:
        if self.mode == "min":
            return current < best - self.min_delta
        return current > best + self.min_delta


class EarlyStopping(Callback, _Monitor):
    """Stops fit when ``monitor`` has not improved for ``patience`` epochs
    (Keras' ``EarlyStopping``): the epoch counts since the last improvement
    reach ``patience`` -> ``model.stop_training``. With
    ``restore_best_weights`` the parameters of the best epoch are set back
    when training ends (weights only, as Keras: optimizer state and step
    count go on); they are fetched with GetWeights at each improvement."""

    def __init__(self, monitor: str = "val_loss", *, patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = False):
        _Monitor.__init__(self, monitor, mode, min_delta)
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience!r}")
        self.patience = patience
        self.restore_best_weights = restore_best_weights

    def on_train_begin(self, model) -> None:
        self.best = self.worst()
        self.best_epoch = -1
        self.best_weights = None
        self.wait = 0
        self.stopped_epoch = -1

    def on_epoch_end(self, epoch: int, logs: dict, model) -> None:
        current = self.current(logs)
        if self.improves(current, self.best):
            self.best, self.best_epoch, self.wait = current, epoch, 0
            if self.restore_best_weights:
                self.best_weights = model.get_weights()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            model.stop_training = True

    def on_train_end(self, model) -> None:
        if self.restore_best_weights and self.best_weights is not None:
            model.set_weights(self.best_weights)


class ReduceLROnPlateau(Callback, _Monitor):
    """Multiplies the learning rate by ``factor`` when ``monitor`` has not
    improved for ``patience`` epochs (Keras' ``ReduceLROnPlateau``):
    new lr = max(lr · factor, min_lr), applied with SetOptimizer, then
    ``cooldown`` epochs without counting. The lr changed is the spec's
    ``optimizer.lr``, the base of the server's schedule (as torch's
    ReduceLROnPlateau sets ``param_group['lr']``); a rate already at
    ``min_lr`` is left alone. ``min_delta`` defaults to Keras' 1e-4."""

    def __init__(self, monitor: str = "val_loss", *, factor: float = 0.1, patience: int = 10,
                 min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0, mode: str = "auto"):
        _Monitor.__init__(self, monitor, mode, min_delta)
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        if patience < 0 or cooldown < 0 or min_lr < 0:
            raise ValueError("patience, cooldown and min_lr must be >= 0")
        self.factor = factor
        self.patience = patience
        self.cooldown = cooldown
        self.min_lr = min_lr

    def on_train_begin(self, model) -> None:
        self.best = self.worst()
        self.wait = 0
        self.cooldown_counter = 0
        self.reductions: list[tuple[int, float, float]] = []  # (epoch, old lr, new lr)

    def on_epoch_end(self, epoch: int, logs: dict, model) -> None:
        current = self.current(logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.improves(current, self.best):
            self.best, self.wait = current, 0
            return
        if self.cooldown_counter > 0:
            return
        self.wait += 1
        if self.wait >= self.patience:
            old = float(model.info.spec["optimizer"]["lr"])
            if old > self.min_lr:
                new = max(old * self.factor, self.min_lr)
                model.set_optimizer(lr=new)
                self.reductions.append((epoch, old, new))
                self.cooldown_counter = self.cooldown
                self.wait = 0


class BestCheckpoint(Callback, _Monitor):
    """Saves the model's whole state (parameters, optimizer state and
    hyper-parameters) as the server-side checkpoint ``tag`` at each epoch
    whose ``monitor`` improves (Keras' ``ModelCheckpoint(save_best_only=True)``);
    with ``restore_on_train_end`` puts it back (RestoreCheckpoint) when
    training ends. Needs a server with a store (not ``--durability none``)."""

    def __init__(self, tag: str = "best", monitor: str = "val_loss", *, mode: str = "auto",
                 min_delta: float = 0.0, restore_on_train_end: bool = False):
        _Monitor.__init__(self, monitor, mode, min_delta)
        self.tag = tag
        self.restore_on_train_end = restore_on_train_end

    def on_train_begin(self, model) -> None:
        self.best = self.worst()
        self.best_epoch = -1
        self.saved_step = None

    def on_epoch_end(self, epoch: int, logs: dict, model) -> None:
        current = self.current(logs)
        if self.improves(current, self.best):
            self.best, self.best_epoch = current, epoch
            self.saved_step = model.save_checkpoint(self.tag)

    def on_train_end(self, model) -> None:
        if self.restore_on_train_end and self.saved_step is not None:
            model.restore_checkpoint(self.tag)


class CallbackList:
    """What fit calls: every callback's hook in order."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks or ())
        for c in self.callbacks:
            if not isinstance(c, Callback):
                raise TypeError(f"callbacks must be gradserve.client.callbacks.Callback objects, got {c!r}")

    def train_begin(self, model) -> None:
        model.stop_training = False
        for c in self.callbacks:
            c.on_train_begin(model)

    def epoch_end(self, epoch: int, logs: dict, model) -> bool:
        """Runs the hooks; True when one of them asked fit to stop."""
        for c in self.callbacks:
            c.on_epoch_end(epoch, logs, model)
        return bool(model.stop_training)

    def train_end(self, model) -> None:
        for c in self.callbacks:
            c.on_train_end(model)
