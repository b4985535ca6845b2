"""GradServeClassifier / GradServeRegressor against a real server: the
updates equal MLPClassifier's / MLPRegressor's from the same weights, a grid
search on digits matches MLPClassifier's accuracy and cleans up its models,
pickling keeps a reference (not the weights), and scikit-learn's own
estimator checks pass.

The estimator checks (``test_sklearn_estimator_checks``) run 113 checks in
~20 s on a (shared) 2-core machine: each estimator is built with small
settings (``max_iter=60``, 16 hidden units) that still learn the checks'
toy problems."""
from __future__ import annotations

import gc
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

from service_fixtures import source_env

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from gradserve.client.sklearn import GradServeClassifier, GradServeRegressor, RemoteModelPickleWarning  # noqa: E402

CHECK_SETTINGS = dict(hidden_layer_sizes=(16,), max_iter=60, learning_rate_init=0.02, n_iter_no_change=60)


def _server_models(client) -> set[str]:
    return {m.model_id for m in client.list_models()}


# -- sklearn's own checks -------------------------------------------------------------
def _expected_failed_checks(estimator) -> dict[str, str]:
    """No check is expected to fail. sklearn itself skips five (pytest lists
    them as skipped with sklearn's reason):
    check_array_api_input (x2): needs SCIPY_ARRAY_API=1 and an array-API
      library; the estimators send numpy over the wire anyway;
    check_classifier_data_not_an_array, check_regressor_data_not_an_array:
      their pandas variant needs pandas, which the test extra does not
      install (lists and other array-likes are checked elsewhere);
    check_classifiers_multilabel_output_format_decision_function: the
      classifier has predict_proba, no decision_function (as MLPClassifier).
    The sample_weight checks are not generated: fit takes no sample_weight."""
    return {}


@parametrize_with_checks([GradServeClassifier(**CHECK_SETTINGS), GradServeRegressor(**CHECK_SETTINGS)],
                         expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check, server):
    estimator.set_params(target=server.target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RemoteModelPickleWarning)
        check(estimator)


