"""Readers (and writers, for tests and small fixtures) of the published image-dataset file formats.

IDX (MNIST, Fashion-MNIST): magic 0x00 0x00 <dtype code> <ndim>, ndim big-endian uint32 sizes, then
the raw big-endian array; files may be gzipped. CIFAR-10 python batches: pickled dicts with b"data"
(uint8 [N, 3072], channel-major) and b"labels"; they are read with an Unpickler that can build only
numpy arrays, so a tampered file cannot run code. SVHN "format 2" (cropped digits): MATLAB v5 .mat
files holding X (uint8 [32, 32, 3, N], height, width, channel, image) and y ([N, 1], labels 1..10, 10 the
digit 0), read with scipy.io.loadmat (which never runs code).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from typing import IO

import numpy as np

IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str | Path) -> bytes:
    """The file's bytes, gunzipped if it starts with the gzip magic (whatever its name)."""
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (raw or gzipped) as a native-endian numpy array."""
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4].hex()}; expected 0000 <dtype> <ndim>)")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = int(np.prod(shape, dtype=np.int64))
    body = len(data) - 4 - 4 * ndim
    if body != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes) but {body} bytes follow")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=4 + 4 * ndim).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def idx_count(path: str | Path) -> int:
    """The first dimension of an IDX file (raw or gzipped), from its header alone."""
    with open(path, "rb") as f:
        raw = f.read(2)
    with (gzip.open(path, "rb") if raw == _GZIP_MAGIC else open(path, "rb")) as f:
        head = f.read(8)
    if len(head) < 8 or head[:2] != b"\x00\x00" or head[2] not in IDX_DTYPES or head[3] < 1:
        raise ValueError(f"{path}: not an IDX file (magic bytes {head[:4].hex()}; expected 0000 <dtype> <ndim>)")
    return struct.unpack(">I", head[4:8])[0]


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an IDX file; gzipped if `compress` (default: when the name ends in .gz)."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"write_idx: dtype {array.dtype} has no IDX code; allowed: uint8, int8, int16, int32, float32, float64")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(IDX_DTYPES[code], copy=False).tobytes()
    compress = str(path).endswith(".gz") if compress is None else compress
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only numpy's array-rebuilding names; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a dataset pickle; only numpy arrays "
                f"({', '.join(sorted({m + '.' + n for m, n in self._ALLOWED}))}) are allowed"
            )
        return self._ALLOWED[(module, name)]()


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 python batch as (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    with open(path, "rb") as f:
        batch = NumpyOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    get = lambda k: batch.get(k.encode(), batch.get(k))  # noqa: E731  (py2 pickles have bytes keys)
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        raise ValueError(f"{path}: a CIFAR batch needs keys b'data' and b'labels'; found {sorted(map(str, batch))}")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' has shape {data.shape}; expected [N, 3072]")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def write_cifar_batch(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a CIFAR-10-style python batch: the published dict layout with bytes keys.

    Protocol 4 stores bytes natively (protocol 2 from Python 3 would route them through
    `_codecs.encode`, which the safe reader refuses; the published Python 2 files do not).
    """
    images = np.asarray(images, dtype=np.uint8).reshape(len(images), -1)
    batch = {b"batch_label": b"symzoo", b"labels": [int(v) for v in labels], b"data": images,
             b"filenames": [f"{i}.png".encode() for i in range(len(images))]}
    buf = io.BytesIO()
    pickle.dump(batch, buf, protocol=4)
    Path(path).write_bytes(buf.getvalue())


def _mat_errors() -> tuple[type[BaseException], ...]:
    """What scipy.io raises on a file that is not a readable MATLAB v5 file (v7.3 HDF5 files included)."""
    from scipy.io.matlab import MatReadError

    return MatReadError, ValueError, NotImplementedError, TypeError, KeyError, EOFError, struct.error, gzip.BadGzipFile


def _open_mat(path: str | Path) -> IO[bytes]:
    """The .mat file opened for scipy.io: read lazily from disk, or through gzip if it starts with the gzip magic."""
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gz else open(path, "rb")


def svhn_count(path: str | Path) -> int:
    """The number of images in an SVHN format-2 .mat file, from its variable headers alone (scipy.io.whosmat)."""
    from scipy.io import whosmat

    try:
        with _open_mat(path) as f:
            shapes = {name: shape for name, shape, _ in whosmat(f)}
    except _mat_errors() as e:
        raise ValueError(f"{path}: not a MATLAB v5 .mat file ({_first_line(e)}); SVHN format 2 needs X and y") from None
    x = shapes.get("X")
    if x is None or len(x) != 4 or tuple(x[:3]) != (32, 32, 3):
        raise ValueError(f"{path}: X has shape {x}; SVHN format 2 needs X [32, 32, 3, N]")
    return int(x[3])


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN format-2 .mat file as (uint8 images [N, 3, 32, 32], int64 labels [N] with 10 mapped to 0).

    X must be uint8 [32, 32, 3, N] and y hold N labels in 1..10; anything else is a one-line ValueError
    naming the file."""
    from scipy.io import loadmat, whosmat

    try:
        with _open_mat(path) as f:
            mat = loadmat(f, variable_names=("X", "y"))
    except _mat_errors() as e:
        raise ValueError(f"{path}: not a MATLAB v5 .mat file ({_first_line(e)}); SVHN format 2 needs X and y") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        with _open_mat(path) as f:
            found = sorted(name for name, _, _ in whosmat(f))
        raise ValueError(f"{path}: an SVHN format-2 file needs variables X and y; found {', '.join(found) or 'none'}")
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ValueError(f"{path}: X is {x.dtype} {list(x.shape)}; expected uint8 [32, 32, 3, N]")
    if y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"{path}: y is {y.dtype} {list(y.shape)}; expected {x.shape[3]} labels ([N, 1])")
    raw = y.reshape(-1)
    bad = ~np.isin(raw, np.arange(1, 11))
    if bad.any():
        raise ValueError(f"{path}: y holds label {raw[bad][0].item()!r}; SVHN labels are 1..10 (10 is the digit 0)")
    labels = raw.astype(np.int64)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), np.where(labels == 10, 0, labels)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]
