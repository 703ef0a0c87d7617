"""VLAD over local features: a training-free global descriptor that works on CPU.

Local descriptors (SIFT, ALIKED, DISK, ... from :mod:`pipeline.local_features`)
are assigned to their nearest word of a k-means codebook; the per-cluster residual sums
are intra-normalised, power-normalised, flattened, L2-normalised and projected by
PCA (with optional regularised whitening) to ``dim`` dimensions (Jegou & Chum,
ECCV 2012). The codebook and the PCA are fitted on database images as a pipeline
stage (:meth:`VLAD.fit`), so nothing here needs learned global weights.
"""

from __future__ import annotations

import contextlib

import logging

import faiss
import numpy as np
import torch
from tqdm import tqdm

from ..local_features import build_model as build_local
from .base import GlobalModel

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def one_thread():
    """FAISS's k-means and the PCA's SVD on one thread: their reductions (and so the codebook,
    the retrieval lists and the recalls) otherwise change with the number of threads."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


class VLAD(GlobalModel):
    default_conf = {
        "local": None,  # local feature conf, e.g. {"name": "aliked", "weights": ...}; default SIFT
        "n_clusters": 64,
        "dim": 512,  # PCA output dimension (at most the number of fitting images - 1); null: no PCA
        "whiten": True,
        "whiten_eps": 0.1,  # added to eigenvalues, as a fraction of their mean
        "power": 0.5,  # signed power normalisation exponent (1 disables it)
        "fit_images": 1000,  # database images sampled to fit the codebook and PCA
        "fit_max_descriptors": 200_000,
        "kmeans_iters": 25,
        "seed": 0,
    }
    needs_fit = True

    def __init__(self, conf=None):
        super().__init__(conf)
        local = self.conf["local"] or {"name": "sift"}
        self.local = build_local(local)
        self.register_buffer("centroids", torch.zeros(0))
        self.register_buffer("pca_mean", torch.zeros(0))
        self.register_buffer("pca_proj", torch.zeros(0))
        self.fitted = False

    @property
    def dim(self) -> int:
        if not self.fitted:
            raise RuntimeError("VLAD is not fitted yet: run the fit stage first")
        if self.pca_proj.numel():
            return self.pca_proj.shape[0]
        return self.centroids.numel()

    @classmethod
    def _descriptor_size(cls, conf: dict) -> int:
        if conf["dim"]:  # the PCA's output (fewer if it was fitted on fewer images)
            return int(conf["dim"])
        return int(conf["n_clusters"]) * build_local(conf["local"] or {"name": "sift"}).descriptor_dim

    # --- VLAD ---------------------------------------------------------------------
    def _raw_vlad(self, desc: torch.Tensor) -> torch.Tensor:
        """Un-projected, L2-normalised VLAD of one image's descriptors ``[N, D]``."""
        k, d = self.centroids.shape
        vlad = torch.zeros(k, d, dtype=torch.float32)
        if len(desc):
            assign = torch.cdist(desc, self.centroids).argmin(1)
            vlad.index_add_(0, assign, desc - self.centroids[assign])
        vlad = torch.nn.functional.normalize(vlad, dim=1)  # intra-normalisation
        vlad = vlad.flatten()
        p = self.conf["power"]
        if p != 1:
            vlad = vlad.sign() * vlad.abs().pow(p)
        return torch.nn.functional.normalize(vlad, dim=0)

    def _project(self, vlad: torch.Tensor) -> torch.Tensor:
        if self.pca_proj.numel():
            return (vlad - self.pca_mean) @ self.pca_proj.T
        return vlad

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("VLAD is not fitted yet: run the fit stage first")
        raws = torch.stack([self._raw_vlad(self.local(img)["descriptors"].cpu()) for img in images])
        return self._project(raws.to(self.pca_mean.device if self.pca_mean.numel() else raws.device))

    # --- fitting ------------------------------------------------------------------
    def fit(self, images) -> dict:
        """Fit the codebook and PCA on an iterable of images ``[3, H, W]``."""
        c = self.conf
        per_image = [self.local(img)["descriptors"].cpu().numpy() for img in tqdm(images, desc="fit: local features", mininterval=2)]
        per_image = [d for d in per_image if len(d)]
        if len(per_image) < 2:
            raise ValueError("VLAD fit: fewer than two images gave local features")
        all_desc = np.concatenate(per_image).astype(np.float32)
        rng = np.random.default_rng(c["seed"])
        if len(all_desc) > c["fit_max_descriptors"]:
            all_desc = all_desc[rng.choice(len(all_desc), c["fit_max_descriptors"], replace=False)]
        k = c["n_clusters"]
        if len(all_desc) < k:
            raise ValueError(f"VLAD fit: {len(all_desc)} descriptors are fewer than n_clusters={k}")
        logger.info("VLAD fit: k-means with %d clusters on %d descriptors", k, len(all_desc))
        with one_thread():  # the same codebook and PCA whatever the job's threads (a cluster job's, a laptop's)
            return self._fit_codebook_and_pca(all_desc, per_image)

    def _fit_codebook_and_pca(self, all_desc: np.ndarray, per_image: list[np.ndarray]) -> dict:
        c = self.conf
        km = faiss.Kmeans(all_desc.shape[1], c["n_clusters"], niter=c["kmeans_iters"], seed=c["seed"], verbose=False)
        km.train(all_desc)
        self.centroids = torch.from_numpy(km.centroids.copy())
        state = {"centroids": self.centroids, "pca_mean": torch.zeros(0), "pca_proj": torch.zeros(0)}
        if c["dim"]:
            raws = torch.stack([self._raw_vlad(torch.from_numpy(d)) for d in per_image]).double()
            dim = min(c["dim"], len(raws) - 1)
            if dim < c["dim"]:
                logger.warning("VLAD fit: only %d images, PCA keeps %d dimensions instead of %d", len(raws), dim, c["dim"])
            mean = raws.mean(0)
            _, s, vt = torch.linalg.svd(raws - mean, full_matrices=False)
            proj = vt[:dim]
            if c["whiten"]:
                eig = s[:dim] ** 2 / (len(raws) - 1)
                proj = proj / torch.sqrt(eig + c["whiten_eps"] * eig.mean())[:, None]
            state["pca_mean"] = mean.float()
            state["pca_proj"] = proj.float()
        self.load_fit(state)
        return state

    def load_fit(self, state: dict) -> None:
        for key in ("centroids", "pca_mean", "pca_proj"):
            if key not in state:
                raise ValueError(f"VLAD fit state lacks {key!r}; re-run the fit stage")
            setattr(self, key, state[key].float())
        d = self.local.descriptor_dim
        if self.centroids.ndim != 2 or self.centroids.shape != (self.conf["n_clusters"], d):
            raise ValueError(
                f"VLAD fit state has a codebook of shape {tuple(self.centroids.shape)}, "
                f"expected ({self.conf['n_clusters']}, {d}); re-run the fit stage"
            )
        self.fitted = True
