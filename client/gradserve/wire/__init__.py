"""gradserve's wire layer: the generated protobuf/gRPC code (``gradserve.v1``),
the Tensor codec (``gradserve.wire.tensor``) and the ModelSpec message codec
(``gradserve.wire.specmsg``). Shared by server and client; imports neither numba
nor nnkernels."""
