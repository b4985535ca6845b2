"""gradserve's wire layer: the generated protobuf/gRPC code (``gradserve.v1``),
the Tensor codec (``gradserve.wire.tensor``), the ModelSpec message codec
(``gradserve.wire.specmsg``) and the retry-safe status signal
(``gradserve.wire.status``). Shared by server and client; imports neither numba
nor nnkernels."""
