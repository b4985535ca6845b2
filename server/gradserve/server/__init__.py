"""gradserve's gRPC service: servicer, model registry, SQLite store, limits,
configuration and CLI. Computation is nnkernels'; this package decodes,
validates, locks, persists and encodes."""
