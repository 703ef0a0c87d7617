"""SF-XL-sized retrieval in bounded memory: IVF-PQ build/search time and recall against exact search.

A synthetic database the size of SF-XL (2.8 M x 512 float32 = 5.7 GB; random,
clustered: ``--clusters`` Gaussian clusters, L2-normalised) is generated chunk by
chunk into ``--work/db.npy`` (a plain .npy, ``np.load(..., mmap_mode="r")`` opens
it), with 1000 queries near database points. The benchmark reads the file with
positioned reads (page cache, not process memory), so the process never holds
the database; then it measures

- exact search: the sharded flat inner-product search of pipeline.retrieval
  (``search_chunks``: one flat index per ``--chunk`` rows, per-chunk top-k
  merged -- equal to one big flat search), which is also the ground truth;
- IVF-PQ: training on ``--train-size`` sampled vectors, adding the database
  chunk by chunk, searching the queries at each ``--nprobe``;
- recall of IVF-PQ against exact: R@1 (exact nearest neighbour ranked first),
  1-R@10 (exact nearest neighbour in the top 10), 10-R@10 (overlap of the top 10s);
- exact re-scoring (``retrieval.rescore``): IVF-PQ proposes ``--rescore`` x k
  candidates, re-ranked with their exact descriptors read from the database
  (one pass over the chunks that hold them): the same recalls after re-scoring;
- peak RSS (VmHWM of /proc/self/status) after each stage.

``--pipeline`` also runs the workflow's own stages on it, each in a fresh process
whose peak RSS is reported on its own: the database written as Zarr shard stores
of ``--shard-size`` rows (as extraction writes them), gathered into one chunked
store (pipeline.gather), an index built from it (pipeline.retrieval.build_index,
``--index``) and the queries searched (pipeline.retrieval.search, with and without
re-scoring), recalls against the exact ground truth.

    python benchmarks/sfxl_index.py --n 200000 --work /tmp/sfxl_200k
    nice python benchmarks/sfxl_index.py --work /tmp/sfxl          # 2.8 M: ~6 GB of disk, many minutes on 2 cores
    nice python benchmarks/sfxl_index.py --work /tmp/sfxl --pipeline   # + shards, gather, build, search: ~18 GB of disk

The database and the exact ground truth are reused when ``--work`` already holds
them for the same ``--n --dim --clusters --seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.index_plan import chunk_rows_for, index_bytes
from pipeline.retrieval import (
    auto_nlist,
    choose_factory,
    make_index,
    rescore_exact,
    search_chunks,
)


def peak_rss_gb() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh in a new program
    (getrusage's ru_maxrss would carry the parent's peak over fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class NpyRows:
    """Rows of a 2-d float32 .npy read with positioned reads (nothing stays mapped in the process)."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            self.offset = f.tell()
        assert not fortran and dtype == np.float32 and len(shape) == 2, (shape, fortran, dtype)
        self.shape = shape
        self.fd = os.open(self.path, os.O_RDONLY)
        self.row_bytes = shape[1] * 4

    @property
    def dim(self):
        return self.shape[1]

    def __len__(self):
        return self.shape[0]

    def read(self, start=0, stop=None):
        stop = min(len(self), len(self) if stop is None else stop)
        size, pos, parts = (stop - start) * self.row_bytes, self.offset + start * self.row_bytes, []
        while size > 0:  # one pread returns at most ~2 GB
            part = os.pread(self.fd, min(size, 1 << 30), pos)
            if not part:
                raise EOFError(f"{self.path}: short read at byte {pos}")
            parts.append(part)
            size -= len(part)
            pos += len(part)
        d = np.frombuffer(b"".join(parts), np.float32).reshape(stop - start, self.dim)
        return d, np.ones(len(d), bool)

    def read_rows(self, rows):
        d = np.empty((len(rows), self.dim), np.float32)
        for j, r in enumerate(np.asarray(rows)):
            d[j] = np.frombuffer(os.pread(self.fd, self.row_bytes, self.offset + int(r) * self.row_bytes), np.float32)
        return d, np.ones(len(d), bool)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(work: Path, n, dim, n_clusters, n_queries, spread, query_noise, seed, chunk):
    """Database and queries under ``work`` (skipped when already there for these settings)."""
    meta = {"n": n, "dim": dim, "clusters": n_clusters, "queries": n_queries, "spread": spread,
            "query_noise": query_noise, "seed": seed}
    meta_file = work / "data.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) == meta and (work / "db.npy").exists():
        return False
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    q_rows = np.sort(rng.choice(n, n_queries, replace=False))
    queries = np.empty((n_queries, dim), np.float32)
    tmp = work / "db.npy.partial"
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = centres[rng.integers(n_clusters, size=m)]
            x += (spread / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
            x = unit(x).astype(np.float32)
            sel = (q_rows >= start) & (q_rows < start + m)
            queries[sel] = x[q_rows[sel] - start]
            f.write(x.tobytes())
    queries = unit(queries + (query_noise / np.sqrt(dim)) * rng.standard_normal(queries.shape, dtype=np.float32))
    np.save(work / "queries.npy", queries.astype(np.float32))
    tmp.rename(work / "db.npy")
    (work / "exact.npz").unlink(missing_ok=True)
    meta_file.write_text(json.dumps(meta))
    return True


def recalls(I, J, k):
    """R@1, 1-R@k and k-R@k of the lists ``I`` against the exact ``J``."""
    r1 = float(np.mean(I[:, 0] == J[:, 0]))
    r10 = float(np.mean([J[i, 0] in I[i] for i in range(len(I))]))
    over = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(I, J)]))
    return r1, r10, over


