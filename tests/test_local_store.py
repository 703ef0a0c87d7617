"""Local-feature stores at scale: storage options, bounded open files, concurrent readers and writers."""

import multiprocessing as mp

import h5py
import numpy as np
import pytest

from pipeline.config import ConfigError, check_config
from pipeline.io import write_json
from pipeline.extract_local import extract_local
from pipeline.local_store import FeatureStore, scan_parts, split_conf, store_dir, write_part

SIFT = {"name": "sift", "max_keypoints": 300}


def fake_features(n_img, n_kpts=700, dim=128, seed=0):
    rng = np.random.default_rng(seed)
    feats = {}
    for i in range(n_img):
        # quantised like SIFT/RootSIFT values: what float16 keeps exactly and compression squeezes
        desc = np.round(rng.random((n_kpts, dim)) ** 3 * 64) / 256
        feats[f"db/{i:05d}.jpg"] = {
            "keypoints": rng.random((n_kpts, 2)).astype(np.float32) * 640,
            "descriptors": desc.astype(np.float32), "scores": rng.random(n_kpts).astype(np.float32),
            "image_size": (640, 480), "original_size": (640, 480), "seconds": 0.1,
            "levels": rng.integers(0, 3, n_kpts),
        }
    return feats


def index_of(folder, tmp_path, name="feat.json"):
    info = {"folder": str(folder), "images": scan_parts(folder), "errors": {}}
    write_json(tmp_path / name, info)
    return tmp_path / name


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_storage_options_keep_the_values(tmp_path, compression, dtype):
    feats = fake_features(3)
    folder = tmp_path / "store"
    write_part(folder / "part_a_000000.h5", feats, {"descriptors": dtype, "compression": compression})
    store = FeatureStore(index_of(folder, tmp_path))
    for name, d in feats.items():
        got = store.get(name)
        assert got["descriptors"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got["descriptors"].astype(np.float32), d["descriptors"])  # exact in float16 too
        np.testing.assert_array_equal(got["keypoints"], d["keypoints"])
        np.testing.assert_array_equal(got["levels"], d["levels"])
    store.close()
    with h5py.File(folder / "part_a_000000.h5", "r") as f:
        ds = f["db/00000.jpg/descriptors"]
        assert ds.compression == (None if compression == "none" else compression)
        assert ds.chunks is None if compression == "none" else ds.chunks[1] == 128
        assert f["db/00000.jpg/image_size"].chunks is None  # tiny arrays stay contiguous


def test_compression_makes_the_store_smaller(tmp_path):
    feats = fake_features(8)
    sizes = {}
    for comp in ("none", "lzf", "gzip"):
        write_part(tmp_path / f"{comp}.h5", feats, {"compression": comp})
        sizes[comp] = (tmp_path / f"{comp}.h5").stat().st_size
    assert sizes["gzip"] < sizes["lzf"] < sizes["none"], sizes


def test_store_options_are_checked_and_only_dtype_changes_the_folder(tmp_path):
    base = store_dir(tmp_path, SIFT)
    assert store_dir(tmp_path, {**SIFT, "store": {"compression": "gzip", "part_size": 64}}) == base
    assert store_dir(tmp_path, {**SIFT, "store": {"descriptors": "float32"}}) != base
    assert split_conf({**SIFT, "store": {"compression": "gzip"}}) == (SIFT, {"descriptors": "float16",
                                                                         "compression": "gzip", "part_size": 256})
    for bad, msg in (({"compression": "zip"}, "compression must be one of"), ({"descriptors": "int8"}, "float16 or float32"),
                     ({"chunks": 3}, "unknown store option")):
        with pytest.raises(ValueError, match=msg):
            split_conf({**SIFT, "store": bad})
    cfg = {"global_methods": {}, "datasets": {}, "local_features": {"s": {**SIFT, "store": {"compression": "zip"}}}}
    with pytest.raises((ConfigError, ValueError), match="compression must be one of"):
        check_config(cfg)


def test_reader_keeps_a_bounded_number_of_parts_open(tmp_path):
    feats = fake_features(10, n_kpts=20)
    folder = tmp_path / "store"
    for i, name in enumerate(feats):
        write_part(folder / f"part_a_{i:06d}.h5", {name: feats[name]})
    store = FeatureStore(index_of(folder, tmp_path), max_open=3)
    for _ in range(2):
        for name, d in feats.items():
            np.testing.assert_array_equal(store.get(name)["keypoints"], d["keypoints"])
            assert len(store._files) <= 3
    store.close()


