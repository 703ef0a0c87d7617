"""Produce ``tests/fixtures/delg_tf_reference.npz`` by running the *upstream* TensorFlow DELG code.

Usage (TensorFlow and tf-keras installed in a folder of their own, never in this repo)::

    pip install --target /tmp/tfpkgs tensorflow-cpu==2.21.0 tf-keras==2.21.0
    pip install --target /tmp/tfpkgs2 --no-deps tf-slim==1.1.0
    python3 tests/reference/make_delg_tf_reference.py --research /path/to/models/research \\
        --pythonpath /tmp/tfpkgs2:/tmp/tfpkgs --out tests/fixtures/delg_tf_reference.npz

``--research`` is a tensorflow/models ``research`` folder holding ``delf/`` and
``object_detection/`` (``core``, ``utils``). Upstream code run, unchanged (Keras 2 API
through ``TF_USE_LEGACY_KERAS=1``, as the code was written for):

1. ``delf/python/training/model/export_local_and_global_model._ExtractModule`` with its
   flag defaults (``Delg`` with ``block3_strides``, GeM power 3, 2048-d embedding layer,
   autoencoder to 128 dimensions, NMS IoU 1.0), built by one call; every variable is then
   set by :func:`seeded_tf_values` (seed 7, keyed by the variable's object path
   ``backbone/l2a/conv2a/kernel``..., read from the SavedModel's object graph), and the
   module is saved with ``tf.saved_model.save`` as that script does;
2. ``delf/python/examples/extractor.MakeExtractor`` on that SavedModel with the
   ``r50delg_gld_config.pbtxt`` settings (7 image scales, global scale indices 3, 4, 5,
   ``max_image_size`` 1024, no PCA; ``is_tf2_exported`` set, since this export is TF2)
   except two reduced for a small fixture: ``max_feature_num`` 200 and the attention
   ``score_threshold``, chosen from the scores of all cells (a threshold 175 means
   nothing for random weights) so that about 250 cells pass and the top-200 cut is used;
3. the image: ``montmartre_close.jpg`` resized (PIL bilinear) to a longer side of 256 px,
   the uint8 RGB array ``utils.RgbLoader`` + ``np.array`` give upstream.

Stored: the extractor's output (locations as (x, y), attention, DELF feature scales
``1 / s``, descriptors (float16), global descriptor), the attention map of all
``block3`` cells at scale 1 (``model.build_call`` on the resized image), the parameter
counts (``model.count_params()``, without and with the training heads), the SavedModel's
``variables.index`` and object graph (zlib), and a small checkpoint written by TensorFlow
(several dtypes) to test the bundle reader. No module of this repository is imported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import types
import zlib
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_rgb, upstream_commit, write_fixture

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# the seeded fill both sides use (numpy only; the test rebuilds the same values)
from pipeline.local_features.delg_tf import seeded_tf_values  # noqa: E402

WEIGHT_SEED = 7
RESIZE = 256
IMAGE = "montmartre_close.jpg"
IMAGE_SCALES = [0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0]  # r50delg_gld_config.pbtxt
GLOBAL_SCALES_IND = [3, 4, 5]
MAX_IMAGE_SIZE = 1024
MAX_FEATURES = 200
TARGET_PASSING = 250
NUM_CLASSES_GLD_V1 = 14951  # googlelandmarks.GoogleLandmarksInfo.num_classes['gld_v1']
#: children of Keras objects in a SavedModel's object graph that are not attributes
KERAS_INTERNAL = {"variables", "trainable_variables", "non_trainable_variables", "regularization_losses",
                  "keras_api", "layers", "layer_metrics", "__call__", "call_and_return_all_conditional_losses",
                  "_default_save_signature", "_jit_compiled_convolution_op"}




def values_sha256(values: dict) -> str:
    h = hashlib.sha256()
    for path in sorted(values):
        h.update(path.encode() + b"\0" + np.ascontiguousarray(values[path], dtype="<f4").tobytes())
    return h.hexdigest()


def import_upstream(research: str):
    """Import upstream modules without ``delf/__init__.py`` (it needs protoc-compiled protos)."""
    sys.path.insert(0, research)  # object_detection
    prefixed = types.ModuleType("research")  # some copies import 'research.object_detection...'
    prefixed.__path__ = [research]
    sys.modules["research"] = prefixed
    delf = types.ModuleType("delf")
    delf.__path__ = [os.path.join(research, "delf", "delf")]
    sys.modules["delf"] = delf
    datum_io = types.ModuleType("delf.datum_io")  # needs datum_pb2; only used for PCA files

    def _no_pca(*a, **k):
        raise RuntimeError("datum_io is not available here (PCA is off in the DELG config)")

    datum_io.ReadFromFile = _no_pca
    sys.modules["delf.datum_io"] = delf.datum_io = datum_io
    from delf.python import feature_extractor, utils
    delf.feature_extractor, delf.utils = feature_extractor, utils
    sys.modules["delf.feature_extractor"], sys.modules["delf.utils"] = feature_extractor, utils
    from absl import flags
    from delf.python.examples import extractor
    from delf.python.training.model import export_local_and_global_model as export

    flags.FLAGS(["make_delg_tf_reference"])  # the export script's flag defaults
    return export, extractor


def variable_paths(graph, root_child: str = "_model") -> dict:
    """Object path (``backbone/conv1/kernel``) -> checkpoint key of every variable under
    ``root_child``, walking attribute children only."""
    nodes = graph.nodes
    start = next(c.node_id for c in nodes[0].children if c.local_name == root_child)
    out, todo = {}, [(start, "")]
    while todo:
        node, path = todo.pop()
        attrs = [a.checkpoint_key for a in nodes[node].attributes if a.name == "VARIABLE_VALUE"]
        if attrs and path:
            out[path] = attrs[0]
            continue
        for c in nodes[node].children:
            if c.local_name not in KERAS_INTERNAL:
                todo.append((c.node_id, f"{path}/{c.local_name}" if path else c.local_name))
    return out


def read_bytes(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8)


def tiny_bundle(tf, folder: str) -> dict:
    """A small checkpoint written by TensorFlow (``tf.train.Checkpoint``), for the reader test."""
    import ml_dtypes

    root = tf.Module()
    root.a = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3) / 7)
    root.half = tf.Variable(np.array([0.5, -1.25, 3.0, 65504.0], dtype=np.float16))
    root.count = tf.Variable(np.int64(-123456789012))
    root.bf16 = tf.Variable(np.array([1.0, -2.5, 0.15625], dtype=ml_dtypes.bfloat16))
    root.flags = tf.Variable(np.array([True, False]))
    root.child = tf.Module()
    root.child.m = tf.Variable(np.arange(-2, 2, dtype=np.int32).reshape(2, 2))
    prefix = tf.train.Checkpoint(root=root).write(os.path.join(folder, "tiny"))
    out = {"tiny_index": read_bytes(prefix + ".index"), "tiny_data": read_bytes(prefix + ".data-00000-of-00001")}
    reader = tf.train.load_checkpoint(prefix)
    keys = sorted(k for k in reader.get_variable_to_shape_map() if k != "_CHECKPOINTABLE_OBJECT_GRAPH")
    out["tiny_keys"] = np.array(keys)
    for i, k in enumerate(keys):
        v = reader.get_tensor(k)
        out[f"tiny_value_{i}"] = np.asarray(v, dtype=np.float32) if v.dtype == ml_dtypes.bfloat16 else np.asarray(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--research", required=True, help="tensorflow/models 'research' folder (delf/, object_detection/)")
    ap.add_argument("--pythonpath", default=None, help="folders (':'-separated) holding tensorflow, tf-keras, tf-slim")
    ap.add_argument("--images", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                                                     "fixtures", "pairs"), help="folder of montmartre_close.jpg")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="upstream commit to record")
    args = ap.parse_args()

    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # upstream uses the Keras 2 API (tf.keras of TF <= 2.15)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.pythonpath:
        sys.path[:0] = [os.path.abspath(p) for p in args.pythonpath.split(":")]
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    research = os.path.abspath(args.research)
    export, extractor = import_upstream(research)
    tf.random.set_seed(0)

    module = export._ExtractModule(True, 3.0, 2048, True, 1.0)  # the script's defaults
    model = module._model
    model(tf.zeros([1, 64, 64, 3]), training=False)  # builds every layer
    n_params = int(model.count_params())
    n_trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))

    work = tempfile.mkdtemp(prefix="delg_tf_ref_")
    sm_dir = os.path.join(work, "savedmodel")
    tf.saved_model.save(module, sm_dir)  # once, to read the variable paths from its object graph
    prefix = os.path.join(sm_dir, "variables", "variables")
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    paths = variable_paths(graph)
    index_of = {p: int(k.split("/")[2]) for p, k in paths.items()}  # _model/variables/<i>/...
    if sorted(index_of.values()) != list(range(len(model.variables))):
        raise SystemExit("the object graph does not map every model variable once")
    shapes = {p: tuple(model.variables[i].shape) for p, i in index_of.items()}
    values = seeded_tf_values(shapes, WEIGHT_SEED)
    for p, i in index_of.items():
        model.variables[i].assign(values[p])
    sm_dir = os.path.join(work, "savedmodel_seeded")
    tf.saved_model.save(module, sm_dir)
    prefix = os.path.join(sm_dir, "variables", "variables")
    reader = tf.train.load_checkpoint(prefix)
    for p, k in paths.items():
        if not np.array_equal(reader.get_tensor(k), values[p]):
            raise SystemExit(f"{k} was not saved with its seeded value")

    # parameter count of the training model (heads of r50delg_gld: GLDv1 classes)
    heads = export.delg_model.Delg(block3_strides=True, name="DELG", gem_power=3.0, embedding_layer_dim=2048,
                                   use_dim_reduction=True, reduced_dimension=128, dim_expand_channels=1024)
    heads(tf.zeros([1, 64, 64, 3]), training=False)
    heads.init_classifiers(NUM_CLASSES_GLD_V1)
    heads.attn_classification(tf.zeros([1, 1024]))
    n_params_heads = int(heads.count_params())

    rgb = load_rgb(os.path.join(args.images, IMAGE), RESIZE)

    def config(threshold: float, max_features: int):
        return SimpleNamespace(
            use_local_features=True, use_global_features=True, model_path=sm_dir, is_tf2_exported=True,
            image_scales=IMAGE_SCALES, max_image_size=MAX_IMAGE_SIZE, min_image_size=-1, use_square_images=False,
            delf_local_config=SimpleNamespace(use_pca=False, max_feature_num=max_features,
                                              score_threshold=threshold, use_resized_coordinates=False),
            delf_global_config=SimpleNamespace(use_pca=False, image_scales_ind=GLOBAL_SCALES_IND))

    every = extractor.MakeExtractor(config(-1.0, 100000))(rgb)["local_features"]["attention"]
    ranked = np.sort(every)[::-1]
    gaps = ranked[TARGET_PASSING - 20:TARGET_PASSING + 20] - ranked[TARGET_PASSING - 19:TARGET_PASSING + 21]
    j = TARGET_PASSING - 20 + int(np.argmax(gaps))
    threshold = float(np.float32((ranked[j] + ranked[j + 1]) / 2))  # between two scores, well apart
    feats = extractor.MakeExtractor(config(threshold, MAX_FEATURES))(rgb)
    loc = feats["local_features"]
    n_pass = int((every >= threshold).sum())

    # attention of every block3 cell at scale 1 (the exported model's build_call)
    x = tf.image.resize(tf.expand_dims((tf.cast(rgb, tf.float32) - 128.0) / 128.0, 0), rgb.shape[:2])
    attention_s1 = model.build_call(x, training=False)[1].numpy()[0, ..., 0]

    scales, counts = np.unique(loc["scales"], return_counts=True)
    print(f"{n_params} params ({n_trainable} trainable, {n_params_heads} with GLDv1 heads); "
          f"threshold {threshold:.6f}: {n_pass} of {len(every)} cells pass, {len(loc['attention'])} kept; "
          f"per DELF scale {dict(zip(scales.round(4), counts))}")
    if not (len(loc["attention"]) == MAX_FEATURES < n_pass and len(scales) >= 5):
        raise SystemExit("degenerate fixture: expected a top-k cut and features at most scales")
    out = {
        "keypoints": np.ascontiguousarray(loc["locations"][:, ::-1]).astype(np.float32),
        "scores": loc["attention"].astype(np.float32),
        "feature_scales": loc["scales"].astype(np.float32),
        "descriptors": loc["descriptors"].astype(np.float16),
        "global_descriptor": feats["global_descriptor"].astype(np.float32),
        "attention_s1": attention_s1.astype(np.float32),
        "image_size": np.array(rgb.shape[1::-1], dtype=np.int64),  # width, height
        "n_cells": np.array(len(every)),
        "n_pass": np.array(n_pass),
        "score_threshold": np.array(threshold, dtype=np.float32),
        "max_feature_num": np.array(MAX_FEATURES),
        "image_scales": np.array(IMAGE_SCALES, dtype=np.float32),
        "global_scales_ind": np.array(GLOBAL_SCALES_IND),
        "max_image_size": np.array(MAX_IMAGE_SIZE),
        "iou": np.array(1.0),
        "weight_seed": np.array(WEIGHT_SEED),
        "weights_sha256": np.array(values_sha256(values)),
        "n_params": np.array(n_params),
        "n_trainable": np.array(n_trainable),
        "n_params_heads": np.array(n_params_heads),
        "num_classes_heads": np.array(NUM_CLASSES_GLD_V1),
        "savedmodel_index": read_bytes(prefix + ".index"),
        "object_graph_zlib": np.frombuffer(zlib.compress(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"), 9),
                                           np.uint8),
        "image": np.array(IMAGE),
        "resize": np.array(RESIZE),
        "upstream_commit": np.array(args.commit or upstream_commit(os.path.dirname(research))),
        "tf_version": np.array(tf.__version__),
    }
    out.update(tiny_bundle(tf, work))
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
