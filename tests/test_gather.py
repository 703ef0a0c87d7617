"""Gathering database shards into one chunked store: content, resume, bad shards."""

import numpy as np
import pytest

from pipeline import gather
from pipeline.global_store import GlobalStore
from pipeline.gather import gather_stores

from .test_retrieval_index import random_unit, write_store


def shards(tmp_path, n=(50, 50, 23), dim=8):
    x = random_unit(sum(n), dim, 0)
    valid = np.ones(len(x), bool)
    valid[[3, 77]] = False
    out, a = [], 0
    for i, m in enumerate(n):
        p = write_store(tmp_path / f"shard_{i:04d}.zarr", x[a : a + m], valid[a : a + m], f"s{i}")
        import zarr

        g = zarr.open_group(str(p), mode="r+")
        g.attrs.update({"rows": [a, a + m], "model": {"name": "t"}, "dim": dim, "dtype": "float32",
                        "errors": {f"s{i}/bad.jpg": "unreadable"} if i == 1 else {}})
        out.append(p)
        a += m
    return out, x, valid


def test_gathered_store_equals_the_shards_in_order(tmp_path):
    paths, x, valid = shards(tmp_path)
    attrs = gather_stores(paths, tmp_path / "database.zarr", chunk_rows=16, progress=False)
    s = GlobalStore(tmp_path / "database.zarr")
    d, v = s.read()
    np.testing.assert_array_equal(d, x)
    np.testing.assert_array_equal(v, valid)
    assert s.names[:2] == ["s0/00000.jpg", "s0/00001.jpg"] and s.names[50] == "s1/00000.jpg" and len(s.names) == 123
    assert list(s.names_at([122, 49])) == ["s2/00022.jpg", "s0/00049.jpg"]
    assert s.chunk_rows == 16 and "names" not in s.attrs  # names live in an array, not a huge attribute
    assert attrs["n_valid"] == 121 and attrs["errors"] == {"s1/bad.jpg": "unreadable"}
    assert not (tmp_path / "database.zarr.partial").exists() and not (tmp_path / "database.zarr.progress").exists()


def test_interrupted_gather_resumes_without_recopying(tmp_path, monkeypatch):
    paths, x, _ = shards(tmp_path)
    calls, armed = [], True
    real = gather.write_names

    def write_names(group, names, chunk, start=0, total=None):
        calls.append(start)
        if armed and len(calls) == 4:
            raise RuntimeError("killed")  # killed while copying the 4th chunk
        return real(group, names, chunk, start, total)

    monkeypatch.setattr(gather, "write_names", write_names)
    with pytest.raises(RuntimeError, match="killed"):
        gather_stores(paths, tmp_path / "database.zarr", chunk_rows=16, progress=False)
    assert not (tmp_path / "database.zarr").exists() and len(list((tmp_path / "database.zarr.progress").glob("chunk_*"))) == 3
    calls.clear()
    armed = False
    gather_stores(paths, tmp_path / "database.zarr", chunk_rows=16, progress=False)
    assert calls == [48, 64, 80, 96, 112]  # chunks 0-2 (rows 0-47) are not copied again
    np.testing.assert_array_equal(GlobalStore(tmp_path / "database.zarr").read()[0], x)
    assert GlobalStore(tmp_path / "database.zarr").names[40] == "s0/00040.jpg"


def test_shards_from_different_models_are_refused(tmp_path):
    paths, _, _ = shards(tmp_path)
    import zarr

    zarr.open_group(str(paths[1]), mode="r+").attrs["model"] = {"name": "other"}
    with pytest.raises(ValueError, match=r"shard_0001.zarr: model .* differs from .*shard_0000.zarr"):
        gather_stores(paths, tmp_path / "database.zarr", progress=False)


def test_missing_shard_is_refused(tmp_path):
    paths, _, _ = shards(tmp_path)
    with pytest.raises(ValueError, match=r"shard_0002.zarr: holds rows 100..123 but rows from 50"):
        gather_stores([paths[0], paths[2]], tmp_path / "database.zarr", progress=False)