# --------------------------------------------------------------------------- --pipeline

def _in_child(fn, *args):
    """Run ``fn(*args)`` in a fresh process; ``(result, seconds, its peak RSS in GB)``."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_timed, (fn, *args))


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t, peak_rss_gb()


def write_shards(db_path: str, work: str, shard_size: int) -> list[str]:
    """The database as Zarr shard stores in extract_global's layout (descriptors, valid, names, attrs)."""
    import zarr

    from pipeline.global_store import write_names

    db = NpyRows(db_path)
    paths = []
    for i, a in enumerate(range(0, len(db), shard_size)):
        b = min(len(db), a + shard_size)
        path = Path(work) / "shards" / f"shard_{i:04d}.zarr"
        paths.append(str(path))
        if path.exists():
            continue
        tmp = path.with_name(path.name + ".partial")
        g = zarr.open_group(str(tmp), mode="w")
        g.create_array("descriptors", shape=(b - a, db.dim), chunks=(1024, db.dim), dtype="float32")
        g.create_array("valid", shape=(b - a,), chunks=(1024,), dtype=bool)
        for c in range(a, b, 1024 * 16):
            d, v = db.read(c, min(b, c + 1024 * 16))
            g["descriptors"][c - a : c - a + len(d)] = d
            g["valid"][c - a : c - a + len(d)] = v
        write_names(g, [f"db/{r:07d}.jpg" for r in range(a, b)], 65536)
        g.attrs.update({"model": {"name": "synthetic"}, "dim": db.dim, "dtype": "float32", "n": b - a,
                        "rows": [a, b], "n_valid": b - a, "errors": {}})
        tmp.rename(path)
    return paths


def _gather(shards, out):
    from pipeline.gather import gather_stores

    return gather_stores(shards, out, progress=False)["n"]


def _build(store, out, index, nlist, m, nbits, train_size, chunk):
    from pipeline.retrieval import build_index

    return build_index(store, out, index, train_size=train_size, nlist=nlist, m=m, nbits=nbits, chunk_size=chunk,
                       use_gpu="never")["factory"]


def _search(index, queries, store, out, k, nprobe, rescore):
    from pipeline.retrieval import search

    return search(index, queries, out, k, nprobe=nprobe, use_gpu="never", database=store, rescore=rescore).candidate_index