# -- the same updates as sklearn's MLP --------------------------------------------------
def _same_start(ours, theirs, X, y):
    """Both estimators fitted for one epoch, then ours given sklearn's
    weights; the next warm-started fit starts both from the same weights
    with a fresh optimizer."""
    for est in (ours, theirs):
        est.set_params(max_iter=1, warm_start=True, shuffle=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
    weights = {}
    for i, (W, b) in enumerate(zip(theirs.coefs_, theirs.intercepts_)):
        weights[f"layers.{i}.weight"], weights[f"layers.{i}.bias"] = W.T, b
    ours.remote_model_.set_weights(weights)


@pytest.mark.parametrize("solver", ["sgd", "adam"])
@pytest.mark.parametrize("problem", ["binary", "multiclass", "multilabel", "regression", "regression2"])
def test_updates_equal_sklearns_mlp_from_the_same_weights(server, solver, problem):
    """With alpha=0 (gradserve decays biases too, sklearn does not) every
    loss scale and update matches: the loss curves and the final weights
    agree to float64 rounding. Adam runs with a negligible epsilon: torch puts
    it after the bias correction, sklearn before (sklearn's epsilon is
    torch's eps·sqrt(1-β2ᵗ)), which moves the weights by ~1e-5 here with the
    default 1e-8."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 5))
    w = rng.normal(size=(5, 3))
    y = {"binary": np.where(X @ w[:, 0] > 0, "yes", "no"),
         "multiclass": np.argmax(X @ w, axis=1),
         "multilabel": (X @ w > 0).astype(int),
         "regression": X @ w[:, 0],
         "regression2": X @ w[:, :2]}[problem]
    regression = problem.startswith("regression")
    settings = dict(hidden_layer_sizes=(7, 4), activation="tanh", solver=solver, alpha=0.0, batch_size=20,
                    learning_rate_init=0.05 if solver == "sgd" else 0.01, momentum=0.8, nesterovs_momentum=True,
                    n_iter_no_change=100, epsilon=1e-8 if solver == "sgd" else 1e-15)
    ours = (GradServeRegressor if regression else GradServeClassifier)(target=server.target, **settings)
    theirs = (MLPRegressor if regression else MLPClassifier)(**settings)
    _same_start(ours, theirs, X, y)
    for est in (ours, theirs):
        est.set_params(max_iter=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
    assert len(ours.loss_curve_) == len(theirs.loss_curve_) == 9
    np.testing.assert_allclose(ours.loss_curve_[1:], theirs.loss_curve_[1:], rtol=1e-9)  # [0]: different inits
    for a, b in zip(ours.coefs_, theirs.coefs_):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    if regression:
        np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=0, atol=1e-9)
    else:
        np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=0, atol=1e-9)
        np.testing.assert_array_equal(ours.classes_, theirs.classes_)


def test_alpha_is_sklearns_l2_up_to_the_bias_decay(server):
    """alpha -> weight_decay = alpha/batch_size reproduces sklearn's L2 on the
    weights; gradserve also decays the biases (torch's weight_decay), so the
    weights end close to sklearn's, far closer than alpha moves them."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 5))
    y = X @ rng.normal(size=5)
    final = {}
    for alpha in (0.0, 3.0):
        settings = dict(hidden_layer_sizes=(8,), solver="sgd", alpha=alpha, batch_size=30, learning_rate_init=0.02,
                        momentum=0.5, n_iter_no_change=100)
        ours, theirs = GradServeRegressor(target=server.target, **settings), MLPRegressor(**settings)
        _same_start(ours, theirs, X, y)
        for est in (ours, theirs):
            est.set_params(max_iter=10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est.fit(X, y)
        final[alpha] = [np.concatenate([c.ravel() for c in est.coefs_]) for est in (ours, theirs)]
    moved_by_alpha = np.abs(final[3.0][1] - final[0.0][1]).max()
    ours_vs_sklearn = np.abs(final[3.0][0] - final[3.0][1]).max()
    print(f"alpha moved the weights by {moved_by_alpha:.3g}; ours vs sklearn {ours_vs_sklearn:.3g}")
    assert moved_by_alpha > 0.01
    assert ours_vs_sklearn < 0.05 * moved_by_alpha, (ours_vs_sklearn, moved_by_alpha)


# -- grid search on digits ------------------------------------------------------------
def test_grid_search_on_digits_matches_mlpclassifier_and_cleans_up(server, client):
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    settings = dict(hidden_layer_sizes=(32,), solver="adam", batch_size=32, max_iter=30, early_stopping=False,
                    random_state=0)
    grid = {"learning_rate_init": [1e-3, 1e-2]}
    gc.collect()
    before = _server_models(client)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GridSearchCV(GradServeClassifier(target=server.target, **settings), grid, cv=3).fit(X_train, y_train)
        theirs = GridSearchCV(MLPClassifier(**settings), grid, cv=3).fit(X_train, y_train)
    ours_acc, theirs_acc = ours.score(X_test, y_test), theirs.score(X_test, y_test)
    print(f"held-out accuracy: gradserve {ours_acc:.4f} (lr {ours.best_params_}), "
          f"MLPClassifier {theirs_acc:.4f} (lr {theirs.best_params_})")
    assert ours_acc > 0.95
    assert abs(ours_acc - theirs_acc) <= 0.01
    # 6 fits and a refit made 7 models; only the best estimator's is left
    gc.collect()
    left = _server_models(client) - before
    assert left == {ours.best_estimator_.model_id_}
    # a refit replaces (deletes) the model it had
    best = ours.best_estimator_
    old = best.model_id_
    best.set_params(max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        best.fit(X_train[:100], y_train[:100])
    assert best.model_id_ != old and old not in _server_models(client)
    del ours, best
    gc.collect()
    assert not (_server_models(client) - before)


# -- pickling, pipelines, parameters ----------------------------------------------------
def test_pickle_carries_the_model_reference_not_the_weights(server, client):
    X, y = make_regression(n_samples=60, n_features=4, random_state=0)
    est = make_pipeline(StandardScaler(), GradServeRegressor(hidden_layer_sizes=(300,), target=server.target, max_iter=5,
                                                                random_state=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    model_id = est[-1].model_id_
    with pytest.warns(RemoteModelPickleWarning, match=f"reference to model '{model_id}'.*not its weights"):
        blob = pickle.dumps(est)
    assert len(blob) < 4096 < 8 * est[-1].remote_model_.info.num_params  # no weights inside
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(copy.predict(X), est.predict(X))
    # the original no longer deletes the model: the copy still works after it is gone
    del est
    gc.collect()
    assert model_id in _server_models(client)
    np.testing.assert_array_equal(copy.predict(X), pickle.loads(blob).predict(X))
    copy[-1].delete_remote_model()
    assert model_id not in _server_models(client)
    with pytest.raises(LookupError, match="no longer on the server"):
        pickle.loads(blob).predict(X)


def test_unfitted_estimator_pickles_silently(server):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone = pickle.loads(pickle.dumps(GradServeClassifier(target=server.target, alpha=0.5)))
    assert clone.get_params()["alpha"] == 0.5


def test_partial_fit_warm_start_and_early_stopping(server):
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    labels = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])[y]
    est = GradServeClassifier(hidden_layer_sizes=(24,), target=server.target, random_state=0, batch_size=50,
                              learning_rate_init=0.01)
    for start in [0, 200, 400] * 2:
        est.partial_fit(X[start:start + 200], labels[start:start + 200], classes=np.unique(labels))
    assert est.n_iter_ == 6 and len(est.loss_curve_) == 6 and est.t_ == 1200
    assert est.loss_curve_[-1] < est.loss_curve_[0]
    assert sorted(est.classes_) == sorted(set(labels)) and est.n_features_in_ == 64
    model_id = est.model_id_
    est.partial_fit(X[600:800], labels[600:800])
    assert est.model_id_ == model_id  # partial_fit goes on with the same remote model
    with pytest.raises(ValueError, match="classes not in"):
        est.partial_fit(X[:5], np.array(["ten"] * 5))

    est.set_params(warm_start=True, max_iter=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, labels)
    assert est.n_iter_ == 10 and len(est.loss_curve_) == 10
    assert est.model_id_ != model_id  # warm start: same weights, fresh optimizer, new model

    stopped = GradServeClassifier(hidden_layer_sizes=(24,), target=server.target, random_state=0,
                                  early_stopping=True, validation_fraction=0.2, n_iter_no_change=2, tol=0.5,
                                  max_iter=50, solver="sgd", learning_rate_init=3.0).fit(X, labels)
    # tol=0.5 in accuracy: no epoch improves by that much, so it stops after 1 + n_iter_no_change + 1 epochs
    assert stopped.n_iter_ == 4 and len(stopped.validation_scores_) == 4
    assert stopped.best_validation_score_ == max(stopped.validation_scores_)
    assert stopped.best_loss_ is None
    # far too large a learning rate: a later epoch scores worse than the best one
    assert np.argmax(stopped.validation_scores_) < stopped.n_iter_ - 1, stopped.validation_scores_
    # the best epoch's weights are restored: the validation split scores best_validation_score_ again
    rs = np.random.RandomState(0)
    rs.randint(np.iinfo(np.int32).max)  # the model's seed is drawn first, then the split
    _, X_val, _, y_val = train_test_split(X, labels, random_state=rs, test_size=0.2, stratify=labels)
    assert stopped.score(X_val, y_val) == stopped.best_validation_score_
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping"):
        stopped.partial_fit(X, labels)


def test_refusals_name_the_parameter(server):
    X, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="solver='lbfgs' is not supported"):
        GradServeClassifier(solver="lbfgs", target=server.target).fit(X, y)
    with pytest.raises(ValueError, match="activation must be one of"):
        GradServeClassifier(activation="softsign", target=server.target).fit(X, y)
    with pytest.raises(ValueError, match="beta_2 must be"):
        GradServeClassifier(beta_2=1.0, target=server.target).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        GradServeClassifier(target=server.target).fit(X, np.zeros(4))


def test_client_imports_without_sklearn_onnx_or_safetensors():
    code = ("import sys; import gradserve.client, gradserve.client.interop; "
            "bad = [m for m in ('sklearn', 'onnx', 'safetensors', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], env=source_env(), check=True)
