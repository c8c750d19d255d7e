"""Generated splits are made once: a process keeps each split it generated, and a slow one is kept on disk
for the next process (a Ray worker's next task, the next study), keyed by everything that makes the data."""

import subprocess
import sys

import pytest
import torch

from tasks import generated, get_task
from tasks.generated import NBody

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty disk cache in tmp_path that keeps every split (however fast), and an empty process memo."""
    monkeypatch.setenv("SYMZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(generated, "_slower_than_reading", lambda seconds, nbytes: True)
    monkeypatch.setattr(generated, "_MEMO", type(generated._MEMO)())
    return tmp_path / "tasks"


def refuse_to_generate(monkeypatch):
    def fail(self, n, generator):
        raise AssertionError("sampled again")

    monkeypatch.setattr(NBody, "sample_x", fail)


def test_a_split_is_generated_once_per_process_and_read_back_from_disk(cache, monkeypatch):
    options = dict(n_train=6, n_val=2, n_test=2, n_steps=20)
    x, y = get_task("nbody", **options).load("train", 3)
    files = list(cache.glob("nbody-train-3-*.pt"))
    assert len(files) == 1
    refuse_to_generate(monkeypatch)
    x2, y2 = get_task("nbody", **options).load("train", 3)  # another task object: the process memo
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x2.add_(1.0)  # the caller's copy: the kept split is unchanged
    monkeypatch.setattr(generated, "_MEMO", type(generated._MEMO)())  # as a fresh process: the disk
    x3, y3 = get_task("nbody", **options).load("train", 3)
    assert torch.equal(x, x3) and torch.equal(y, y3)


def test_every_option_that_makes_the_data_is_in_the_key(cache):
    base = get_task("nbody", n_train=4, n_val=2, n_test=2, n_steps=10).load("train", 0)
    for other in (dict(n_steps=11), dict(dt=0.002), dict(softening=0.2), dict(n_train=5)):
        x, y = get_task("nbody", **{**dict(n_train=4, n_val=2, n_test=2, n_steps=10), **other}).load("train", 0)
        assert x.shape[0] != 4 or not torch.equal(y, base[1]), other
    assert not torch.equal(get_task("nbody", n_train=4, n_val=2, n_test=2, n_steps=10).load("train", 1)[0], base[0])
    assert len(list(cache.glob("*.pt"))) == 6


def test_a_damaged_file_is_generated_again(cache, monkeypatch):
    options = dict(n_train=6, n_val=2, n_test=2, n_steps=20)
    x, y = get_task("nbody", **options).load("val", 0)
    (path,) = cache.glob("nbody-val-0-*.pt")
    path.write_bytes(path.read_bytes()[:40])  # a process killed while writing leaves no such file, a bad disk might
    monkeypatch.setattr(generated, "_MEMO", type(generated._MEMO)())
    x2, y2 = get_task("nbody", **options).load("val", 0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(torch.load(path, weights_only=True)[1], y)  # and written whole again


def test_a_split_is_kept_when_generating_it_took_longer_than_reading_it_would(tmp_path, monkeypatch):
    """The rule without the fixture's keep-all: a small split of a long simulation is kept, the same split is not
    once reading is made dearer than its generation."""
    monkeypatch.setenv("SYMZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(generated, "_MEMO", type(generated._MEMO)())
    get_task("nbody", n_train=4, n_val=8, n_test=2, n_steps=3000).load("val", 0)  # 3000 steps: ~0.1 s, 560 bytes
    assert len(list((tmp_path / "tasks").glob("nbody-val-0-*.pt"))) == 1
    monkeypatch.setattr(generated, "_MEMO", type(generated._MEMO)())
    monkeypatch.setattr(generated, "_READ_S", 60.0)
    get_task("nbody", n_train=4, n_val=8, n_test=2, n_steps=3000).load("val", 1)
    assert not list((tmp_path / "tasks").glob("nbody-val-1-*.pt"))


def test_off_keeps_nothing_on_disk(cache, monkeypatch):
    monkeypatch.setenv("SYMZOO_CACHE", "off")
    get_task("nbody", n_train=4, n_val=2, n_test=2, n_steps=5).load("train", 0)
    assert not cache.exists()


def test_a_fresh_process_reads_what_another_kept(tmp_path):
    """Two processes: the second finds the first's split on disk and never samples (its sampler raises)."""
    script = ("import sys, torch; from tasks import generated, get_task; generated._slower_than_reading = lambda s, b: True\n"
              "if sys.argv[1] == 'second': generated.NBody.sample_x = None\n"
              "x, y = get_task('nbody', n_train=40, n_val=2, n_test=2, n_steps=50).load('train', 0); print(float(y.sum()))")
    env = {**__import__("os").environ, "SYMZOO_CACHE": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script, which], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=300) for which in ("first", "second")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and len(list((tmp_path / "tasks").glob("nbody-train-0-*.pt"))) == 1


def test_the_process_keeps_the_newest_splits_within_its_byte_cap(cache, monkeypatch):
    task = get_task("nbody", n_train=10, n_val=2, n_test=2, n_steps=5)
    one = sum(t.nbytes for t in task.load("train", 0))
    monkeypatch.setattr(generated, "_MEMO_BYTES", 2 * one)
    for seed in (1, 2, 3):
        task.load("train", seed)
    assert [k[3] for k in generated._MEMO] == [2, 3]
