"""Tenants (--auth-tokens) on a real server: each tenant sees and changes only
the models it created, on every RPC, across a restart; the admin sees all."""
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from gradserve.client import Client
from gradserve.client._wire import train_request
from gradserve.client.sync import RemoteModel
from gradserve.v1 import trainer_pb2 as pb
from service_fixtures import ServerProcess

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab", "admin": "admin-token-0123456789"}
SPEC = dict(input_size=3, hidden=[{"units": 4, "activation": "tanh"}], output={"units": 2, "kind": "softmax"}, seed=1)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tokens.txt"
    path.write_text("# tenant token\n" + "".join(f"{t} {tok}  # {t}'s\n" for t, tok in TOKENS.items()) + "\n")
    return path


def connect(proc, tenant: str) -> Client:
    return Client(proc.target, token=TOKENS[tenant], timeout=60, retries=0)


def not_found(call) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value


def test_tenants_see_only_their_models_across_a_restart(tmp_path, token_file):
    store = tmp_path / "gradserve.db"
    X = np.ones((2, 3), np.float32)
    y = np.array([0, 1])
    proc = ServerProcess(store, "--auth-tokens", str(token_file))
    try:
        with connect(proc, "alice") as alice, connect(proc, "bob") as bob:
            mine = alice.create_model(**SPEC, model_id="alice-model")
            theirs = bob.create_model(**SPEC, model_id="bob-model")
            mine.train_step(X, y)
            assert [m.model_id for m in alice.list_models()] == ["alice-model"]
            assert [m.model_id for m in bob.list_models()] == ["bob-model"]
            # bob's handle on alice's id: every RPC answers as for an absent model
            foreign = RemoteModel(bob, mine.info)
            not_found(lambda: bob.get_model("alice-model"))
            not_found(lambda: foreign.train_step(X, y))
            not_found(lambda: foreign.predict(X))
            not_found(lambda: foreign.get_weights())
            not_found(lambda: bob.delete_model("alice-model"))
            # the streaming RPCs, where the tenant must reach a reader thread
            # (TrainStream) and the steps of a reply iterator (Fit)
            with grpc.insecure_channel(proc.target) as channel:
                auth = (("authorization", f"Bearer {TOKENS['bob']}"),)
                train_stream = channel.stream_stream("/gradserve.v1.Trainer/TrainStream",
                                                     request_serializer=pb.TrainStepRequest.SerializeToString,
                                                     response_deserializer=pb.TrainStepResponse.FromString)
                not_found(lambda: list(train_stream(iter([train_request("alice-model", X, y)]), metadata=auth,
                                                    timeout=30)))
                dataset = bob.upload_dataset(X, y)
                fit = channel.unary_stream("/gradserve.v1.Trainer/Fit", request_serializer=pb.FitRequest.SerializeToString,
                                           response_deserializer=pb.FitProgress.FromString)
                not_found(lambda: list(fit(pb.FitRequest(model_id="alice-model", dataset_id=dataset.dataset_id,
                                                         epochs=1, batch_size=2), metadata=auth, timeout=30)))
            # the id is global: bob cannot take it over with an equal spec
            with pytest.raises(grpc.RpcError) as taken:
                bob.create_model(**SPEC, model_id="alice-model")
            assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
            with triton.InferenceServerClient(proc.target) as v2:
                with pytest.raises(InferenceServerException) as err:
                    v2.get_model_metadata("alice-model", headers={"authorization": f"Bearer {TOKENS['bob']}"})
                assert err.value.status() == "StatusCode.NOT_FOUND"
                meta = v2.get_model_metadata("alice-model", headers={"authorization": f"Bearer {TOKENS['alice']}"})
                assert meta.name == "alice-model"
            assert mine.refresh().step == 1  # bob's refused step changed nothing
            assert theirs.refresh().step == 0
        with connect(proc, "admin") as admin:
            assert sorted(m.model_id for m in admin.list_models()) == ["alice-model", "bob-model"]
        with Client(proc.target, token="not-a-token-0123456789", timeout=30, retries=0) as stranger:
            with pytest.raises(grpc.RpcError) as err:
                stranger.list_models()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert proc.stop() == 0, proc.log()
    proc = ServerProcess(store, "--auth-tokens", str(token_file))
    try:
        with connect(proc, "alice") as alice, connect(proc, "bob") as bob, connect(proc, "admin") as admin:
            assert [m.model_id for m in alice.list_models()] == ["alice-model"]
            assert [m.model_id for m in bob.list_models()] == ["bob-model"]
            assert sorted(m.model_id for m in admin.list_models()) == ["alice-model", "bob-model"]
            not_found(lambda: alice.get_model("bob-model"))
            assert alice.get_model("alice-model").step == 1
            bob.delete_model("bob-model")
            assert [m.model_id for m in admin.list_models()] == ["alice-model"]
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.mark.parametrize("content, message", [
    ("alice short\n", "use at least 16"),
    ("alice tok-0123456789abcdef extra\n", "line 1: expected 'tenant token'"),
    ("# nothing\n", "no 'tenant token' lines"),
    ("alice tok-0123456789abcdef\nbob tok-0123456789abcdef\n", "line 2: a token given twice"),
])
def test_a_bad_token_file_refuses_to_start(tmp_path, content, message):
    from gradserve.server.tenants import parse_tokens
    with pytest.raises(ValueError, match=message):
        parse_tokens(content)


def test_tenants_and_a_single_token_refuse_to_start_together(tmp_path, token_file):
    with pytest.raises(RuntimeError, match="not both"):
        ServerProcess(tmp_path / "gradserve.db", "--auth-tokens", str(token_file), "--auth-token-file",
                      str(token_file), startup_timeout=60)


def test_a_store_from_before_tenants_opens_with_unowned_models(tmp_path):
    """The models table without its tenant column gains it, as '' (owned by
    none: seen by the admin and by a single-token server)."""
    import json
    import sqlite3

    from gradserve.server.store import SqliteStore
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE models (id TEXT PRIMARY KEY, uid INTEGER NOT NULL, spec TEXT NOT NULL, "
                   "created REAL NOT NULL)")
        db.execute("INSERT INTO models VALUES ('old-model', 7, ?, 1.5)", (json.dumps({"input_size": 3}),))
    store = SqliteStore(str(path))
    try:
        [model] = store.models()
        assert (model.model_id, model.uid, model.created, model.tenant) == ("old-model", 7, 1.5, "")
    finally:
        store.close()
