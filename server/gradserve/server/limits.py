"""The server's configurable limits and the error that names one."""
from __future__ import annotations

from dataclasses import dataclass


class LimitExceeded(Exception):
    """A request is over a configured limit (gRPC RESOURCE_EXHAUSTED). The
    message names the limit, its flag and the value asked for."""

    def __init__(self, limit: str, allowed, requested, what: str):
        self.limit = limit
        super().__init__(f"limit {limit}={allowed} (--{limit.replace('_', '-')}) exceeded: {what} {requested}")


@dataclass(frozen=True)
class Limits:
    max_models: int = 1000
    max_params: int = 50_000_000
    max_batch_rows: int = 65_536
    max_message_mb: float = 64.0
    max_layers: int = 64
    # data sets for server-side Fit
    max_dataset_mb: float = 512.0
    max_datasets_mb: float = 2048.0

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def check_spec(self, spec) -> None:
        layers = len(spec.hidden) + 1
        if layers > self.max_layers:
            raise LimitExceeded("max_layers", self.max_layers, layers, "the spec has layers:")
        if spec.num_params > self.max_params:
            raise LimitExceeded("max_params", self.max_params, spec.num_params, "the spec has parameters:")

    def check_rows(self, rows: int, field: str = "inputs") -> None:
        if rows > self.max_batch_rows:
            raise LimitExceeded("max_batch_rows", self.max_batch_rows, rows, f"{field} has rows:")

    def check_message(self, size: int, what: str = "the request has bytes:") -> None:
        if size > self.max_message_bytes:
            raise LimitExceeded("max_message_mb", self.max_message_mb, size, what)

    # -- data sets --------------------------------------------------------------
    def check_dataset(self, nbytes: int, total_after: int | None = None) -> None:
        """One data set's bytes, and (when given) every stored data set's
        bytes once it is added."""
        if nbytes > self.max_dataset_mb * 1024 * 1024:
            raise LimitExceeded("max_dataset_mb", self.max_dataset_mb, nbytes, "the data set has bytes:")
        if total_after is not None and total_after > self.max_datasets_mb * 1024 * 1024:
            raise LimitExceeded("max_datasets_mb", self.max_datasets_mb, total_after,
                                "the stored data sets would have bytes:")
