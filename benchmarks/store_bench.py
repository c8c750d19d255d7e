"""Store benchmark: write and read back 10,000 CNN-s models x 3 checkpoints, against per-model torch files.

Prints, measured in one run on this machine:
  - write and read throughput of the store (models/s, MB/s of weights);
  - loading layer k of all models as one [N, ...] tensor: store vs `torch.load` of per-model
    checkpoint files (how the published zoos ship), and the ratio (target >= 10x);
  - the weight format choice: one shard's layer k from memory-mapped Arrow IPC vs Parquet;
  - the share of weight bytes a metadata-only query opens (target < 1%).

    .venv/bin/python benchmarks/store_bench.py [--models 10000] [--pop 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from zoos.population import PopulationResult, model_id
from zoos.store import Store

CNN_S_SHAPES = {  # published CNN-s on 28x28 inputs, in our `cnn_s` key names (fallback if archs do not import)
    "conv1.weight": (8, 1, 5, 5), "conv1.bias": (8,), "conv2.weight": (6, 8, 5, 5), "conv2.bias": (6,),
    "conv3.weight": (4, 6, 2, 2), "conv3.bias": (4,), "fc1.weight": (20, 4, 3, 3), "fc1.bias": (20,),
    "fc2.weight": (10, 20), "fc2.bias": (10,), "drop.p": (),
}  # fmt: skip


def cnn_s_shapes() -> tuple[dict[str, tuple[int, ...]], str]:
    try:
        import tasks
        from zoos.archs import build_arch

        net = build_arch("cnn_s", tasks.get_task("mnist"))
        return {k: tuple(v.shape) for k, v in net.state_dict().items()}, "zoos.archs cnn_s"
    except Exception as e:  # the benchmark still runs before the architectures land
        return dict(CNN_S_SHAPES), f"hard-coded published shapes ({type(e).__name__})"


def make_population(zoo: str, start: int, n: int, epochs: list[int], shapes: dict, rng) -> PopulationResult:
    rows = []
    for s in range(start, start + n):
        f = {"seed": s, "lr": float(10 ** rng.uniform(-4, -2)), "activation": "tanh"}
        rows.append({"model_id": model_id("bench", zoo, f), "study": "bench", "zoo": zoo, "task": "mnist",
                     "task_config": '{"name": "mnist"}', "arch": "cnn_s", "arch_config": '{"activation": "tanh"}',
                     **f, "status": "ok", "test_acc": float(rng.random()), "n_params": 2464, "epochs": epochs[-1]})  # fmt: skip
    c = len(epochs)
    weights = {k: rng.standard_normal((n, c, *shape), dtype=np.float32) for k, shape in shapes.items()}
    metrics = {"test_acc": rng.random((n, c)), "test_loss": rng.random((n, c))}
    curves = {"test_acc": rng.random((n, epochs[-1] + 1))}
    return PopulationResult(rows, epochs, metrics, weights, curves)


def timed(fn, repeat: int = 1):
    """(best seconds, last result) over `repeat` calls."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--pop", type=int, default=1000, help="models per population (one shard each)")
    ap.add_argument("--layer", default="conv2.weight", help="state_dict key loaded for the layer-k comparison")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed afterwards)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes, shapes_from = cnn_s_shapes()
    epochs = [0, 25, 50]
    n, k = args.models, args.layer
    per_model = sum(int(np.prod(s)) for s in shapes.values()) * 4
    root = args.dir or tempfile.mkdtemp(prefix="symzoo-store-bench-")
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__}, pyarrow {pa.__version__}, "
          f"polars {pl.__version__}")  # fmt: skip
    print(f"{n} CNN-s models x {len(epochs)} checkpoints, {per_model} B of weights per checkpoint ({shapes_from}); "
          f"populations of {args.pop}")  # fmt: skip
    try:
        rng = np.random.default_rng(0)
        pops = [make_population("cnn-s", s, min(args.pop, n - s), epochs, shapes, rng) for s in range(0, n, args.pop)]
        weight_mb = n * len(epochs) * per_model / 1e6

        store = Store(os.path.join(root, "store"))
        t_write, _ = timed(lambda: [store.write_population(p) for p in pops])
        print(f"\nwrite   {t_write:7.2f} s  {n / t_write:9.0f} models/s  {weight_mb / t_write:8.1f} MB/s  "
              f"({weight_mb:.0f} MB of weights, {store.size_on_disk() / 1e6:.0f} MB on disk)")  # fmt: skip

        reader = Store(store.root)

        def read_all_epochs():
            total = 0.0
            for e in epochs:
                stacked = reader.to_torch(epoch=e)
                total += sum(float(t.sum()) for t in stacked.tensors.values())  # touch every byte
            return total

        t_read, _ = timed(read_all_epochs, repeat=2)
        print(f"read    {t_read:7.2f} s  {n / t_read:9.0f} models/s  {weight_mb / t_read:8.1f} MB/s  "
              "(every checkpoint, every byte touched)")  # fmt: skip

        # -- layer k of all models: store vs per-model torch files -----------------------------------
        files_dir = os.path.join(root, "per-model")
        os.makedirs(files_dir)
        last = {p.ids[i]: {kk: torch.tensor(np.asarray(v[i, -1])) for kk, v in p.weights.items()} for p in pops for i in range(len(p.ids))}
        t_save, _ = timed(lambda: [torch.save(sd, os.path.join(files_dir, f"{mid}.pt")) for mid, sd in last.items()])
        del last
        order = reader.to_torch(keys=[k]).model_ids  # the store's row order, so both stacks must be equal
        paths = [os.path.join(files_dir, f"{mid}.pt") for mid in order]

        def from_files():
            return torch.stack([torch.load(path, weights_only=True)[k] for path in paths])

        def from_store():
            t = reader.to_torch(keys=[k])[k]
            float(t.sum())  # touch the bytes: a lazy map alone would flatter the store
            return t

        t_files, a = timed(from_files)
        t_store, b = timed(from_store, repeat=3)
        assert torch.equal(a, b), "store and per-model files disagree"
        t_store_1, _ = timed(lambda: reader.to_torch(keys=[k], filter=pl.col("shard") == pops[0].shard)[k].sum(), repeat=3)
        # a fresh Store checks each file against its manifest on first open: sha256 (default) or size only
        t_first_sha, _ = timed(lambda: Store(store.root).to_torch(keys=[k])[k].sum())
        t_first_size, _ = timed(lambda: Store(store.root, check="size").to_torch(keys=[k])[k].sum())

        # -- the format choice: one shard's layer k from IPC (mmap) vs Parquet ------------------------
        shard_arrow = os.path.join(store.root, f"checkpoints/cnn-s/{pops[0].shard}.arrow")
        import pyarrow.ipc as ipc

        table = ipc.open_file(pa.memory_map(shard_arrow)).read_all()
        pq_plain, pq_zstd = os.path.join(root, "w-none.parquet"), os.path.join(root, "w-zstd.parquet")
        pq.write_table(table, pq_plain, compression="none", row_group_size=len(pops[0].ids))
        pq.write_table(table, pq_zstd, compression="zstd", row_group_size=len(pops[0].ids))
        del table

        def ipc_layer():
            col = ipc.open_file(pa.memory_map(shard_arrow)).get_batch(len(epochs) - 1).column(k)
            return col.flatten().to_numpy(zero_copy_only=True).sum()

        def pq_layer(path):
            col = pq.read_table(path, columns=[k]).column(k).combine_chunks()
            return col.flatten().to_numpy().sum()

        t_ipc, _ = timed(ipc_layer, repeat=5)
        t_pq, _ = timed(lambda: pq_layer(pq_plain), repeat=3)
        t_pqz, _ = timed(lambda: pq_layer(pq_zstd), repeat=3)

        # -- metadata-only query: which bytes does it open? -------------------------------------------
        reader.opened.clear()
        t_meta, res = timed(
            lambda: (
                reader.models().filter(pl.col("test_acc") > 0.5).select("model_id", "lr").collect(),
                reader.checkpoints(epochs="last").select("model_id", "epoch", "test_acc").collect(),
            )
        )
        sizes = {rel: rec["size"] for m in reader.manifests() for rel, rec in m["files"].items()}
        weight_bytes = sum(v for rel, v in sizes.items() if rel.endswith(".arrow"))
        opened = set(reader.opened)
        touched_weight = sum(sizes[r] for r in opened if r.endswith(".arrow"))
        touched_all = sum(sizes[r] for r in opened)

        print(f"\nlayer {k} [{n}, {', '.join(map(str, shapes[k]))}] of all models, last checkpoint:")
        print(f"  torch.load of {n} per-model files  {t_files * 1e3:9.1f} ms   (writing them took {t_save:.1f} s)")
        print(f"  store.to_torch ({len(pops):2d} shards, 1 cat)  {t_store * 1e3:9.1f} ms   ratio {t_files / t_store:6.0f}x  (target >= 10x)")
        print(f"  store.to_torch (1 shard, no copy)  {t_store_1 * 1e3:9.1f} ms")
        print(f"  first read by a fresh Store, sha256 check   {t_first_sha * 1e3:9.1f} ms   ratio {t_files / t_first_sha:6.0f}x")
        print(f"  first read by a fresh Store, size check     {t_first_size * 1e3:9.1f} ms   ratio {t_files / t_first_size:6.0f}x")
        print(f"\nweight format, one shard ({len(pops[0].ids)} models), layer {k} at one epoch:")
        print(f"  Arrow IPC memory-mapped            {t_ipc * 1e3:9.2f} ms")
        print(f"  Parquet uncompressed               {t_pq * 1e3:9.2f} ms   ({t_pq / t_ipc:.0f}x slower)")
        print(f"  Parquet zstd                       {t_pqz * 1e3:9.2f} ms   ({t_pqz / t_ipc:.0f}x slower)")
        print(f"\nmetadata-only query ({res[0].height} models, {res[1].height} checkpoint rows) in {t_meta * 1e3:.0f} ms:")
        print(f"  weight bytes in files opened       {touched_weight} of {weight_bytes} ({100 * touched_weight / weight_bytes:.3f}%, target < 1%)")
        print(f"  all bytes in files opened          {touched_all} ({100 * touched_all / weight_bytes:.3f}% of the weight bytes; "
              f"files: {len(opened)}, none .arrow)")  # fmt: skip
        print("\nsummary: " + json.dumps({
            "write_models_per_s": round(n / t_write), "write_MB_per_s": round(weight_mb / t_write, 1),
            "read_models_per_s": round(n / t_read), "read_MB_per_s": round(weight_mb / t_read, 1),
            "layer_k_ratio_vs_torch_load": round(t_files / t_store, 1),
            "parquet_vs_ipc_layer_read": round(t_pq / t_ipc, 1),
            "metadata_query_weight_bytes_share_pct": round(100 * touched_weight / weight_bytes, 4),
        }))  # fmt: skip
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