def run_pipeline(a, q, J) -> list:
    import shutil

    import zarr

    from pipeline.global_store import write_names

    rows = []

    def row(name, seconds, rss, note=""):
        rows.append((name, seconds, rss, note))
        print(f"  [pipeline] {name}: {seconds:.1f} s, peak RSS {rss:.2f} GB {note}", flush=True)

    work = a.work
    paths, sec, rss = _in_child(write_shards, str(work / "db.npy"), str(work), a.shard_size)
    row(f"write {len(paths)} shard stores", sec, rss)
    qstore = work / "queries.zarr"
    if not qstore.exists():
        g = zarr.open_group(str(qstore), mode="w")
        g.create_array("descriptors", shape=q.shape, chunks=(1024, q.shape[1]), dtype="float32")[:] = q
        g.create_array("valid", shape=(len(q),), chunks=(1024,), dtype=bool)[:] = True
        write_names(g, [f"q/{i:05d}.jpg" for i in range(len(q))], 65536)
        g.attrs.update({"n_valid": len(q)})
    gathered = work / "database.zarr"
    shutil.rmtree(gathered, ignore_errors=True)
    n, sec, rss = _in_child(_gather, paths, str(gathered))
    row("gather shards -> database.zarr", sec, rss, f"{n} rows")
    nlist = a.nlist or auto_nlist(a.n)
    train_size = a.train_size or min(300_000, 40 * nlist, a.n)
    factory, sec, rss = _in_child(_build, str(gathered), str(work / "pipeline.index"), a.index, nlist, a.m, a.nbits,
                                  train_size, a.chunk)
    row(f"build_index ({factory})", sec, rss)
    nprobe = int(a.nprobe.split(",")[1 if "," in a.nprobe else 0])
    for rescore in sorted({0, a.rescore}):
        I, sec, rss = _in_child(_search, str(work / "pipeline.index"), str(qstore), str(gathered),
                                str(work / "topk.h5"), a.k, nprobe, rescore)
        row(f"search nprobe={nprobe} rescore={rescore}", sec, rss,
            "R@1 {:.3f}  1-R@10 {:.3f}  10-R@10 {:.3f}".format(*recalls(I, J, a.k)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2_800_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=20_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.8, help="cluster noise norm (cluster centres have norm 1)")
    p.add_argument("--query-noise", type=float, default=0.6, help="query noise norm around its database point")
    p.add_argument("--nlist", type=int, default=None, help="default: ~4 sqrt(n), as index: auto")
    p.add_argument("--m", type=int, default=None, help="PQ sub-quantizers (bytes a vector at 8 bits; default: "
                   "the plan's, 64 for 512-d, 128 after PCA to 1024-d)")
    p.add_argument("--pca", default="auto", help="PCA before IVF-PQ: auto (1024-d above 16384-d), none, or a size")
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--nprobe", default="16,32,64", help="comma-separated")
    p.add_argument("--train-size", type=int, default=None, help="default: 40 * nlist, at most 300000")
    p.add_argument("--chunk", type=int, default=100_000, help="rows per chunk (add, exact search)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all cores)")
    p.add_argument("--rescore", type=int, default=4, help="re-score RESCORE x k IVF-PQ candidates exactly (0: off)")
    p.add_argument("--pipeline", action="store_true", help="also run shards -> gather -> build -> search (see doc)")
    p.add_argument("--shard-size", type=int, default=100_000, help="--pipeline: rows per shard store")
    p.add_argument("--index", default="ivfpq", help="--pipeline: retrieval.index of the built index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("work/bench_sfxl"))
    a = p.parse_args(argv)
    a.chunk = chunk_rows_for(a.chunk, a.dim)  # rows of big descriptors: capped in bytes, as the pipeline's
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    nlist = a.nlist or auto_nlist(a.n)
    train_size = a.train_size or min(300_000, 40 * nlist, a.n)
    rows = []

    def stage(name, seconds, note=""):
        rows.append((name, seconds, peak_rss_gb(), note))
        print(f"  {name}: {seconds:.1f} s, peak RSS {rows[-1][2]:.2f} GB {note}", flush=True)

    t = time.perf_counter()
    made = generate(a.work, a.n, a.dim, a.clusters, a.queries, a.spread, a.query_noise, a.seed, a.chunk)
    stage("generate database" if made else "database (reused)", time.perf_counter() - t,
          f"{a.n} x {a.dim} float32 = {a.n * a.dim * 4 / 1e9:.1f} GB on disk")
    db = NpyRows(a.work / "db.npy")
    q = np.load(a.work / "queries.npy")

    exact_file = a.work / "exact.npz"
    t = time.perf_counter()
    if exact_file.exists() and int(np.load(exact_file)["k"]) >= a.k:
        z = np.load(exact_file)
        S, J = z["S"][:, : a.k], z["I"][:, : a.k]
        stage("exact search (reused)", time.perf_counter() - t)
    else:
        chunks = ((s, db.read(s, s + a.chunk)[0]) for s in range(0, len(db), a.chunk))
        S, J = search_chunks(q, chunks, a.k)
        np.savez(exact_file, S=S, I=J, k=a.k)
        stage("exact search (sharded flat IP)", time.perf_counter() - t, f"{len(q)} queries, chunks of {a.chunk}")

    pca = a.pca if a.pca in ("auto", "none") else int(a.pca)
    factory = choose_factory(a.n, a.dim, "ivfpq", nlist=nlist, m=a.m, nbits=a.nbits, pca=pca)
    timings = {}
    t = time.perf_counter()
    idx, _ = make_index([db], factory, train_size=train_size, seed=a.seed, chunk_size=a.chunk, timings=timings)
    stage(f"IVF-PQ train ({factory}, {train_size} vectors)", timings["train_s"], "GPU" if timings["gpu"] else "CPU")
    stage("IVF-PQ add (chunks)", timings["add_s"], f"codes {index_bytes(factory, idx.ntotal, a.dim) / 1e6:.0f} MB")
    results = []
    ivf = faiss.extract_index_ivf(idx)
    for nprobe in [int(v) for v in a.nprobe.split(",")]:
        ivf.nprobe = nprobe
        t = time.perf_counter()
        _, I = idx.search(q, a.k)
        dt = time.perf_counter() - t
        rec = recalls(I, J, a.k)
        stage(f"IVF-PQ search nprobe={nprobe}", dt, "R@1 {:.3f}  1-R@10 {:.3f}  10-R@10 {:.3f}".format(*rec))
        rs, rs_rec = 0.0, (float("nan"),) * 3
        if a.rescore:
            t = time.perf_counter()
            _, I4 = idx.search(q, a.rescore * a.k)
            _, R = rescore_exact(db, q, I4, a.k)
            rs = time.perf_counter() - t
            rs_rec = recalls(R, J, a.k)
            stage(f"  + exact re-scoring of {a.rescore * a.k}", rs, "R@1 {:.3f}  1-R@10 {:.3f}  10-R@10 {:.3f}".format(*rs_rec))
        results.append((nprobe, dt, *rec, rs, *rs_rec))
    del idx
    pipeline_rows = run_pipeline(a, q, J) if a.pipeline else []

    print(f"\nn={a.n} dim={a.dim} clusters={a.clusters} queries={len(q)} {factory} train={train_size} "
          f"threads={faiss.omp_get_max_threads()}")
    print(f"{'stage':48s} {'time (s)':>9s} {'peak RSS (GB)':>14s}  note")
    for name, sec, rss, note in rows:
        print(f"{name:48s} {sec:9.1f} {rss:14.2f}  {note}")
    print(f"\n{'nprobe':>6s} {'search (s)':>10s} {'ms/query':>9s} {'R@1':>6s} {'1-R@10':>7s} {'10-R@10':>8s}"
          f"   | re-scored {a.rescore} x k: {'+s':>6s} {'R@1':>6s} {'1-R@10':>7s} {'10-R@10':>8s}")
    for nprobe, dt, r1, r10, over, rs, *rr in results:
        print(f"{nprobe:6d} {dt:10.2f} {1000 * dt / len(q):9.2f} {r1:6.3f} {r10:7.3f} {over:8.3f}"
              f"   | {'':15s}{rs:6.1f} {rr[0]:6.3f} {rr[1]:7.3f} {rr[2]:8.3f}")
    if pipeline_rows:
        print(f"\npipeline stages, each its own process ({a.index}, shards of {a.shard_size}):")
        print(f"{'stage':48s} {'time (s)':>9s} {'peak RSS (GB)':>14s}  note")
        for name, sec, rss, note in pipeline_rows:
            print(f"{name:48s} {sec:9.1f} {rss:14.2f}  {note}")
    print(f"peak RSS {peak_rss_gb():.2f} GB (this process)")


if __name__ == "__main__":
    main()
