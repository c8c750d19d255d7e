"""File-backed tasks: tiny files written in the real formats (IDX raw and gzipped, CIFAR python
batches, SVHN .mat) read back exactly; missing files, malformed files and hostile pickles give clear errors."""

import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from tasks import TaskError, get_task
from tasks.formats import read_cifar_batch, read_idx, read_svhn_mat, write_idx
from tests.tasks.datafiles import write_cifar, write_mnist, write_svhn


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8", "<f4"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, dtype, gz):
    arr = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(np.dtype(dtype) if "u" not in dtype else "u1")
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    back = read_idx(path)
    assert back.shape == arr.shape and np.array_equal(back, arr)


def test_idx_header_is_the_published_one(tmp_path):
    write_idx(tmp_path / "l", np.array([7, 2, 1], dtype=np.uint8))
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])  # magic 2049 for labels


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="5 bytes"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("task_name,layout,gz", [("mnist", "mnist", True), ("fashion_mnist", "", False),
                                                  ("mnist", "MNIST/raw", False)])
def test_idx_tasks_read_back_exactly(tmp_path, task_name, layout, gz):
    data = write_mnist(tmp_path / layout if layout else tmp_path, np.random.default_rng(0), gz=gz)
    task = get_task(task_name, data_dir=str(tmp_path), n_val=8)
    xte, yte = task.load("test")
    assert xte.shape == (10, 1, 28, 28) and xte.dtype == torch.float32 and yte.dtype == torch.int64
    assert torch.equal(xte, torch.from_numpy(data["t10k-images-idx3-ubyte"]).float().unsqueeze(1) / 255)
    assert torch.equal(yte, torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    (xtr, ytr), (xva, yva) = task.load("train", seed=1), task.load("val", seed=1)
    assert len(xtr) == 22 and len(xva) == 8
    # train and val partition the published training set, images keep their labels
    images = torch.from_numpy(data["train-images-idx3-ubyte"]).float() / 255
    labels = torch.from_numpy(data["train-labels-idx1-ubyte"]).long()
    together = torch.cat([xtr, xva])[:, 0]
    idx = [int(torch.nonzero((images == img).flatten(1).all(1))[0]) for img in together]
    assert sorted(idx) == list(range(30))
    assert torch.equal(torch.cat([ytr, yva]), labels[idx])
    assert not torch.equal(task.load("val", seed=2)[0], xva)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_mnist(tmp_path / "fashion_mnist", np.random.default_rng(1), gz=False)
    monkeypatch.setenv("SYMZOO_DATA", str(tmp_path))
    x, _ = get_task("fashion_mnist", n_val=5, n_test=4).load("test")
    assert x.shape == (4, 1, 28, 28)


def test_sizes_larger_than_the_files_are_refused(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(2), gz=False)
    with pytest.raises(TaskError, match="n_train=40 but only 25"):
        get_task("mnist", data_dir=str(tmp_path), n_val=5, n_train=40).load("train")


def test_missing_files_name_the_files_and_the_directory(tmp_path, monkeypatch):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(TaskError) as err:
        get_task("mnist", data_dir=str(tmp_path)).load("train")
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte," not in msg
    assert str(tmp_path) in msg and "mnist" in msg.lower() and "http" in msg
    monkeypatch.delenv("SYMZOO_DATA", raising=False)
    with pytest.raises(TaskError, match="SYMZOO_DATA"):
        get_task("cifar10").load("test")
    with pytest.raises(TaskError, match="data_batch_1.*test_batch.*cs.toronto.edu"):
        get_task("cifar10", data_dir=str(tmp_path)).load("test")


def test_cifar_batches_read_back_exactly(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(folder, np.random.default_rng(3))
    x, y = read_cifar_batch(folder / "test_batch")
    assert np.array_equal(x, batches["test_batch"][0]) and np.array_equal(y, batches["test_batch"][1])
    task = get_task("cifar10", data_dir=str(tmp_path), n_val=5)
    xte, yte = task.load("test")
    assert xte.shape == (4, 3, 32, 32)
    assert torch.equal(xte, torch.from_numpy(batches["test_batch"][0]).float() / 255)
    xtr, ytr = task.load("train")
    assert len(xtr) == 15
    all_train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert all(any(np.array_equal(img, ref) for ref in all_train) for img in (xtr * 255).round().byte().numpy())


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_cifar_batch(tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()


def _py2_string(b: bytes) -> bytes:
    """A Python 2 str as cPickle protocol 2 writes it (SHORT_BINSTRING / BINSTRING)."""
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def _py2_cifar_pickle(images: np.ndarray, labels: list[int]) -> bytes:
    """The opcodes of a published CIFAR-10 batch: py2 strings, numpy.core.multiarray._reconstruct."""
    s = _py2_string
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + s(b"b") + b"\x87R"
             + b"(K\x01" + b"M" + struct.pack("<H", images.shape[0]) + b"M" + struct.pack("<H", images.shape[1]) + b"\x86"
             + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R" + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89" + s(images.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + label_list + s(b"batch_label") + s(b"py2") + b"u."


def test_cifar_reader_reads_python2_pickles(tmp_path):
    """The published batches are Python 2 pickles naming numpy.core.multiarray; they load under numpy 2 too."""
    images = np.arange(3 * 3072, dtype=np.uint64).astype(np.uint8).reshape(3, 3072)
    (tmp_path / "data_batch_1").write_bytes(_py2_cifar_pickle(images, [3, 5, 9]))
    x, y = read_cifar_batch(tmp_path / "data_batch_1")
    assert np.array_equal(x.reshape(3, -1), images) and y.tolist() == [3, 5, 9]
    (tmp_path / "nolabels").write_bytes(pickle.dumps({b"data": images}, protocol=4))
    with pytest.raises(ValueError, match="needs keys b'data' and b'labels'"):
        read_cifar_batch(tmp_path / "nolabels")


def test_svhn_reads_the_published_mat_files_exactly(tmp_path):
    data = write_svhn(tmp_path / "svhn", np.random.default_rng(4))
    x, y = read_svhn_mat(tmp_path / "svhn" / "test_32x32.mat")
    xs, ys = data["test_32x32.mat"]
    assert x.shape == (9, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert all(np.array_equal(x[i], xs[:, :, :, i].transpose(2, 0, 1)) for i in range(9))
    assert y[:2].tolist() == [0, 1] and np.array_equal(y, np.where(ys[:, 0] == 10, 0, ys[:, 0]))
    task = get_task("svhn", data_dir=str(tmp_path), n_val=8)
    assert task.input_shape == (3, 32, 32) and task.check_sizes() == (22, 9)
    xte, yte = task.load("test")
    assert torch.equal(xte, torch.from_numpy(x).float() / 255) and torch.equal(yte, torch.from_numpy(y))
    (xtr, ytr), (xva, yva) = task.load("train", seed=1), task.load("val", seed=1)
    assert len(xtr) == 22 and len(xva) == 8
    # train and val partition train_32x32.mat, images keep their (mapped) labels
    xs, ys = data["train_32x32.mat"]
    images = torch.from_numpy(xs.transpose(3, 2, 0, 1).copy()).float() / 255
    labels = torch.from_numpy(np.where(ys[:, 0] == 10, 0, ys[:, 0]).astype(np.int64))
    together = torch.cat([xtr, xva])
    idx = [int(torch.nonzero((images == img).flatten(1).all(1))[0]) for img in together]
    assert sorted(idx) == list(range(30))
    assert torch.equal(torch.cat([ytr, yva]), labels[idx])
    assert not torch.equal(task.load("val", seed=2)[0], xva)


@pytest.mark.parametrize("content,match", [
    (b"not a mat file" * 20, "not a MATLAB v5 .mat file"),
    ({"images": np.zeros((32, 32, 3, 2), np.uint8)}, "needs variables X and y; found images"),
    ({"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))}, r"X is uint8 \[28, 28, 3, 2\]"),
    ({"X": np.zeros((32, 32, 3, 2), np.float64), "y": np.ones((2, 1))}, "X is float64"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, "expected 2 labels"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[3], [11]])}, "label 11; SVHN labels are 1..10"),
])  # fmt: skip
def test_svhn_refuses_a_malformed_file_in_one_line(tmp_path, content, match):
    write_svhn(tmp_path, np.random.default_rng(5))
    path = tmp_path / "test_32x32.mat"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        scipy.io.savemat(str(path), content)
    with pytest.raises(ValueError, match=match) as err:
        get_task("svhn", data_dir=str(tmp_path), n_val=5).load("test")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_svhn_missing_files_say_where_to_get_them(tmp_path):
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(str(tmp_path / "svhn" / "extra_32x32.mat"), {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": [[1]]})
    with pytest.raises(TaskError, match="train_32x32.mat, test_32x32.mat.*ufldl.stanford.edu/housenumbers"):
        get_task("svhn", data_dir=str(tmp_path)).load("train")
