"""Randomly initialised checkpoints in the official file formats, clearly labelled.

None of the thesis's re-ranking models ship weights with this project and nothing is
downloaded. To run a method end to end without its weights (to check the pipeline, to
time it), :func:`write_random` saves a seeded random initialisation of the
architecture in the *upstream* file layout, so the same loader reads it as it reads
the released file, and writes a sidecar ``<file>.random.json`` next to it. Results
made with such a file say so: :func:`weights_label` finds the sidecars of the weight
files a conf names and the results CSV gets a ``weights`` column reading
``RANDOM ...`` (recalls from random weights mean nothing about the method).

Snakemake builds ``{work_dir}/random_weights/{model}_seed{seed}.pth`` on demand for
any conf that points there (see ``workflow/rules/rerank.smk``).
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from .assets import weight_paths
from .io import atomic_path, write_json

#: model name -> module with ``write_random_checkpoint(path, seed, conf)``, or
#: (module, conf) for a variant with other sizes than the released model
MODELS: dict[str, str | tuple[str, dict]] = {
    "d2net": "pipeline.local_features.d2net",
    "delg": "pipeline.local_features.delg",
    "delg_tf": "pipeline.local_features.delg_tf",  # a SavedModel variables folder
    "patchnetvlad": "pipeline.local_features.patchnetvlad",
    "transvpr": "pipeline.local_features.transvpr",
    "rrt": "pipeline.matchers.rrt",  # the released sizes: TF DELG's 2048-d global, 128-d local
    "rrt-delg512": ("pipeline.matchers.rrt", {"num_global_features": 512, "num_local_features": 512}),
    "loftr": "pipeline.matchers.loftr",
    "cvnet": "pipeline.matchers.cvnet",
    "superglue": "pipeline.matchers.superglue",
    # global descriptors (released layouts: MegaLoc safetensors, SALAD / MixVPR Lightning .ckpt)
    "megaloc": "pipeline.global_features.megaloc",
    "salad": "pipeline.global_features.salad",
    "boq": "pipeline.global_features.boq",  # ResNet-50, 16384-d
    "boq-dinov2": ("pipeline.global_features.boq", {"backbone": "dinov2"}),  # 12288-d
    "eigenplaces": "pipeline.global_features.eigenplaces",
    "mixvpr": "pipeline.global_features.mixvpr",
}
SUFFIX = ".random.json"
NAME = re.compile(r"(?P<model>[a-z0-9_-]+?)_seed(?P<seed>\d+)(\.[a-z.]+)?")


def write_random(model: str, path, seed: int = 0) -> Path:
    """Write a seeded random checkpoint of ``model`` in its official layout, and its label."""
    if model not in MODELS:
        raise ValueError(f"no random checkpoint writer for {model!r}; known: {sorted(MODELS)}")
    module, conf = MODELS[model] if isinstance(MODELS[model], tuple) else (MODELS[model], None)
    path = Path(path)
    with atomic_path(path) as tmp:
        importlib.import_module(module).write_random_checkpoint(tmp, seed=seed, conf=conf)
    write_json(path.with_name(path.name + SUFFIX), {
        "model": model, "seed": seed, "trained": False,
        "note": "randomly initialised weights in the official checkpoint layout: NOT a trained model",
    })
    return path


def parse_name(path) -> tuple[str, int]:
    """``d2net_seed0.pth`` -> ``("d2net", 0)``."""
    m = NAME.fullmatch(Path(path).name)
    if not m:
        raise ValueError(f"{path}: random checkpoints are named <model>_seed<N>.pth (a folder: <model>_seed<N>)")
    return m["model"], int(m["seed"])


def weights_label(conf) -> str:
    """``RANDOM (...)`` when a weight file of ``conf`` is a random checkpoint; else the weight
    files themselves, each as ``<file name> sha256:<12 hex>`` (``weights: auto`` and asset
    names resolved to the registered files); ``none`` for a conf without weight files."""
    from .assets import describe_file, resolve_conf
    from .weights import full_model_conf

    paths = weight_paths(resolve_conf(conf, fill=full_model_conf))
    random, files = [], []
    for p in paths:
        side = Path(p).with_name(Path(p).name + SUFFIX)
        if side.is_file():
            info = json.loads(side.read_text())
            random.append(f"{info['model']} seed {info['seed']}")
        files.append(describe_file(p) if Path(p).exists() else f"{Path(p).name} (missing)")
    if random:
        return "RANDOM untrained weights (" + ", ".join(random) + "): recalls are not meaningful"
    return ", ".join(files) if paths else "none"


def _arguments(p):
    p.add_argument("--out", required=True, help="<model>_seed<N>.pth, or any name with --model/--seed")
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)


def _run(a):
    model, seed = parse_name(a.out) if a.model is None else (a.model, a.seed)
    print(write_random(model, a.out, seed))


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"random-weights": (_arguments, _run)}
