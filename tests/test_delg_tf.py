"""DELG of the authors' TensorFlow code (``pipeline.local_features.delg_tf``) against upstream.

The fixture ``tests/fixtures/delg_tf_reference.npz`` was made by
``tests/reference/make_delg_tf_reference.py`` (see ``tests/reference/README_delg_tf.md``):
tensorflow/models' ``export_local_and_global_model._ExtractModule`` with every variable set
from ``seeded_tf_values`` (seed 7), saved with ``tf.saved_model.save``, run through
``delf/python/examples/extractor.MakeExtractor`` on ``montmartre_close.jpg`` resized to
256 px. Here the same seeded values are written by *our* bundle writer, with the object
graph TensorFlow wrote, into a SavedModel ``variables/`` folder whose index must be
byte-identical to TensorFlow's; our loader reads it back and our model must reproduce
upstream's features.
"""

from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import load_tensor
from pipeline.local_features import tf_bundle
from pipeline.local_features.delg_tf import (
    DELGTF,
    DelgNet,
    savedmodel_tensors,
    seeded_tf_values,
    select_features,
    tf_shape,
    tf_variables,
    write_random_checkpoint,
)
from tests.reference.make_delg_tf_reference import values_sha256

from .conftest import SHARED, need_shared

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "delg_tf_reference.npz")
PAIRS = SHARED / "fixtures" / "pairs"
# Measured on the CPU against TF 2.21: attention <= 2.9e-6 absolute (scores ~1), the
# global descriptor <= 6.7e-8, descriptors <= 1.2e-4 (the fixture keeps them as float16:
# unit-norm 128-d components round by up to 1.2e-4); keypoints are bit-identical.
SCORE_ATOL = 2e-5
DESC_ATOL = 3e-4
GLOBAL_ATOL = 1e-6
#: the SavedModel's variables: 332 in Keras order (backbone, attention, autoencoder)
N_VARIABLES = 332


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def net():
    return DelgNet()


@pytest.fixture(scope="module")
def shapes(net):
    state = net.state_dict()
    return {p: tf_shape(state[k]) for p, k, _ in tf_variables(net)}


@pytest.fixture(scope="module")
def tf_graph(ref):
    return tf_bundle.parse_object_graph(zlib.decompress(ref["object_graph_zlib"].tobytes()))


@pytest.fixture(scope="module")
def seeded_folder(ref, net, shapes, tf_graph, tmp_path_factory):
    """The seeded SavedModel variables, written by our writer with TensorFlow's object graph."""
    values = seeded_tf_values(shapes, int(ref["weight_seed"]))
    assert values_sha256(values) == str(ref["weights_sha256"]), "seeded values differ from the reference's"
    tensors = savedmodel_tensors(net, values)
    tensors[tf_bundle.OBJECT_GRAPH_KEY] = zlib.decompress(ref["object_graph_zlib"].tobytes())
    folder = tmp_path_factory.mktemp("delg_tf") / "r50delg_seeded"
    tf_bundle.write_bundle(folder / "variables" / "variables", tensors)
    return folder


