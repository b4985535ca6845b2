"""How the CPU kernels cut each dense layer's product into BLAS calls: the
fixed tiles (batch rows × output features per call) of ``cpu.kernels``.

Training tiles are ``ROW_TILE`` × ``COL_TILE``, halved by the product's
shape alone (``kernels._split``) until a product has a few of them: they
depend on no thread count, so neither do the bits.

Inference must also give a row the same bits whichever rows share its batch
(dynamic batching coalesces callers). OpenBLAS's result for one element
depends on the call's shape: measured on SkylakeX-class cores (OpenBLAS
0.3.31), each K splits call shapes into two classes (small products, M=1
gemv included, go to kernels that skip packing; larger ones to the packed
kernel), and within one class the bits depend neither on the shape nor on
the element's position in the tile. So ``predict_tiles`` probes the BLAS
this process runs on and picks, per model, a padding quantum q (the batch
is run as n rounded up to a multiple of q) and per layer the tile of its
calls, so that every call a layer can make falls into one class:

- the smallest q of ``QUANTA`` but the last (q = 1: no padding, a batch of
  one costs one row) for which every layer has either big tiles
  (``ROW_TILE`` × ``COL_TILE``) or small ones (``SMALL_TILES``) whose every
  row count that is a multiple of q agrees (at q = 1 a layer with at
  most ``ROW_BY_ROW_MAX`` weights, such as a 10-unit output layer, may
  instead make one call per row, always);
- else q = ``PREDICT_ROWS``: big tiles where row counts that are multiples
  of q agree, else exactly q × ``PREDICT_COLS`` per call, always (one shape
  for every batch: consistent on any BLAS whose bits depend on the call's
  shape only; the small-matrix kernels, which skip packing, run these at
  about 70% of a big call's speed).

Probing checks the row counts listed in ``_rows_to_probe``, not every one;
tests/test_products.py checks whole batches against single rows.
"""
from __future__ import annotations

import threading

import numpy as np

from .kernels import COL_TILE, ROW_TILE, _xwt

# (here, not in cpu.kernels, which never reads them: retuning them recompiles no kernel)
PREDICT_ROWS = 8   # inference: the padding quantum when one is needed
PREDICT_COLS = 64  # inference, layers without big tiles: output features per call
SMALL_TILES = tuple((r, PREDICT_COLS) for r in (32, 16, 8, 4, 3, 2))  # small tiles (rows, features per call), preferred first
QUANTA = (1, 4, PREDICT_ROWS)  # padding quanta, tried in this order
ROW_BY_ROW_MAX = 65536  # weights (fin × fout) up to which a layer may run one row per call (cache-resident W)
_probed: dict[tuple, bool] = {}
_probe_lock = threading.Lock()


def train_tiles(layers: int) -> np.ndarray:
    """The training tiles of every layer (layers × 3, int64: rows, output
    features per call, padding quantum 1)."""
    return np.array([[ROW_TILE, COL_TILE, 1]] * layers, np.int64).reshape(layers, 3)


def _rows_to_probe(tile_rows: int, quantum: int) -> tuple[int, ...]:
    """Row counts a call of a tile_rows-row tile can have with padding
    quantum q (multiples of q up to tile_rows), sampled."""
    cands = {quantum, 2 * quantum, 3 * quantum, 7 * quantum, 8 * quantum, 9 * quantum,
             tile_rows // 2 + quantum, tile_rows - quantum, tile_rows}
    return tuple(sorted(r for r in cands if 0 < r <= tile_rows and r % quantum == 0))


def _agree(dtype: np.dtype, fin: int, width: int, rows: tuple[int, ...]) -> bool:
    """Whether a row's product with ``width`` output features over ``fin``
    inputs has the same bits in calls of every row count in ``rows``, at
    the first and the last position of the call, for three draws of data
    (Gaussian, ReLU-like with zeros, and small uniform: a difference in the
    order of the sums shows in some rows only); cached per process."""
    key = (dtype.str, fin, width, rows)
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _probe(dtype, fin, width, rows)
        return _probed[key]


def _probe(dtype: np.dtype, fin: int, width: int, rows: tuple[int, ...]) -> bool:
    rs = np.random.default_rng(12345)
    top = max(rows)
    W = rs.standard_normal((width, fin)).astype(dtype)
    Z = np.empty((top, width), dtype)
    exact = np.empty(top * fin, dtype)  # a tail: _xwt keeps the tiles as given (unused: no padding)
    g = rs.standard_normal((top, fin))
    for H in (g, np.maximum(g, 0.0), rs.uniform(-0.01, 0.01, (top, fin))):
        H = np.ascontiguousarray(H, dtype)
        seen: dict[int, bytes] = {}
        for r in rows:
            for start in sorted({0, top - r}):
                _xwt(H[start:start + r], W, Z, r, r, width, exact)
                for i in range(r):
                    got = Z[i].tobytes()
                    if seen.setdefault(start + i, got) != got:
                        return False
    return True


def _tile_agrees(dtype, fin: int, fout: int, tile_rows: int, tile_cols: int, quantum: int) -> bool:
    """Whether every call of a (tile_rows × tile_cols) tiling of this layer
    gives a row the same bits: each column width it uses, every row count."""
    widths = {min(tile_cols, fout)} | ({fout % tile_cols} if fout > tile_cols and fout % tile_cols else set())
    rows = _rows_to_probe(tile_rows, quantum)
    return all(_agree(dtype, fin, w, rows) for w in sorted(widths))


def predict_tiles(dtype, sizes) -> np.ndarray:
    """The inference tiles (layers × 3, int64: rows and output features per
    BLAS call, and the model's padding quantum in every row) of a network
    with layer sizes ``sizes`` (inputs first); see the module docstring."""
    dtype = np.dtype(dtype)
    shapes = list(zip(sizes[:-1], sizes[1:]))
    for q in QUANTA[:-1]:
        tiles = []
        for fin, fout in shapes:
            fit = next(((r, c) for r, c in ((ROW_TILE, COL_TILE), *SMALL_TILES)  # the first that agrees
                        if r % q == 0 and _tile_agrees(dtype, fin, fout, r, c, q)), None)
            if fit is None and q == 1 and fin * fout <= ROW_BY_ROW_MAX:
                fit = (1, PREDICT_COLS)  # one row per call, always: one shape whatever the batch
            if fit is None:
                break
            tiles.append((*fit, q))
        else:
            return np.array(tiles, np.int64).reshape(len(tiles), 3)
    q = QUANTA[-1]
    tiles = [(ROW_TILE, COL_TILE, q) if _tile_agrees(dtype, fin, fout, ROW_TILE, COL_TILE, q) else (q, PREDICT_COLS, q)
             for fin, fout in shapes]
    return np.array(tiles, np.int64).reshape(len(tiles), 3)
