"""scikit-learn estimators that train on a gradserve server:
``GradServeClassifier`` and ``GradServeRegressor``, with the parameters,
defaults and fitted attributes of ``sklearn.neural_network.MLPClassifier`` /
``MLPRegressor`` where they mean the same thing. Needs the client's extra
``sklearn`` (``pip install 'gradserve-client[sklearn]'``).

    from gradserve.client.sklearn import GradServeClassifier
    clf = GradServeClassifier(hidden_layer_sizes=(64,), max_iter=50, target="127.0.0.1:50051")
    clf.fit(X, y).predict(X)

How the MLP's definitions map onto gradserve's (PyTorch's) — chosen so that
each update equals sklearn's, with the exceptions listed:

* sklearn's output layer: logistic for binary and multi-label targets,
  softmax for multi-class, identity for regression; gradserve's output kinds
  ``sigmoid``, ``softmax``, ``identity``, trained with their paired losses.
* Loss scale. sklearn's squared error is ½·mean((y-p)²) but its gradient is
  (p-y)/n, summed over the k outputs; its log loss sums over the outputs.
  gradserve's losses are means over all n·k elements (torch's MSELoss,
  BCEWithLogitsLoss; CrossEntropyLoss is a mean over rows). So gradserve's
  gradient is s·(sklearn's) with s = 2/k (regression), 1/k (logistic
  outputs), 1 (softmax). The estimators divide the SGD learning rate by s
  and multiply Adam's epsilon and the weight decay by s, which makes every
  step equal sklearn's. ``loss_curve_`` reports sklearn's scale (½·MSE,
  log loss summed over outputs) but without the L2 term.
* ``alpha`` (L2). sklearn adds 0.5·alpha·||W||²/n_batch to the loss: a
  gradient alpha·W/n_batch on the weights of each batch of n_batch rows, not
  on the biases. gradserve's L2 is torch's ``weight_decay`` (g += wd·p) on
  every parameter, fixed when the model is created; the estimators use
  wd = s·alpha/batch_size (the nominal batch size). Differences: the biases
  are decayed too, a smaller last batch gets the nominal batch's decay, and
  ``partial_fit`` keeps the batch size of its first call.
* ``solver="adam"``: torch's Adam adds epsilon to sqrt(v̂) after the bias
  correction, sklearn's before it (sklearn's epsilon equals torch's
  eps·sqrt(1-β2ᵗ)): the same at large t, a little different in the first
  few hundred steps. ``solver="sgd"``: sklearn's (Nesterov) momentum and
  torch's are the same update at a constant learning rate; only the
  constant schedule exists (no ``learning_rate``/``power_t``). ``"lbfgs"``
  is refused: gradserve trains with stochastic steps only.
* Initialization: Glorot uniform for weights and biases, bound
  sqrt(6/(fan_in+fan_out)) (sqrt(2/...) for ``activation="logistic"``), as
  sklearn, drawn by the server from a seed taken from ``random_state``.
* ``activation``: ``logistic`` is gradserve's ``sigmoid``; ``tanh``,
  ``relu``, ``identity`` keep their names.
* ``fit`` with ``warm_start=True`` keeps the weights and starts a fresh
  optimizer (as sklearn); ``partial_fit`` keeps the optimizer state.
* Early stopping, ``tol``, ``n_iter_no_change``, ``validation_fraction``,
  ``best_loss_``, ``validation_scores_``, ``best_validation_score_`` and the
  restoring of the best weights follow sklearn exactly (scores computed
  from the server's predictions).
* Data are dense (no sparse input); the model's dtype is float32 when X is
  float32, else float64, as sklearn's arithmetic.

Remote models. A fitted estimator holds a model on the server
(``model_id_``), not the weights; ``coefs_`` and ``intercepts_`` fetch them.
The estimator deletes its model when it is refitted (``fit`` without
``warm_start``), when ``delete_remote_model()`` is called, and when it is
garbage-collected — so a ``GridSearchCV`` leaves only its ``best_estimator_``'s
model. **Pickling** (and ``copy.deepcopy``) carries the server address and
the model id, not the weights: the copy predicts and trains on the same
remote model for as long as the server keeps it. Since a copy may then use
it, a pickled estimator and its copies never delete the model themselves;
call ``delete_remote_model()`` when done. Pickling a fitted estimator emits
``RemoteModelPickleWarning`` saying so. For weights that travel, see
``RemoteModel.save_safetensors`` / ``export_onnx`` (``remote_model_``).
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref

import grpc
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, column_or_1d
from sklearn.utils.multiclass import _check_partial_fit_first_call, check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

from .sync import Client, RemoteModel

__all__ = ["GradServeClassifier", "GradServeRegressor", "RemoteModelPickleWarning"]

ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
SOLVERS = ("adam", "sgd")
DEFAULT_TARGET = "127.0.0.1:50051"


class RemoteModelPickleWarning(UserWarning):
    """A fitted estimator was pickled: the pickle refers to a model on a
    server; it does not contain the weights."""


_clients: dict[tuple, Client] = {}


def _client_for(target: str, options: dict | None) -> Client:
    """One Client (one channel) per target and options, shared by every
    estimator of the process: a grid search makes hundreds of estimators."""
    key = (target, repr(sorted((options or {}).items())))
    if key not in _clients:
        _clients[key] = Client(target, **(options or {}))
    return _clients[key]


def _delete_quietly(client: Client, model_id: str) -> None:
    # runs from a finalizer, maybe inside garbage collection: never raise
    try:
        client._call("DeleteModel", _delete_request(model_id), 10.0)
    except Exception:  # noqa: BLE001 - the server may be gone; the model then is too
        pass


def _delete_request(model_id: str):
    from gradserve.v1 import trainer_pb2 as pb
    return pb.DeleteModelRequest(model_id=model_id)


def _check_params(est) -> None:
    """sklearn's parameter constraints for the parameters used here, as
    ValueErrors naming the parameter; lbfgs refused with the reason."""
    if est.solver == "lbfgs":
        raise ValueError("solver='lbfgs' is not supported: gradserve trains with stochastic mini-batch "
                         "steps only; use solver='adam' or 'sgd'")
    if est.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {est.solver!r}")
    if est.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {est.activation!r}")
    sizes = est.hidden_layer_sizes
    sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
    if not all(isinstance(u, numbers.Integral) and u > 0 for u in sizes):
        raise ValueError(f"hidden_layer_sizes must be positive integers, got {est.hidden_layer_sizes!r}")

    def number(name, lo, hi=math.inf, lo_open=False, hi_open=False, integral=False):
        v = getattr(est, name)
        ok = isinstance(v, numbers.Integral if integral else numbers.Real) and not isinstance(v, bool)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ValueError(f"{name} must be a{'n integer' if integral else ' number'} in {interval}, got {v!r}")

    number("alpha", 0)
    number("learning_rate_init", 0, lo_open=True)
    number("max_iter", 1, integral=True)
    number("tol", 0)
    number("momentum", 0, 1)
    number("beta_1", 0, 1, hi_open=True)
    number("beta_2", 0, 1, hi_open=True)
    number("epsilon", 0, lo_open=True)
    number("validation_fraction", 0, 1, lo_open=True, hi_open=True)
    number("n_iter_no_change", 1, integral=True)
    if est.batch_size != "auto":
        number("batch_size", 1, integral=True)


class _GradServeMLP(BaseEstimator):
    """What the classifier and the regressor share: the remote model's
    life, the spec, the training loop. See the module docstring."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate_init=0.001, max_iter=200, shuffle=True, random_state=None,
                 tol=1e-4, verbose=False, warm_start=False, momentum=0.9, nesterovs_momentum=True,
                 early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, target=DEFAULT_TARGET, client_options=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.target = target
        self.client_options = client_options

    # -- the remote model ---------------------------------------------------
    def _client(self) -> Client:
        return _client_for(self.target, self.client_options)

    @property
    def remote_model_(self) -> RemoteModel:
        """The fitted model on the server (reconnecting after unpickling)."""
        check_is_fitted(self, "model_id_")
        if getattr(self, "_remote", None) is None:
            client = _client_for(self._model_target, self._model_client_options)
            try:
                self._remote = client.get_model(self.model_id_)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise LookupError(f"model {self.model_id_!r} is no longer on the server at "
                                      f"{self._model_target}: a pickled estimator refers to its remote model, "
                                      f"it does not carry the weights") from exc
                raise
        return self._remote

    def _attach(self, remote: RemoteModel) -> None:
        self._release_model()
        self._remote = remote
        self.model_id_ = remote.model_id
        self._model_target = self.target
        self._model_client_options = self.client_options
        self._finalizer = weakref.finalize(self, _delete_quietly, remote.client, remote.model_id)
        self._finalizer.atexit = False  # at exit, models of live estimators stay (a pickle may refer to them)

    def _release_model(self) -> None:
        """Deletes the model this estimator owns (not one a pickle shares)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        self._finalizer = None
        self._remote = None

    def delete_remote_model(self) -> None:
        """Deletes the remote model now (also one shared through a pickle)
        and forgets the fitted state."""
        check_is_fitted(self, "model_id_")
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        client = _client_for(self._model_target, self._model_client_options)
        client.delete_model(self.model_id_)
        self._finalizer = None
        self._remote = None
        del self.model_id_

    def __getstate__(self):
        state = dict(super().__getstate__())  # BaseEstimator's may be __dict__ itself
        if "model_id_" in state:
            warnings.warn(RemoteModelPickleWarning(
                f"{type(self).__name__} pickled with a reference to model {self.model_id_!r} on "
                f"{self._model_target}, not its weights: the copy works while that server keeps the model. "
                f"Neither this estimator nor its copies delete the model any more; call "
                f"delete_remote_model() when done (remote_model_.save_safetensors() saves the weights)."),
                stacklevel=2)
            finalizer = getattr(self, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()  # a copy may use the model: this estimator gives up deleting it
            self._finalizer = None
        state.pop("_remote", None)
        state["_finalizer"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._remote = None  # reconnects on first use
        self._finalizer = None

    @property
    def coefs_(self) -> list[np.ndarray]:
        """Weight matrices (fan_in x fan_out, sklearn's layout), fetched from the server."""
        w = self.remote_model_.get_weights()
        return [w[f"layers.{i}.weight"].T for i in range(self.n_layers_ - 1)]

    @property
    def intercepts_(self) -> list[np.ndarray]:
        """Bias vectors, fetched from the server."""
        w = self.remote_model_.get_weights()
        return [w[f"layers.{i}.bias"] for i in range(self.n_layers_ - 1)]

    # -- the spec -----------------------------------------------------------
    def _hidden_sizes(self) -> list[int]:
        sizes = self.hidden_layer_sizes
        return [int(u) for u in (sizes if hasattr(sizes, "__iter__") else [sizes])]

    def _create_model(self, n_features: int, units: int, kind: str, dtype, batch_size: int,
                      rs: np.random.RandomState) -> RemoteModel:
        scale = {"identity": 2.0 / units, "sigmoid": 1.0 / units, "softmax": 1.0}[kind]
        activation = ACTIVATIONS[self.activation]
        common = {"name": self.solver, "weight_decay": scale * self.alpha / batch_size}
        if self.solver == "adam":
            optimizer = dict(common, lr=self.learning_rate_init, beta1=self.beta_1, beta2=self.beta_2,
                             eps=scale * self.epsilon)
        else:
            optimizer = dict(common, lr=self.learning_rate_init / scale, momentum=self.momentum,
                             nesterov=bool(self.nesterovs_momentum and self.momentum > 0))
        init = {"name": "xavier_uniform", "gain": 1 / math.sqrt(3) if self.activation == "logistic" else 1.0}
        return self._client().create_model(
            n_features, hidden=[(u, activation) for u in self._hidden_sizes()], output=(units, kind),
            optimizer=optimizer, weight_init=init, bias_init=init, dtype=np.dtype(dtype).name,
            seed=int(rs.randint(np.iinfo(np.int32).max)))

    # -- training -------------------------------------------------------------
    def _fit(self, X, y, incremental: bool):
        _check_params(self)
        first_pass = not hasattr(self, "model_id_") or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        targets, units, kind = self._encode_targets(y)
        n = X.shape[0]
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        batch_size = self._batch_size(n)
        rs = check_random_state(self.random_state)
        if first_pass:
            self._attach(self._create_model(X.shape[1], units, kind, X.dtype, batch_size, rs))
            self.n_outputs_ = units
            self.n_layers_ = len(self._hidden_sizes()) + 2
            self.out_activation_ = {"sigmoid": "logistic", "softmax": "softmax", "identity": "identity"}[kind]
            self._loss_scale = {"identity": 0.5, "sigmoid": float(units), "softmax": 1.0}[kind]
            self._batch_size_ = batch_size
            self.loss_curve_ = []
            self.n_iter_ = 0
            self.t_ = 0
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_, self.best_validation_score_, self.best_loss_ = [], -np.inf, None
            else:
                self.validation_scores_, self.best_validation_score_, self.best_loss_ = None, None, np.inf
        elif not incremental:
            # warm start: the fitted weights, a fresh optimizer (as sklearn)
            old = self.remote_model_
            sizes = [s for _, s in old.info.param_shapes if len(s) == 2]
            if [s[0] for s in sizes[:-1]] != self._hidden_sizes():
                raise ValueError(f"warm_start needs the fitted hidden_layer_sizes "
                                 f"{tuple(s[0] for s in sizes[:-1])}, got {self.hidden_layer_sizes!r}")
            weights = old.get_weights()
            model = self._create_model(X.shape[1], units, kind, old.info.spec.get("dtype", X.dtype),
                                       batch_size, rs)
            model.set_weights(weights)
            self._attach(model)
            self._no_improvement_count = 0
        self._train(X, y, targets, batch_size, incremental, rs)
        return self

    def _batch_size(self, n: int) -> int:
        if self.batch_size == "auto":
            return min(200, n)
        if self.batch_size > n:
            warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be "
                          "clipped")
        return int(np.clip(self.batch_size, 1, n))

    def _train(self, X, y, targets, batch_size: int, incremental: bool, rs: np.random.RandomState) -> None:
        remote = self.remote_model_
        early_stopping = self.early_stopping
        if early_stopping:
            stratify = y if (isinstance(self, ClassifierMixin) and y.ndim == 1) else None
            X, X_val, targets, _, y, y_val = train_test_split(
                X, targets, y, random_state=rs, test_size=self.validation_fraction, stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size "
                                 "of your dataset.")
        n = X.shape[0]
        best_weights = None
        for _ in range(1 if incremental else self.max_iter):
            order = rs.permutation(n) if self.shuffle else np.arange(n)
            index = [order[i:i + batch_size] for i in range(0, n, batch_size)]
            total = 0.0
            for k, result in enumerate(remote.train_stream((X[i], targets[i]) for i in index)):
                total += result.loss * len(index[k])
            self.loss_ = total / n * self._loss_scale
            if not math.isfinite(self.loss_):
                raise ValueError(f"Solver produced a non-finite loss ({self.loss_}); lower learning_rate_init "
                                 f"or scale the inputs")
            self.n_iter_ += 1
            self.t_ += n
            self.loss_curve_.append(self.loss_)
            if self.verbose:
                print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
            if early_stopping:
                score = self._validation_score(X_val, y_val)
                self.validation_scores_.append(score)
                if self.verbose:
                    print("Validation score: %f" % score)
                self._no_improvement_count = (self._no_improvement_count + 1
                                              if score < self.best_validation_score_ + self.tol else 0)
                if score > self.best_validation_score_:
                    self.best_validation_score_ = score
                    best_weights = remote.get_weights()
            else:
                self._no_improvement_count = (self._no_improvement_count + 1
                                              if self.loss_ > self.best_loss_ - self.tol else 0)
                self.best_loss_ = min(self.best_loss_, self.loss_)
            if self._no_improvement_count > self.n_iter_no_change:
                if self.verbose:
                    what = "Validation score" if early_stopping else "Training loss"
                    print(f"{what} did not improve more than tol={self.tol:f} for "
                          f"{self.n_iter_no_change} consecutive epochs. Stopping.")
                break
            if incremental:
                break
            if self.n_iter_ == self.max_iter:
                warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the optimization "
                              "hasn't converged yet." % self.max_iter, ConvergenceWarning)
        if early_stopping and best_weights is not None:
            remote.set_weights(best_weights)

    def _outputs(self, X) -> np.ndarray:
        check_is_fitted(self, "model_id_")
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return self.remote_model_.predict(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.target_tags.multi_output = True
        return tags


class GradServeClassifier(ClassifierMixin, _GradServeMLP):
    """``MLPClassifier`` trained on a gradserve server (module docstring:
    the mapping of every parameter, remote models and pickling).

    Binary targets train one logistic (sigmoid) output, multi-class a
    softmax, multi-label (an indicator matrix y) one sigmoid per label;
    ``classes_`` may hold any labels (strings, integers...).

    Extra parameters: ``target`` (the server's address) and
    ``client_options`` (keyword arguments of ``gradserve.client.Client``:
    timeout, token, TLS...). Fitted attributes as MLPClassifier's, plus
    ``model_id_`` and ``remote_model_``; ``coefs_``/``intercepts_`` are
    fetched from the server."""

    def fit(self, X, y):
        """Trains a new remote model (or, with ``warm_start``, goes on from
        the fitted weights) for up to ``max_iter`` epochs."""
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y) on the same remote model. ``classes``
        (every label) is required on the first call."""
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            from sklearn.utils.multiclass import type_of_target
            self._label_binarizer.fit(y if type_of_target(y).startswith("multilabel") else classes)
        return self._fit(X, y, incremental=True)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, multi_output=True, dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            if not incremental:
                self._label_binarizer = LabelBinarizer().fit(y)
            self.classes_ = self._label_binarizer.classes_
            if len(self.classes_) < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 classes in y, got 1 class: "
                                 f"{self.classes_[0]!r}")
        else:
            classes = unique_labels(y)
            if self.warm_start and not incremental:
                if set(classes) != set(self.classes_):
                    raise ValueError(f"warm_start can only be used where `y` has the same classes as in the "
                                     f"previous call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {classes}.")
        return X, y

    def _encode_targets(self, y):
        """(server targets, output units, output kind): class indices for a
        softmax, 0/1 floats for sigmoid outputs."""
        Y = self._label_binarizer.transform(y)
        if self._label_binarizer.y_type_ == "multiclass":
            return np.argmax(Y, axis=1).astype(np.int32), Y.shape[1], "softmax"
        return Y.astype(np.float32), Y.shape[1], "sigmoid"

    def _validation_score(self, X, y) -> float:
        return accuracy_score(y, self.predict(X))

    def predict(self, X):
        """Class labels (an indicator matrix for multi-label)."""
        out = self._outputs(X)
        if self.n_outputs_ == 1:
            out = out.ravel()
        return self._label_binarizer.inverse_transform(out)

    def predict_proba(self, X):
        """Class probabilities, columns in ``classes_`` order."""
        out = self._outputs(X)
        if self.out_activation_ == "logistic" and self.n_outputs_ == 1:
            p = out.ravel()
            return np.vstack([1 - p, p]).T
        return out

    def predict_log_proba(self, X):
        return np.log(self.predict_proba(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class GradServeRegressor(RegressorMixin, _GradServeMLP):
    """``MLPRegressor`` trained on a gradserve server (module docstring:
    the mapping of every parameter, remote models and pickling). Identity
    output with torch's MSE loss; y may have several columns. Extra
    parameters ``target`` and ``client_options`` as ``GradServeClassifier``."""

    def fit(self, X, y):
        """Trains a new remote model (or, with ``warm_start``, goes on from
        the fitted weights) for up to ``max_iter`` epochs."""
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y):
        """One epoch over (X, y) on the same remote model."""
        return self._fit(X, y, incremental=True)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=(np.float64, np.float32),
                             reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y

    def _encode_targets(self, y):
        Y = y.reshape(-1, 1) if y.ndim == 1 else y
        return Y, Y.shape[1], "identity"

    def _validation_score(self, X, y) -> float:
        return r2_score(y, self.predict(X))

    def predict(self, X):
        out = self._outputs(X)
        return out.ravel() if out.shape[1] == 1 else out