@pytest.fixture(scope="module")
def model(ref, seeded_folder):
    return DELGTF({"weights": str(seeded_folder), "score_threshold": float(ref["score_threshold"]),
                   "max_keypoints": int(ref["max_feature_num"])})


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("delg_tf_random") / "delg_seed0"
    write_random_checkpoint(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def random_model(random_folder):
    return DELGTF({"weights": str(random_folder)})


def test_parameter_count(ref, net):
    # TF: Delg(...).count_params() of the exported model (make_delg_tf_reference.py) counts
    # BatchNorm moving statistics too; our nn.Parameters are its trainable weights
    n_train = sum(p.numel() for p in net.parameters())
    n_stats = sum(b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert n_train == 28_520_577 == int(ref["n_trainable"])
    assert n_train + n_stats == 28_574_721 == int(ref["n_params"])
    # with the training heads for GLDv1 (14951 classes): cosine_weights [2048, C],
    # scale_factor, att_fc [1024, C] + [C]
    c = int(ref["num_classes_heads"])
    assert 28_574_721 + 2048 * c + 1 + 1024 * c + c == 74_519_145 == int(ref["n_params_heads"])
    assert len(tf_variables(net)) == N_VARIABLES


def test_variable_paths_and_order_are_tensorflows(ref, net, shapes, tf_graph):
    # TF's SavedModel index and object graph: each of our variable paths resolves to
    # _model/variables/<i> with i its Keras order, same shape and Keras name
    entries = {k.decode(): tf_bundle.BundleEntry.parse(v)
               for k, v in tf_bundle.read_table(ref["savedmodel_index"].tobytes()) if k}
    assert len(entries) == N_VARIABLES + 1 and tf_bundle.OBJECT_GRAPH_KEY in entries
    for i, (path, _, full_name) in enumerate(tf_variables(net)):
        key = f"_model/variables/{i}{tf_bundle.VARIABLE_SUFFIX}"
        assert tf_bundle.resolve_path(tf_graph, "_model/" + path) == key, path
        assert entries[key].shape == shapes[path] and entries[key].dtype == 1
        node = 0
        for part in ("_model/" + path).split("/"):
            node = next(j for n, j in tf_graph[node]["children"] if n == part)
        assert tf_graph[node]["attributes"][0][1] == full_name


def test_our_writer_reproduces_tensorflows_bundle(ref, seeded_folder):
    # same values + TF's object graph -> the index TF wrote, byte for byte (so every
    # variable's offset, size and CRC32C of its bytes agree too)
    index = (seeded_folder / "variables" / "variables.index").read_bytes()
    assert index == ref["savedmodel_index"].tobytes()


def test_matches_upstream(model, ref):
    c = model.conf
    assert not model.training and "object graph, model at '_model/'" in model.layout
    assert np.float32(c["image_scales"]).tolist() == ref["image_scales"].tolist()
    assert c["global_scales_ind"] == ref["global_scales_ind"].tolist()
    assert c["max_image_size"] == int(ref["max_image_size"]) and c["nms_iou"] == float(ref["iou"])
    img = load_tensor(need_shared(PAIRS / str(ref["image"])), resize=int(ref["resize"]))
    assert list(img.shape[:0:-1]) == ref["image_size"].tolist()
    out = {k: v.numpy() for k, v in model(img).items()}
    n = len(ref["scores"])
    assert out["keypoints"].shape == (n, 2) and out["descriptors"].shape == (n, 128)
    assert out["scores"].shape == out["scales"].shape == (n,) and out["global_descriptor"].shape == (2048,)
    # the same features in the same order (upstream: top max_feature_num by attention)
    np.testing.assert_array_equal(out["keypoints"], ref["keypoints"])
    np.testing.assert_array_equal(np.float32(1) / out["scales"], ref["feature_scales"])
    np.testing.assert_allclose(out["scores"], ref["scores"], rtol=0, atol=SCORE_ATOL)
    np.testing.assert_allclose(out["descriptors"], ref["descriptors"].astype(np.float32), rtol=0, atol=DESC_ATOL)
    np.testing.assert_allclose(out["global_descriptor"], ref["global_descriptor"], rtol=0, atol=GLOBAL_ATOL)
    assert len(np.unique(out["scales"])) == 7
    # the attention of every block3 cell at scale 1 (before the threshold)
    x = (img[None] * 255).round() / 128.0 - 1.0
    with torch.inference_mode():
        att = model.net.attention(model.net.backbone.block3(x))[0, 0].numpy()
    np.testing.assert_allclose(att, ref["attention_s1"], rtol=0, atol=SCORE_ATOL)


def test_random_checkpoint_on_real_pair_with_rrt(random_folder, random_model, tmp_path):
    from pipeline.matchers.rrt import RRT
    from pipeline.matchers.rrt import write_random_checkpoint as write_rrt

    assert sorted(os.listdir(random_folder / "variables")) == ["variables.data-00000-of-00001", "variables.index"]
    model = random_model
    assert "object graph, model at '_model/'" in model.layout
    assert model.conf["score_threshold"] == 175.0 and model.conf["max_keypoints"] == 1000
    feats = []
    for name in ("montmartre_close.jpg", "montmartre_far.jpg"):
        img = load_tensor(need_shared(PAIRS / name), resize=128)
        out = model(img)
        n = len(out["keypoints"])
        assert 0 < n <= 1000
        assert out["keypoints"].dtype == out["descriptors"].dtype == out["scores"].dtype == torch.float32
        assert out["descriptors"].shape == (n, model.descriptor_dim) == (n, 128)
        assert out["scores"].shape == out["scales"].shape == (n,)
        assert bool((out["scores"] >= 175).all()) and bool((out["scores"].diff() <= 0).all())
        assert set(out["scales"].tolist()) <= set(np.float32(model.conf["image_scales"]).tolist())
        torch.testing.assert_close(out["descriptors"].norm(dim=1), torch.ones(n), rtol=0, atol=1e-5)
        g = out["global_descriptor"]
        assert g.shape == (2048,) and torch.isfinite(g).all() and abs(float(g.norm()) - 1) < 1e-5
        h, w = img.shape[1:]
        kp = out["keypoints"]
        assert (kp >= 0).all() and (kp[:, 0] < w).all() and (kp[:, 1] < h).all()
        out["descriptors"] = out["descriptors"].half()  # as the feature store keeps them
        out["image_size"] = torch.tensor([w, h])
        feats.append(out)
    # RRT with its default (released) sizes takes these features as they are
    write_rrt(tmp_path / "rrt.pt", seed=0)
    rrt = RRT({"weights": str(tmp_path / "rrt.pt")})
    assert rrt.conf["num_global_features"] == 2048 and rrt.conf["num_local_features"] == 128
    score = rrt(feats[0], feats[1])["pair_score"]
    assert score.shape == (1,) and torch.isfinite(score).all()
    many = rrt.forward_many(feats[0], [feats[1], feats[0]])
    torch.testing.assert_close(many[0]["pair_score"], score, rtol=0, atol=1e-4)


def _edited(src, dst, edit) -> str:
    """A copy of the bundle in ``src`` with its index entries edited (data file linked)."""
    items = {k.decode(): v for k, v in tf_bundle.read_table((src / "variables" / "variables.index").read_bytes())}
    edit(items)
    (dst / "variables").mkdir(parents=True)
    os.symlink(src / "variables" / "variables.data-00000-of-00001", dst / "variables" / "variables.data-00000-of-00001")
    table = tf_bundle.build_table(sorted((k.encode(), v) for k, v in items.items()))
    (dst / "variables" / "variables.index").write_bytes(table)
    return str(dst)


def test_loader_refuses_bad_bundles(random_folder, net, tmp_path):
    index = {p: i for i, (p, _, _) in enumerate(tf_variables(net))}

    def key(path):
        return f"_model/variables/{index[path]}{tf_bundle.VARIABLE_SUFFIX}"

    def drop(items):
        del items[key("backbone/l3b/conv2b/kernel")]

    def extra(items):
        items["_model/variables/332" + tf_bundle.VARIABLE_SUFFIX] = items[key("attention/conv2/bias")]

    def reshape(items):
        e = tf_bundle.BundleEntry.parse(items[key("backbone/embedding_layer/kernel")])
        e.shape = (2048, 512)
        items[key("backbone/embedding_layer/kernel")] = e.serialize()

    for name, edit, expect in (
        ("missing_variable", drop, "missing variables (1): backbone/l3b/conv2b/kernel"),
        ("extra_variable", extra, "unexpected variables (1): _model/variables/332"),
        ("wrong_shape", reshape, "backbone/embedding_layer/kernel"),
    ):
        path = _edited(random_folder, tmp_path / name, edit)
        with pytest.raises(ValueError, match=name) as err:
            DELGTF({"weights": path})
        assert expect in str(err.value)
    # a truncated data file: the tensors past its end are named
    trunc = tmp_path / "truncated" / "variables"
    trunc.mkdir(parents=True)
    shutil.copy(random_folder / "variables" / "variables.index", trunc)
    with open(random_folder / "variables" / "variables.data-00000-of-00001", "rb") as f:
        (trunc / "variables.data-00000-of-00001").write_bytes(f.read(50_000_000))
    with pytest.raises(ValueError, match="truncated.*past the end"):
        DELGTF({"weights": str(tmp_path / "truncated")})


def test_missing_or_junk_weights_raise(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        DELGTF()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DELGTF({"weights": str(tmp_path / "nowhere")})
    junk = tmp_path / "junk" / "variables"
    junk.mkdir(parents=True)
    (junk / "variables.index").write_bytes(b"not a table" * 10)
    with pytest.raises(ValueError, match="junk.*bad magic"):
        DELGTF({"weights": str(tmp_path / "junk")})
    # a bundle of other variables (e.g. a TF1 graph's names): every DELG variable missing
    tf_bundle.write_bundle(tmp_path / "tf1" / "variables" / "variables",
                           {"resnet_v1_50/conv1/weights": np.zeros((7, 7, 3, 64), np.float32)})
    with pytest.raises(ValueError, match="missing variables \\(332\\).*unexpected variables \\(1\\): resnet_v1_50"):
        DELGTF({"weights": str(tmp_path / "tf1")})


def test_weights_path_forms_and_checkpoint_layouts(random_folder, random_model, net, tmp_path):
    # the SavedModel folder, its variables/ folder, the prefix and the .index file
    variables = random_folder / "variables"
    for path in (random_folder, variables, variables / "variables", variables / "variables.index"):
        assert tf_bundle.resolve_prefix(path) == str(variables / "variables")
    # a training checkpoint (tf.train.Checkpoint(model=..., optimizer=...)): keys by
    # object path under model/, with training heads and optimizer state skipped
    src = tf_bundle.TensorBundle(random_folder)
    small = {"model/cosine_weights" + tf_bundle.VARIABLE_SUFFIX: np.zeros((2048, 3), np.float32),
             "model/scale_factor" + tf_bundle.VARIABLE_SUFFIX: np.float32(45.25),
             "optimizer/iter" + tf_bundle.VARIABLE_SUFFIX: np.int64(10),
             "save_counter" + tf_bundle.VARIABLE_SUFFIX: np.int64(1)}
    ckpt = {f"model/{p}{tf_bundle.VARIABLE_SUFFIX}": src.get(f"_model/variables/{i}{tf_bundle.VARIABLE_SUFFIX}")
            for i, (p, _, _) in enumerate(tf_variables(net))}
    tf_bundle.write_bundle(tmp_path / "train" / "ckpt-1", {**ckpt, **small})
    m = DELGTF({"weights": str(tmp_path / "train" / "ckpt-1")})
    assert "under 'model/'" in m.layout and "skipped 4" in m.layout
    for (k, a), b in zip(m.net.state_dict().items(), random_model.net.state_dict().values()):
        assert torch.equal(a, b), k


def test_tensorflow_written_bundle(ref, tmp_path):
    # a small tf.train.Checkpoint written by TensorFlow (float32/16, bfloat16, int32/64,
    # bool, and the object-graph string): read, checksums verified
    prefix = tmp_path / "tiny"
    (tmp_path / "tiny.index").write_bytes(ref["tiny_index"].tobytes())
    (tmp_path / "tiny.data-00000-of-00001").write_bytes(ref["tiny_data"].tobytes())
    b = tf_bundle.TensorBundle(prefix)
    assert sorted(b.variable_keys()) == ref["tiny_keys"].tolist()
    for i, key in enumerate(ref["tiny_keys"].tolist()):
        want = ref[f"tiny_value_{i}"]
        got = b.get(key)
        assert got.shape == want.shape and np.array_equal(got.astype(want.dtype), want), key
    assert tf_bundle.resolve_path(b.object_graph, "child/m") == "child/m" + tf_bundle.VARIABLE_SUFFIX
    # our writer, given TF's data order and values, reproduces TF's files where no
    # bfloat16 is involved (numpy has no bfloat16)
    keys = [k for k in sorted(b.entries, key=lambda k: b.entries[k].offset) if b.entries[k].dtype != 14]
    tensors = {k: (b.get(k).reshape(-1)[0] if k == tf_bundle.OBJECT_GRAPH_KEY else b.get(k)) for k in keys}
    tf_bundle.write_bundle(tmp_path / "again", tensors)
    again = tf_bundle.TensorBundle(tmp_path / "again")
    for k in keys:
        assert again.entries[k].crc32c == b.entries[k].crc32c and again.entries[k].shape == b.entries[k].shape
    # a corrupted byte is caught by the checksum
    data = bytearray(ref["tiny_data"].tobytes())
    data[b.entries[keys[0]].offset] ^= 1
    (tmp_path / "tiny.data-00000-of-00001").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        tf_bundle.TensorBundle(prefix).get(keys[0])


def test_crc32c_and_cli(tmp_path, capsys):
    assert tf_bundle.crc32c_numpy(b"123456789") == tf_bundle.crc32c(b"123456789") == 0xE3069283  # check value
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    loop = 0xFFFFFFFF
    for byte in data.tobytes():
        loop = int(tf_bundle._TABLE[(loop ^ byte) & 0xFF]) ^ (loop >> 8)
    crc = loop ^ 0xFFFFFFFF
    assert tf_bundle.crc32c_numpy(data) == tf_bundle.crc32c(data) == tf_bundle.crc32c(data.tobytes()) == crc
    assert tf_bundle.crc32c_numpy(data[50_000:], tf_bundle.crc32c_numpy(data[:50_000])) == crc
    assert tf_bundle.crc32c(data[50_000:].tobytes(), tf_bundle.crc32c(data[:50_000].tobytes())) == crc
    tf_bundle.write_bundle(tmp_path / "b", {"x/kernel": np.ones((2, 3), np.float32)})
    tf_bundle.main([str(tmp_path / "b.index")])
    assert "x/kernel\tfloat32\t[2, 3]" in capsys.readouterr().out
    # an index of several data blocks (over 256 KiB; TF reads such files, checked once
    # with TF 2.21) reads back
    many = {f"layer_{i:05d}/some/long/variable/name/kernel{tf_bundle.VARIABLE_SUFFIX}": np.full(2, i, np.float32)
            for i in range(7000)}
    tf_bundle.write_bundle(tmp_path / "many", many)
    assert os.path.getsize(tmp_path / "many.index") > tf_bundle.BLOCK_SIZE
    b = tf_bundle.TensorBundle(tmp_path / "many")
    assert list(b.entries) == sorted(many) and b.get(sorted(many)[6543]).tolist() == [6543.0, 6543.0]


def test_max_image_size_resize_as_upstream(random_model):
    # upstream resizes images above max_image_size with PIL (bilinear) on uint8 and maps
    # the keypoints back to the input image
    img = load_tensor(need_shared(PAIRS / "montmartre_close.jpg"), resize=128)  # 128 x 88
    model = random_model
    model.conf["max_image_size"] = 100
    try:
        small, factors = model.to_uint8(img)
        out = model(img)
    finally:
        model.conf["max_image_size"] = DELGTF.default_conf["max_image_size"]
    rgb = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pil = np.asarray(rgb.resize((100, 69), Image.BILINEAR), dtype=np.float32)
    assert factors == (69 / 88, 100 / 128)
    np.testing.assert_array_equal(small[0].permute(1, 2, 0).numpy(), pil)
    kp = out["keypoints"]
    assert len(kp) > 0 and (kp[:, 0] < 128).all() and (kp[:, 1] < 88).all() and kp[:, 0].max() > 80
    # below 10 px upstream extracts nothing
    tiny = random_model(img[:, :9, :40])
    assert tiny["keypoints"].shape == (0, 2) and tiny["descriptors"].shape == (0, 128)
    assert tiny["global_descriptor"].shape == (2048,) and not tiny["global_descriptor"].any()


def test_feature_selection_as_tf_nms():
    # (ymin, xmin, ymax, xmax) boxes; 0 and 1 identical, 2 overlaps 0 by IoU 0.6, 3 apart
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 2.5, 10, 12.5], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([2.0, 2.0, 3.0, 1.0])
    assert select_features(boxes, scores, 1.0, None).tolist() == [2, 0, 1, 3]  # nothing suppressed, ties stable
    assert select_features(boxes, scores, 1.0, 2).tolist() == [2, 0]
    assert select_features(boxes, scores, 0.7, None).tolist() == [2, 0, 3]  # IoU(0, 1) = 1 > 0.7
    assert select_features(boxes, scores, 0.5, None).tolist() == [2, 3]  # IoU(2, 0) = 0.6 > 0.5
    assert select_features(boxes[:0], scores[:0], 0.5, 10).tolist() == []
