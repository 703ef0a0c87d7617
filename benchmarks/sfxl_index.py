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
- peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after each stage.

    python benchmarks/sfxl_index.py --n 200000 --work /tmp/sfxl_200k
    nice python benchmarks/sfxl_index.py --work /tmp/sfxl          # 2.8 M: ~6 GB of disk, many minutes on 2 cores

The database and the exact ground truth are reused when ``--work`` already holds
them for the same ``--n --dim --clusters --seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.retrieval import auto_nlist, choose_factory, make_index, search_chunks


def peak_rss_gb() -> float:
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
        buf = os.pread(self.fd, (stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        d = np.frombuffer(buf, np.float32).reshape(stop - start, self.dim)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2_800_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=20_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.8, help="cluster noise norm (cluster centres have norm 1)")
    p.add_argument("--query-noise", type=float, default=0.6, help="query noise norm around its database point")
    p.add_argument("--nlist", type=int, default=None, help="default: ~4 sqrt(n), as index: auto")
    p.add_argument("--m", type=int, default=64, help="PQ sub-quantizers (bytes a vector at 8 bits)")
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--nprobe", default="16,32,64", help="comma-separated")
    p.add_argument("--train-size", type=int, default=None, help="default: 40 * nlist, at most 300000")
    p.add_argument("--chunk", type=int, default=100_000, help="rows per chunk (add, exact search)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("work/bench_sfxl"))
    a = p.parse_args(argv)
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

    factory = choose_factory(a.n, a.dim, "ivfpq", nlist=nlist, m=a.m, nbits=a.nbits)
    timings = {}
    t = time.perf_counter()
    idx, _ = make_index([db], factory, train_size=train_size, seed=a.seed, chunk_size=a.chunk, timings=timings)
    stage(f"IVF-PQ train ({factory}, {train_size} vectors)", timings["train_s"], "GPU" if timings["gpu"] else "CPU")
    stage("IVF-PQ add (chunks)", timings["add_s"], f"codes {idx.ntotal * a.m * a.nbits / 8 / 1e6:.0f} MB")
    results = []
    ivf = faiss.extract_index_ivf(idx)
    for nprobe in [int(v) for v in a.nprobe.split(",")]:
        ivf.nprobe = nprobe
        t = time.perf_counter()
        _, I = idx.search(q, a.k)
        dt = time.perf_counter() - t
        r1 = float(np.mean(I[:, 0] == J[:, 0]))
        r10 = float(np.mean([J[i, 0] in I[i] for i in range(len(q))]))
        over = float(np.mean([len(set(x) & set(y)) / a.k for x, y in zip(I, J)]))
        results.append((nprobe, dt, r1, r10, over))
        stage(f"IVF-PQ search nprobe={nprobe}", dt, f"R@1 {r1:.3f}  1-R@10 {r10:.3f}  10-R@10 {over:.3f}")

    print(f"\nn={a.n} dim={a.dim} clusters={a.clusters} queries={len(q)} {factory} train={train_size} "
          f"threads={faiss.omp_get_max_threads()}")
    print(f"{'stage':48s} {'time (s)':>9s} {'peak RSS (GB)':>14s}  note")
    for name, sec, rss, note in rows:
        print(f"{name:48s} {sec:9.1f} {rss:14.2f}  {note}")
    print(f"\n{'nprobe':>6s} {'search (s)':>10s} {'ms/query':>9s} {'R@1':>6s} {'1-R@10':>7s} {'10-R@10':>8s}")
    for nprobe, dt, r1, r10, over in results:
        print(f"{nprobe:6d} {dt:10.2f} {1000 * dt / len(q):9.2f} {r1:6.3f} {r10:7.3f} {over:8.3f}")
    print(f"peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
