"""Reference for pipeline/uncertainty.py: SUE and AUC-PR as the SUE authors compute them.

Runs upstream's own code on seeded random inputs, outside this repository:
- SUE: the block between "SUE starts" and "SUE ends" of MubarizZaffar/SUE ``sue.py``, executed
  as it is (its inputs: ``preds`` [Q, 10] indices into ``ref_poses`` [N, 2] UTM metres, ``dists``
  [Q, 10] descriptor L2 distances);
- AUC-PR: ``sklearn.metrics.precision_recall_curve`` then ``auc`` (as sue.py does), for several
  confidences, ties included.

    python tests/reference/make_uncertainty_reference.py --sue /tmp/sue_ref/sue.py \\
        --commit <SUE commit> --out tests/fixtures/uncertainty_reference.npz
"""

import argparse
import math

import numpy as np
import sklearn
from sklearn.metrics import auc, precision_recall_curve
from tqdm import tqdm


def upstream_sue(source: str, preds, dists, ref_poses):
    block = source[source.index("############# SUE starts"):source.index("############# SUE ends")]
    scope = {"np": np, "math": math, "tqdm": tqdm, "preds": preds, "dists": dists, "ref_poses": ref_poses,
             "total_queries": len(preds)}
    exec(block, scope)  # upstream's code, unchanged
    return -scope["sue_scores"]  # it ends with confidences (minus the variance): the variance


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sue", required=True, help="upstream sue.py")
    p.add_argument("--commit", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    n_ref, n_q, nn = 300, 60, 10
    # database poses: a 3 km x 3 km area of San Francisco (UTM 10S), so some spreads pass 500 m
    ref_poses = np.c_[rng.uniform(548000, 551000, n_ref), rng.uniform(4178000, 4181000, n_ref)]
    preds = np.stack([rng.choice(n_ref, nn, replace=False) for _ in range(n_q)])
    # distances close together (slope 350 gives several neighbours weight), ascending
    dists = np.sort(rng.uniform(0.0, 0.02, (n_q, nn)) + rng.uniform(0.5, 1.0, (n_q, 1)), 1)
    sue = upstream_sue(open(a.sue).read(), preds, dists, ref_poses)
    right = rng.random(n_q) < 0.6
    confidences = np.stack([rng.random(n_q), np.round(rng.random(n_q), 1), right + rng.normal(0, 0.7, n_q)])
    aucs = []
    for c in confidences:
        prec, rec, _ = precision_recall_curve(right, c)
        aucs.append(auc(rec, prec))
    np.savez(a.out, ref_poses=ref_poses, preds=preds, dists=dists, sue=sue, right=right, confidences=confidences,
             auc_pr=np.array(aucs), commit=a.commit, sklearn_version=sklearn.__version__)
    print("wrote", a.out, "sklearn", sklearn.__version__, "AUC-PR", np.round(aucs, 4))


if __name__ == "__main__":
    main()
