"""Accuracy of the filter stage's statistics baselines on generated labelled images.

Day/night (``daynight_stats``): day street views (the synthetic generator's
database) against night street views (its queries). Outdoor/indoor
(``outdoor_stats``): the same street views against synthetic rooms
(:func:`tests.nightset_images.render_room`, half lit by day, half by night).

Two independent sets are generated (different seeds, so different streets and
rooms): a *fit* set and a *test* set. On the test set the script prints, for each
model, the accuracy and confusion matrix of the documented default coefficients
and of coefficients fitted (:func:`pipeline.nightset.stats_models.fit_stats`) on the
fit set, plus per-feature statistics (mean and std per class, and the AUC of the
feature alone: 0.5 = no information, 0 or 1 = separates the classes by itself).

    python benchmarks/daynight_baseline.py                 # 200 day + 200 night + 200 rooms per set
    python benchmarks/daynight_baseline.py --n 100 --mobilenet --json out.json

``--mobilenet`` also trains the CNN baseline on the fit set (a few epochs at 64 px)
and tests it. Everything is built in a temporary folder (or ``--work``).
All numbers are on synthetic images: they check the code and give an upper bound
of what these statistics can do, not their accuracy on real Flickr photos. The
coefficients fitted here are for the synthetic images only (e.g. ``light_frac``
gets a large negative weight because the synthetic night has no saturated lamps
while a few day views have white highlights): fit on labelled photos of the area
instead, with ``fit --features`` to leave out what the labelled set cannot exercise.

Measured (``--n 200 --mobilenet``, 320x240, 2 CPU cores, about 7 minutes; 30 s without
``--mobilenet``): daynight_stats default 0.873 (no day called night, 51/200 night
missed), fitted 0.955, mobilenet 0.975; outdoor_stats default 0.928 (0.887 on the
night images alone), fitted 0.998, mobilenet 0.973.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.nightset.classify import build_classifier  # noqa: E402
from pipeline.nightset.mobilenet import MobileNetClassifier, train  # noqa: E402
from pipeline.nightset.photos import read_photo  # noqa: E402
from pipeline.nightset.stats_models import fit_stats  # noqa: E402
from tests.nightset_images import make_labelled_images  # noqa: E402


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve of score ``x`` for labels ``y`` (ties counted half)."""
    pos, neg = x[y == 1], x[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def confusion(pred: np.ndarray, y: np.ndarray) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]: rows = true class (0, 1), columns = predicted class."""
    return [[int(((y == t) & (pred == p)).sum()) for p in (0, 1)] for t in (0, 1)]


def feature_stats(model, X: np.ndarray, y: np.ndarray) -> list[dict]:
    return [{"feature": f, "mean_0": float(X[y == 0, j].mean()), "std_0": float(X[y == 0, j].std()),
             "mean_1": float(X[y == 1, j].mean()), "std_1": float(X[y == 1, j].std()),
             "auc": auc(X[:, j], y), "coef": float(model.w[j])}
            for j, f in enumerate(model.FEATURES)]


def task_sets(labels: Path, task: str):
    """(photos, y) of one task: night (streets only) or outdoor (streets + rooms)."""
    df = pd.read_csv(labels)
    if task == "night":
        df = df[df.kind == "street"]
    photos = [read_photo(labels.parent / f) for f in df.file]
    return photos, df[task].to_numpy(), df["night"].to_numpy()


def evaluate(model, X, y) -> dict:
    p = model.predict_features(X)
    pred = (p >= 0.5).astype(int)
    return {"accuracy": float((pred == y).mean()), "confusion": confusion(pred, y), "n": int(len(y))}


def print_report(name: str, classes: tuple[str, str], res: dict) -> None:
    neg, pos = classes
    print(f"\n== {name}: {pos} vs {neg}, test set of {res['default']['n']} images "
          f"({res['n_positive']} {pos}) ==")
    for which in ("default", "fitted"):
        r = res[which]
        (tn, fp), (fn, tp) = r["confusion"]
        print(f"{which:8s} accuracy {r['accuracy']:.3f}   confusion (rows true, cols predicted {neg}/{pos}): "
              f"{neg} [{tn:4d} {fp:4d}]  {pos} [{fn:4d} {tp:4d}]")
    print(f"{'feature':18s} {neg + ' mean±std':>18s} {pos + ' mean±std':>18s} {'AUC':>6s} "
          f"{'default coef':>12s} {'fitted coef':>12s}")
    for s, f in zip(res["features"], res["fitted_conf"]["coef"].values()):
        print(f"{s['feature']:18s} {s['mean_0']:9.3f}±{s['std_0']:<8.3f} {s['mean_1']:9.3f}±{s['std_1']:<8.3f} "
              f"{s['auc']:6.3f} {s['coef']:12.3f} {f:12.3f}")
    print(f"{'bias':18s} {'':18s} {'':18s} {'':6s} {res['default_conf']['bias']:12.3f} "
          f"{res['fitted_conf']['bias']:12.3f}")
    for which, r in res.get("night_photos_only", {}).items():
        (tn, fp), (fn, tp) = r["confusion"]
        print(f"{which:8s} on night photos only ({r['n']}): accuracy {r['accuracy']:.3f}   "
              f"{neg} [{tn:4d} {fp:4d}]  {pos} [{fn:4d} {tp:4d}]")


def run(n: int, size, work: Path, seed: int, mobilenet: bool, epochs: int) -> dict:
    t0 = time.perf_counter()
    sets = {}
    for role, s in (("fit", seed + 1000), ("test", seed)):
        sets[role] = make_labelled_images(work / role, n_day=n, n_night=n, n_rooms=n, size=size, seed=s)
    out = {"n_per_class": n, "image_size": list(size), "seed": seed}
    for task, model_name, classes in (("night", "daynight_stats", ("day", "night")),
                                      ("outdoor", "outdoor_stats", ("indoor", "outdoor"))):
        fit_photos, fit_y, _ = task_sets(sets["fit"], task)
        test_photos, test_y, test_night = task_sets(sets["test"], task)
        default = build_classifier({"name": model_name})
        fitted_conf = fit_stats(model_name, fit_photos, fit_y)
        fitted = build_classifier(fitted_conf)
        X = default.feature_matrix(test_photos)
        res = {"default": evaluate(default, X, test_y), "fitted": evaluate(fitted, X, test_y),
               "n_positive": int(test_y.sum()), "features": feature_stats(default, X, test_y),
               "default_conf": default.conf, "fitted_conf": fitted_conf}
        if task == "outdoor":  # the filter keeps outdoor & night: the outdoor decision matters on night photos
            sub = test_night == 1
            res["night_photos_only"] = {w: evaluate(m, X[sub], test_y[sub])
                                        for w, m in (("default", default), ("fitted", fitted))}
        if mobilenet:
            df = pd.read_csv(sets["fit"])
            if task == "night":
                df = df[df.kind == "street"]
            csv = work / f"fit_{task}.csv"
            pd.DataFrame({"file": "fit/" + df.file, "label": np.where(df[task] == 1, classes[1], classes[0])}
                         ).to_csv(csv, index=False)
            t1 = time.perf_counter()
            info = train(csv, work / f"{task}.pt", epochs=epochs, lr=2e-3, batch_size=32, device="auto",
                         seed=seed, image_size=64, width_mult=0.5)
            clf = MobileNetClassifier({"name": "mobilenet", "checkpoint": str(work / f"{task}.pt"),
                                       "positive": task})
            pred = (clf.predict(test_photos) >= 0.5).astype(int)
            res["mobilenet"] = {"accuracy": float((pred == test_y).mean()), "confusion": confusion(pred, test_y),
                                "train_seconds": round(time.perf_counter() - t1, 1), "epochs": epochs,
                                "history": info["history"]}
        print_report(model_name, classes, res)
        if mobilenet:
            m = res["mobilenet"]
            print(f"mobilenet (64 px, width 0.5, {epochs} epochs, trained on the fit set in "
                  f"{m['train_seconds']} s): accuracy {m['accuracy']:.3f}, confusion {m['confusion']}")
        out[task] = res
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{out['seconds']} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="images per class and set (day, night, rooms)")
    p.add_argument("--size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for the generated images (default: a temporary one)")
    p.add_argument("--mobilenet", action="store_true", help="also train and test the CNN baseline")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--json", type=Path, help="write the numbers here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        out = run(a.n, tuple(a.size), work, a.seed, a.mobilenet, a.epochs)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
