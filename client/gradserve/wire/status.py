"""The one machine-readable signal gradserve sends beside a gRPC status:
"the server changed nothing for this call; sending it again is safe".

A status code alone cannot say this: UNAVAILABLE reports both a server
that refused a call before touching any model (warming up, shutting down)
and a connection lost after the server received, and maybe applied, the
call. A client that retried the second kind of TrainStep would train twice
on one batch. So the server, when it refuses a call before any model state
could change, adds the trailing-metadata entry ``gradserve-retry-safe: 1``,
and clients retry a non-idempotent call only when they find it.

Server side: ``mark_retry_safe(context)`` before ``context.abort``.
Client side: ``is_retry_safe(error)`` on the ``grpc.RpcError`` (blocking
stubs) or ``grpc.aio.AioRpcError`` (asyncio stubs) the call raised.
"""
from __future__ import annotations

RETRY_SAFE_KEY = "gradserve-retry-safe"
_RETRY_SAFE_VALUE = "1"


def mark_retry_safe(context) -> None:
    """Marks the call the server is about to fail as never having changed
    anything, so a client may send it again. ``context``: a
    ``grpc.ServicerContext`` (or ``grpc.aio.ServicerContext``); call this
    before ``context.abort``. Sets the call's trailing metadata, replacing
    any set before."""
    context.set_trailing_metadata(((RETRY_SAFE_KEY, _RETRY_SAFE_VALUE),))


def is_retry_safe(error) -> bool:
    """Whether the server marked the failed call ``error`` as having changed
    nothing (see ``mark_retry_safe``). ``error``: the ``grpc.RpcError`` a
    blocking call raised or the ``grpc.aio.AioRpcError`` an awaited one
    raised; False for an error the server did not send (a lost connection,
    a deadline) and for objects without trailing metadata."""
    trailing_metadata = getattr(error, "trailing_metadata", None)
    if trailing_metadata is None:
        return False
    # blocking stubs give a tuple of (key, value) pairs, asyncio stubs a
    # grpc.aio.Metadata, which iterates as (key, value) pairs too
    return any(key == RETRY_SAFE_KEY and value == _RETRY_SAFE_VALUE
               for key, value in trailing_metadata() or ())
