"""Filter stage of the night query set: photos, statistics baselines, mobilenet, the stage itself."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.images import ImageReadError
from pipeline.nightset import classify as C
from pipeline.nightset import mobilenet as M
from pipeline.nightset import photos as P
from pipeline.nightset import stats_models as S

from .nightset_images import make_labelled_images

# Accuracies measured on the set below (40 day + 40 night street views, 40 rooms at
# 160x120, seed 0): day/night default 0.912, fitted (held-out half) 0.975;
# outdoor/indoor default 0.917, fitted 0.983. Asserted with a margin.
MIN_NIGHT_DEFAULT, MIN_NIGHT_FITTED = 0.85, 0.90
MIN_OUTDOOR_DEFAULT, MIN_OUTDOOR_FITTED = 0.85, 0.90


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labelled")
    csv = make_labelled_images(folder, n_day=40, n_night=40, n_rooms=40, size=(160, 120), seed=0)
    df = pd.read_csv(csv)
    photos = [P.read_photo(folder / f) for f in df.file]
    return folder, df, photos


def _task(labelled, task):
    _, df, photos = labelled
    sel = (df.kind == "street").to_numpy() if task == "night" else np.ones(len(df), bool)
    return [p for p, s in zip(photos, sel) if s], df[task].to_numpy()[sel]


def _accuracy(model, photos, y):
    return float(((model.predict(photos) >= 0.5) == (y == 1)).mean())


# --------------------------------------------------------------------------- helpers


def test_parse_hour():
    assert P.parse_hour("2023:11:21 22:15:00") == pytest.approx(22.25)
    assert P.parse_hour("2023-11-21 06:30:00") == pytest.approx(6.5)
    assert P.parse_hour("2023-11-21T23:00") == pytest.approx(23.0)
    assert P.parse_hour("") is None and P.parse_hour(None) is None and P.parse_hour("garbage") is None


def test_exif_hour_feeds_the_night_feature(tmp_path):
    img = Image.fromarray(np.full((40, 60, 3), 120, np.uint8))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2023:11:21 23:30:00"
    img.save(tmp_path / "a.jpg", exif=exif)
    img.save(tmp_path / "b.jpg")
    a, b = P.read_photo(tmp_path / "a.jpg"), P.read_photo(tmp_path / "b.jpg")
    assert a.exif_hour == pytest.approx(23.5) and b.exif_hour is None
    j = list(S.DAYNIGHT_FEATURES).index("hour_night")
    assert S.daynight_features(a)[j] == pytest.approx(math.cos(2 * math.pi * 23.5 / 24))
    assert S.daynight_features(b)[j] == 0.0
    model = C.build_classifier("daynight_stats")
    assert model.predict([a])[0] > model.predict([b])[0]  # a night hour raises p(night)
    # datetaken is only used when asked for
    c = P.Photo(b.image, None, 23.5)
    assert S.daynight_features(c)[j] == 0.0
    assert S.daynight_features(c, ("exif", "datetaken"))[j] > 0.9


def test_read_photo_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        P.read_photo(bad)
    with pytest.raises(ImageReadError, match="missing.jpg"):
        P.read_photo(tmp_path / "missing.jpg")


def test_fit_logistic_recovers_coefficients():
    rng = np.random.default_rng(0)
    X = np.c_[rng.normal(0.5, 0.2, 4000), rng.normal(0, 1, 4000), np.full(4000, 3.0)]
    p = 1 / (1 + np.exp(-(1.0 - 6.0 * X[:, 0] + 1.5 * X[:, 1])))
    y = (rng.random(4000) < p).astype(int)
    coef, bias = S.fit_logistic(X, y, l2=0.01)
    assert coef[0] == pytest.approx(-6.0, abs=0.6)
    assert coef[1] == pytest.approx(1.5, abs=0.2)
    assert coef[2] == 0.0  # constant feature
    assert bias == pytest.approx(1.0, abs=0.4)
    with pytest.raises(ValueError, match="both classes"):
        S.fit_logistic(X, np.zeros(4000))


def test_separable_data_does_not_diverge():
    X = np.r_[np.zeros((20, 1)), np.ones((20, 1))]
    y = np.r_[np.zeros(20), np.ones(20)]
    coef, bias = S.fit_logistic(X, y, l2=1.0)
    assert np.isfinite(coef).all() and coef[0] > 0 and np.isfinite(bias)


def test_stats_conf_errors():
    with pytest.raises(ValueError, match="unknown feature"):
        C.build_classifier({"name": "daynight_stats", "coef": {"moon_phase": 1.0}})
    with pytest.raises(ValueError, match="outdoor_stats: unknown option 'treshold'"):
        C.build_classifier({"name": "outdoor_stats", "treshold": 0.3})
    with pytest.raises(ValueError, match="unknown nightset classifier"):
        C.build_classifier({"name": "resnet"})
    with pytest.raises(ValueError, match="neither a named conf"):
        C.build_classifier("no_such_model")


def test_stats_conf_merging():
    """``coef`` replaces the default weights as a whole; a probability threshold of 0 is valid."""
    m = C.build_classifier({"name": "daynight_stats", "coef": {"luma_mean": -5.0}, "threshold": 0.0})
    assert m.w.tolist() == [-5.0, 0, 0, 0, 0, 0] and m.b == 3.0 and m.conf["threshold"] == 0.0
    assert m.conf["hour_sources"] == ["exif"] and m.label == "daynight_stats(fitted)"
    assert C.build_classifier("daynight_stats").conf["coef"]["luma_mean"] == -10.0  # defaults untouched
    with pytest.raises(ValueError, match="coef must be a dict"):
        C.build_classifier({"name": "daynight_stats", "coef": [1.0]})
    with pytest.raises(ValueError, match="mobilenet: unknown option 'batchsize'"):
        C.build_classifier({"name": "mobilenet", "checkpoint": "x.pt", "batchsize": 8})
    with pytest.raises(ValueError, match="'mobilenet' is not a statistics model"):
        S.fit_stats("mobilenet", [], [])


# --------------------------------------------------------------------------- accuracy


def test_daynight_stats_accuracy(labelled):
    photos, y = _task(labelled, "night")
    assert y.sum() == 40 and len(y) == 80
    acc = _accuracy(C.build_classifier("daynight_stats"), photos, y)
    train = np.arange(len(y)) % 2 == 0
    conf = S.fit_stats("daynight_stats", [p for p, t in zip(photos, train) if t], y[train])
    fitted = C.build_classifier(conf)
    acc_fit = _accuracy(fitted, [p for p, t in zip(photos, train) if not t], y[~train])
    print(f"day/night accuracy: default {acc:.3f}, fitted (held-out half) {acc_fit:.3f}")
    assert acc >= MIN_NIGHT_DEFAULT
    assert acc_fit >= MIN_NIGHT_FITTED
    assert fitted.label == "daynight_stats(fitted)"
    # darkness is what tells night: the fit agrees with the signs of the defaults
    assert conf["coef"]["dark_frac"] > 0 and conf["coef"]["luma_mean"] < 0


def test_outdoor_stats_accuracy(labelled):
    photos, y = _task(labelled, "outdoor")
    assert (y == 0).sum() == 40 and (y == 1).sum() == 80
    acc = _accuracy(C.build_classifier("outdoor_stats"), photos, y)
    train = np.arange(len(y)) % 2 == 0
    conf = S.fit_stats("outdoor_stats", [p for p, t in zip(photos, train) if t], y[train])
    acc_fit = _accuracy(C.build_classifier(conf), [p for p, t in zip(photos, train) if not t], y[~train])
    print(f"outdoor/indoor accuracy: default {acc:.3f}, fitted (held-out half) {acc_fit:.3f}")
    assert acc >= MIN_OUTDOOR_DEFAULT
    assert acc_fit >= MIN_OUTDOOR_FITTED


def test_fit_stats_csv_and_cli(labelled, tmp_path):
    folder, df, _ = labelled
    streets = df[df.kind == "street"]
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"file": [str(folder / f) for f in streets.file],
                  "label": np.where(streets.night == 1, "night", "day")}).to_csv(csv, index=False)
    out = tmp_path / "night.json"
    assert C.main(["-q", "fit", "--model", "daynight_stats", "--csv", str(csv), "--out", str(out)]) == 0
    conf = json.loads(out.read_text())
    assert conf["name"] == "daynight_stats" and conf["fit"]["classes"] == ["day", "night"]
    assert conf["fit"]["train_accuracy"] >= MIN_NIGHT_FITTED
    model = C.build_classifier(str(out))  # a conf file works wherever a conf does
    assert model.label == "daynight_stats(fitted)"
    # fitting a subset of the features
    assert C.main(["-q", "fit", "--model", "daynight_stats", "--csv", str(csv), "--out", str(out),
                   "--features", "luma_mean", "dark_frac"]) == 0
    conf = json.loads(out.read_text())
    assert conf["coef"]["light_frac"] == 0 and conf["coef"]["dark_frac"] > 0
    assert conf["fit"]["features"] == ["luma_mean", "dark_frac"]
    with pytest.raises(ValueError, match="unknown or no features"):
        S.fit_stats("daynight_stats", [], [], features=["moon"])


def test_read_labels(tmp_path):
    def write(labels):
        csv = tmp_path / "l.csv"
        pd.DataFrame({"file": [f"{i}.jpg" for i in range(len(labels))], "label": labels}).to_csv(csv, index=False)
        return csv

    paths, y, classes = P.read_labels(write(["night", "day", "night"]))
    assert classes == ["day", "night"] and y.tolist() == [1, 0, 1] and paths[0] == tmp_path / "0.jpg"
    assert P.read_labels(write([0, 1, 1]))[2] == ["0", "1"]
    assert P.read_labels(write(["cat", "dog"]), positive="cat")[1].tolist() == [1, 0]
    with pytest.raises(ValueError, match="say which one is positive"):
        P.read_labels(write(["cat", "dog"]))
    with pytest.raises(ValueError, match="exactly two"):
        P.read_labels(write(["night", "night"]))
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['file'\]"):
        P.read_labels(bad)


# --------------------------------------------------------------------------- the stage


def _collected(tmp_path, labelled, n=12):
    """A collected folder: photos.csv + images (night/day streets, rooms), one corrupt, one missing."""
    folder, df, _ = labelled
    pick = pd.concat([df[(df.kind == "street") & (df.night == 1)].head(n // 3),
                      df[(df.kind == "street") & (df.night == 0)].head(n // 3),
                      df[df.kind == "room"].head(n // 3)])
    col = tmp_path / "build" / "collected"
    (col / "images").mkdir(parents=True)
    rows = []
    for k, r in enumerate(pick.itertuples()):
        pid = f"{1000 + k}"
        shutil.copy(folder / r.file, col / "images" / f"{pid}.jpg")
        rows.append({"photo_id": pid, "file": f"images/{pid}.jpg", "lat": 37.77 + k * 1e-4, "lon": -122.42,
                     "accuracy": 16, "datetaken": "2023-11-21 22:15:00", "owner": "o1", "title": "t",
                     "url": "http://x", "license": "4", "truth_keep": bool(r.night and r.outdoor)})
    (col / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows.append({**rows[0], "photo_id": "corrupt", "file": "images/corrupt.jpg", "truth_keep": False})
    rows.append({**rows[0], "photo_id": "gone", "file": "images/gone.jpg", "truth_keep": False})
    table = pd.DataFrame(rows)
    table.drop(columns="truth_keep").to_csv(col / "photos.csv", index=False)
    return col, table


def test_classify_stage(tmp_path, labelled):
    col, table = _collected(tmp_path, labelled)
    out = tmp_path / "build" / "filtered.csv"
    summary = C.classify(col, out)
    f = pd.read_csv(out, dtype={"photo_id": str, "reason": str})
    f["reason"] = f.reason.fillna("")
    assert list(f.columns[:9]) == ["photo_id", "file", "outdoor_prob", "is_outdoor", "night_prob", "is_night",
                                   "keep", "outdoor_model", "night_model"]
    assert f.photo_id.tolist() == table.photo_id.tolist()
    assert f.file.tolist() == table.file.tolist()
    assert (f.keep == (f.is_outdoor & f.is_night)).all()
    assert set(f.outdoor_model) == {"outdoor_stats"} and set(f.night_model) == {"daynight_stats"}
    bad = f.set_index("photo_id").loc[["corrupt", "gone"]]
    assert not bad.keep.any() and bad.reason.str.startswith("unreadable:").all()
    assert bad.reason.str.contains("corrupt.jpg").iloc[0] and bad.reason.str.contains("gone.jpg").iloc[1]
    ok = f[f.reason == ""]
    assert len(ok) == 12 and ok.night_prob.between(0, 1).all()
    # (accuracy is measured above; here: day photos never pass, night ones score higher)
    truth = table.iloc[:12].assign(night_prob=ok.night_prob.to_numpy(), keep=ok.keep.to_numpy())
    day_streets = truth.iloc[4:8]  # rows 0-3: night streets, 4-7: day streets, 8-11: rooms
    assert not day_streets.keep.any()
    assert truth.night_prob[:4].mean() > day_streets.night_prob.mean() + 0.3
    assert summary["photos"] == 14 and summary["unreadable"] == 2 and summary["kept"] == f.keep.sum()
    # a stage without the outdoor test, thresholds and audit features; the photos.csv path works too
    out2 = tmp_path / "f2.csv"
    s2 = C.classify(col / "photos.csv", out2, outdoor_conf=None, night_threshold=0.99, features=True)
    f2 = pd.read_csv(out2, dtype={"photo_id": str})
    assert set(f2.outdoor_model) == {"none"} and f2.is_outdoor.sum() == 12
    assert s2["night_threshold"] == 0.99 and f2.is_night.sum() <= f.is_night.sum()
    assert "night.luma_mean" in f2.columns and "outdoor.edge_density" not in f2.columns


def test_classify_bad_table(tmp_path):
    csv = tmp_path / "photos.csv"
    csv.write_text("id,file\n1,a.jpg\n")
    with pytest.raises(ValueError, match=r"photos.csv: missing column\(s\) \['photo_id'\]"):
        C.classify(csv, tmp_path / "out.csv")
    csv.write_text("photo_id,file\n1,a.jpg\n1,b.jpg\n")
    with pytest.raises(ValueError, match="duplicate photo_id"):
        C.classify(csv, tmp_path / "out.csv")
    with pytest.raises(FileNotFoundError, match="photos table not found"):
        C.classify(tmp_path / "nowhere", tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


# --------------------------------------------------------------------------- mobilenet


@pytest.fixture(scope="module")
def tiny_night_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    lab = make_labelled_images(folder, n_day=20, n_night=20, n_rooms=0, size=(64, 48), seed=3)
    df = pd.read_csv(lab)
    csv = folder / "night.csv"
    pd.DataFrame({"file": df.file, "label": np.where(df.night == 1, "night", "day")}).to_csv(csv, index=False)
    return csv


@pytest.fixture(scope="module")
def trained(tiny_night_csv, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt") / "night.pt"
    torch.set_num_threads(2)
    info = M.train(tiny_night_csv, ckpt, epochs=2, lr=1e-3, batch_size=8, device="cpu", seed=0, image_size=64)
    return ckpt, info


def test_mobilenet_trains(trained):
    ckpt, info = trained
    h = info["history"]
    assert len(h) == 2 and info["n_train"] + info["n_val"] == 40 and info["n_val"] == 8
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert info["classes"] == ["day", "night"]
    assert ckpt.exists() and not list(ckpt.parent.glob(".*tmp*"))


def test_mobilenet_predicts_and_runs_in_the_stage(trained, tiny_night_csv, tmp_path):
    ckpt, _ = trained
    clf = C.build_classifier({"name": "mobilenet", "checkpoint": str(ckpt), "device": "cpu"})
    paths, _, _ = P.read_labels(tiny_night_csv)
    p = clf.predict([P.read_photo(q) for q in paths])
    assert p.shape == (40,) and np.all((p >= 0) & (p <= 1))
    assert clf.label == "mobilenet:night.pt"
    # in the stage, as the night model
    col = tmp_path / "collected"
    col.mkdir()
    pd.DataFrame({"photo_id": [str(i) for i in range(5)], "file": [str(q) for q in paths[:5]],
                  "lat": 37.7, "lon": -122.4}).to_csv(col / "photos.csv", index=False)
    C.classify(col, tmp_path / "filtered.csv", outdoor_conf=None,
               night_conf={"name": "mobilenet", "checkpoint": str(ckpt), "device": "cpu"})
    f = pd.read_csv(tmp_path / "filtered.csv")
    assert set(f.night_model) == {"mobilenet:night.pt"} and f.night_prob.between(0, 1).all()


def test_mobilenet_refuses_wrong_checkpoints(trained, tmp_path):
    ckpt, _ = trained
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        M.load_checkpoint(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: cannot be read"):
        M.load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save(M.build_mobilenet().state_dict(), plain)
    with pytest.raises(ValueError, match="plain.pt: not a pipeline.nightset.mobilenet checkpoint"):
        M.load_checkpoint(plain)
    good = torch.load(ckpt, weights_only=True)
    shapes = tmp_path / "shapes.pt"
    torch.save({**good, "conf": {**good["conf"], "width_mult": 0.5}}, shapes)
    with pytest.raises(ValueError, match="shapes.pt: weights do not fit"):
        M.load_checkpoint(shapes)
    version = tmp_path / "v9.pt"
    torch.save({**good, "version": 9}, version)
    with pytest.raises(ValueError, match="format version 9"):
        M.load_checkpoint(version)
    # a night checkpoint is refused as the outdoor model
    with pytest.raises(ValueError, match="positive class is 'night'.*wrong checkpoint"):
        C.build_classifier({"name": "mobilenet", "checkpoint": str(ckpt), "device": "cpu", "positive": "outdoor"})
    with pytest.raises(ValueError, match="needs 'checkpoint'"):
        C.build_classifier({"name": "mobilenet"})