def test_damaged_part_names_the_file(tmp_path):
    feats = fake_features(2, n_kpts=20)
    folder = tmp_path / "store"
    write_part(folder / "part_a_000000.h5", feats)
    index = index_of(folder, tmp_path)
    (folder / "part_a_000000.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match=r"part_a_000000.h5: damaged or missing feature part"):
        FeatureStore(index).get("db/00000.jpg")


def _read_all(args):
    index, names, rounds = args
    store = FeatureStore(index, max_open=4)
    total = 0.0
    for _ in range(rounds):
        for n in names:
            total += float(store.get(n)["keypoints"].sum())
    store.close()
    return total


def test_concurrent_readers_while_a_writer_adds_parts(tiny_dataset, tmp_path):
    """Several processes read a store while extract_local adds parts to it: no locking errors, same values."""
    from pipeline.datasets.index import index_dataset, read_table

    index_dataset(tiny_dataset, tmp_path / "index")
    names = read_table(tmp_path / "index" / "database.csv").name.tolist()
    conf = {**SIFT, "store": {"part_size": 2}}
    info = extract_local(conf, tiny_dataset, names[:6], tmp_path / "local", device="cpu")
    write_json(tmp_path / "feat.json", info)
    expected = _read_all((tmp_path / "feat.json", names[:6], 1))
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        pending = pool.map_async(_read_all, [(tmp_path / "feat.json", names[:6], 20)] * 3)
        more = extract_local(conf, tiny_dataset, names, tmp_path / "local", device="cpu")  # writes beside them
        results = pending.get(timeout=300)
    assert results == pytest.approx([20 * expected] * 3)
    assert more["extracted_this_run"] == len(names) - 6
    parts = sorted(p.name for p in (tmp_path / "local").glob("*/part_*.h5"))
    # two writer runs, two tokens: part names never collide
    assert len({p.rsplit("_", 1)[0] for p in parts}) == 2 and len(parts) == 3 + -(-(len(names) - 6) // 2)


def test_threaded_cpu_extraction_equals_one_at_a_time(tiny_dataset, tmp_path, monkeypatch, caplog):
    """SIFT on a CPU describes one image per core in threads: the store holds exactly what
    one image at a time gives, in the same parts, and an unreadable image is still reported."""
    import logging

    import torch

    from pipeline.datasets.index import index_dataset, read_table
    from pipeline.extract_local import extraction_threads
    from pipeline.local_features import build_model

    index_dataset(tiny_dataset, tmp_path / "index")
    names = read_table(tmp_path / "index" / "database.csv").name.tolist()
    (tiny_dataset / "broken.jpg").write_bytes(b"not a jpeg")
    names = names[:3] + ["broken.jpg"] + names[3:]
    conf = {**SIFT, "store": {"part_size": 3}}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = extract_local(conf, tiny_dataset, names, tmp_path / "one", device="cpu")
        torch.set_num_threads(3)
        assert extraction_threads(build_model(SIFT), "cpu") == 3
        with caplog.at_level(logging.INFO, logger="pipeline.extract_local"):
            many = extract_local(conf, tiny_dataset, names, tmp_path / "many", device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert "describing 3 images at once" in caplog.text
    assert list(many["errors"]) == list(one["errors"]) == ["broken.jpg"]
    assert many["images"].keys() == one["images"].keys() and len(many["images"]) == len(names) - 1
    write_json(tmp_path / "one.json", one)
    write_json(tmp_path / "many.json", many)
    a, b = FeatureStore(tmp_path / "one.json"), FeatureStore(tmp_path / "many.json")
    for n in one["images"]:
        fa, fb = a.get(n), b.get(n)
        assert len(fa["keypoints"]) > 50
        for key in ("keypoints", "descriptors", "scores"):
            np.testing.assert_array_equal(fa[key], fb[key])
    # the parts were filled in the loader's order, as one at a time fills them
    assert sorted(one["images"][n].split("_")[-1] for n in one["images"]) == \
        sorted(many["images"][n].split("_")[-1] for n in many["images"])
    # GPU models and torch extractors keep one image at a time
    assert extraction_threads(build_model({"name": "sift"}), "cuda") == 1
