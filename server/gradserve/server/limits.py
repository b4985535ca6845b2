"""The server's configurable limits and the error that names one."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# optimizer state vectors the size of the parameters, per optimizer (torch.optim's state;
# adam/adamw count amsgrad's max_exp_avg_sq, rmsprop centred+momentum's three)
OPTIMIZER_SLOTS = {"sgd": 1, "adagrad": 1, "rmsprop": 3, "adam": 3, "adamw": 3}
MEMORY_FRACTION = 0.5  # --max-memory-mb's default: this share of the machine's physical memory


def default_memory_mb() -> float:
    try:
        return MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX): a fixed 4 GiB
        return 4096.0


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
    max_memory_mb: float = field(default_factory=default_memory_mb)
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

    def model_bytes(self, spec) -> int:
        """A model's worst-case resident bytes: parameters, gradients and
        optimizer state, twice (the live model and the registry's base copy it
        is rebuilt from), plus the workspaces nnkernels keeps once a call of
        ``max_batch_rows`` rows has run: training's z, a, d and dropout-or-noise
        buffers and one forward pair, each activations-per-row ×
        rows, and the noise regularizers' copies (noisy targets per row, W̃
        once). (Dynamic batching runs one forward per model at a time; without
        it, concurrent Predicts on one model each keep one more pair.)"""
        itemsize = 8 if spec.dtype == "float64" else 4
        state = spec.num_params * (2 + OPTIMIZER_SLOTS.get(spec.optimizer.name, 3))
        per_row = sum(spec.layer_sizes[1:])  # activations per row, every layer
        has_h = any(layer.dropout > 0 or layer.noise_std > 0 for layer in spec.hidden)  # the h buffer
        workspace = self.max_batch_rows * (per_row * (3 + has_h + 2) + spec.input_size)
        # --- noise regularizers (issue 12) ---
        reg = spec.regularization
        workspace += self.max_batch_rows * spec.output.units * (reg.target_noise_std > 0)
        workspace += spec.num_params * (reg.weight_noise_std > 0)
        return itemsize * (2 * state + workspace) + 16 * self.max_batch_rows

    def check_memory(self, spec, in_use: int) -> None:
        """Refuses a model whose worst case would take the models' total over
        --max-memory-mb (``in_use``: the other models' worst case)."""
        need = self.model_bytes(spec)
        budget = int(self.max_memory_mb * 2**20)
        if in_use + need > budget:
            raise LimitExceeded("max_memory_mb", round(self.max_memory_mb, 1), round((in_use + need) / 2**20, 1),
                                f"this model needs at worst {need / 2**20:.1f} MiB (parameters, optimizer state, "
                                f"workspaces for --max-batch-rows {self.max_batch_rows}); the models would need MiB:")

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
