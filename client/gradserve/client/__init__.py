"""gradserve's Python client: numpy in, numpy out, over gRPC.

    from gradserve.client import Client
    with Client("127.0.0.1:50051") as c:
        model = c.create_model(2, hidden=[(8, "tanh")], output=(1, "sigmoid"), optimizer={"name": "adam", "lr": 0.05})
        history = model.fit(X, y, epochs=100, batch_size=4)

Never imports numba or nnkernels (the server side); only the wire layer
in ``gradserve``. ``AsyncClient`` is the grpc.aio twin.
"""
from ._wire import ModelInfo, StepResult, build_spec
from .aio import AsyncClient, AsyncRemoteModel
from .sync import Client, RemoteModel

__all__ = ["Client", "RemoteModel", "AsyncClient", "AsyncRemoteModel", "ModelInfo", "StepResult", "build_spec"]
