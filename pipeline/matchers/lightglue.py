"""LightGlue (kornia's implementation) loading the upstream LightGlue release files.

Blocks of pairs run as one padded batch (:meth:`LightGlue._forward_block`) through
kornia's own layers, with what kornia does for one pair kept per pair: each pair stops
at the layer where its own points are confident enough (``depth_confidence``), and
points that kornia prunes (``width_confidence``) are masked out of that pair's attention
and assignment instead of being removed, so each pair gets the matches it gets on its
own (kornia itself runs a batch that prunes one pair at a time, and stops a batch only
when every pair would stop).
"""

from __future__ import annotations

import logging

import torch

from ..local_features.base import weights_file
from .base import Matcher, pad_features

logger = logging.getLogger(__name__)


def _rename_upstream(state: dict, n_layers: int) -> dict:
    """Upstream key names -> kornia's (what kornia's own loader does after downloading)."""
    state = {k[len("matcher."):] if k.startswith("matcher.") else k: v for k, v in state.items()}
    for i in range(n_layers):
        for old, new in ((f"self_attn.{i}.", f"transformers.{i}.self_attn."), (f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")):
            state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    return state


class LightGlue(Matcher):
    default_conf = {
        "features": "disk",  # disk | aliked | superpoint | sift | xfeat (the LighterGlue variant)
        "weights": None,
        "filter_threshold": None,  # None: the features' default (0.1)
        "depth_confidence": None,  # None: the features' default; -1 disables early stopping
        "width_confidence": None,  # None: the features' default; -1 disables point pruning
    }

    def __init__(self, conf=None):
        super().__init__(conf)
        import kornia.feature as KF

        c = self.conf
        if c["features"] not in KF.LightGlue.features:
            raise ValueError(f"LightGlue: unknown features {c['features']!r}; known {sorted(KF.LightGlue.features)}")
        opts = {**KF.LightGlue.features[c["features"]]}
        for key in ("filter_threshold", "depth_confidence", "width_confidence"):
            if c[key] is not None:
                opts[key] = c[key]
        opts["weights"] = None
        # features=None: kornia builds the network without downloading anything
        self.net = KF.LightGlue(features=None, **opts)
        path = weights_file(c["weights"], f"LightGlue ({c['features']})")
        state = _rename_upstream(torch.load(path, map_location="cpu", weights_only=True), self.net.conf.n_layers)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        params = dict(self.net.named_parameters())
        bad = [k for k in missing if k in params]
        if bad:
            raise ValueError(f"{path}: not a LightGlue checkpoint for {c['features']} (missing weights {bad[:5]})")
        if unexpected:  # the release files carry unused entries (log_assignment.*.r); kornia ignores them too
            logger.debug("%s: ignored %d unused entries, e.g. %s", path, len(unexpected), unexpected[:3])
        self.eval()

    def _forward(self, f0, f1):
        def side(f):
            return {
                "keypoints": f["keypoints"].float()[None],
                "descriptors": f["descriptors"].float()[None],
                "image_size": torch.as_tensor(f["image_size"], dtype=torch.float32).reshape(1, 2),
            }

        out = self.net({"image0": side(f0), "image1": side(f1)})
        return {"matches": out["matches"][0], "scores": out["scores"][0]}

    def pair_bytes(self, n0, n1):
        # attention: heads x n0 x n1 similarities, their softmaxes (both ways) and masks
        return 4 * self.net.conf.num_heads * (n0 * n1 * 4) + 48 * (n0 + n1) * self.net.conf.descriptor_dim

    def _forward_block(self, pairs):
        from kornia.feature.lightglue import filter_matches, normalize_keypoints

        net = self.net
        conf = net.conf
        if conf.add_scale_ori or conf.add_laf:
            return [self._forward(p0, p1) for p0, p1 in pairs]
        f0, a0, n0 = pad_features([p[0] for p in pairs], ("keypoints", "descriptors"))
        f1, a1, n1 = pad_features([p[1] for p in pairs], ("keypoints", "descriptors"))
        dev = f0["keypoints"].device
        size0 = torch.stack([torch.as_tensor(p[0]["image_size"]).reshape(2) for p in pairs]).to(dev, torch.float32)
        size1 = torch.stack([torch.as_tensor(p[1]["image_size"]).reshape(2) for p in pairs]).to(dev, torch.float32)
        k0 = normalize_keypoints(f0["keypoints"], size0).masked_fill(~a0[..., None], 0)
        k1 = normalize_keypoints(f1["keypoints"], size1).masked_fill(~a1[..., None], 0)
        if not (k0.abs() <= 1).all() or not (k1.abs() <= 1).all():
            raise ValueError("LightGlue: keypoints outside their image (image_size is (width, height) of the "
                             "image the keypoints were found on)")
        desc0, desc1 = net.input_proj(f0["descriptors"]), net.input_proj(f1["descriptors"])
        pe_dtype = net.posenc.Wr.weight.dtype
        enc0, enc1 = net.posenc(k0.to(pe_dtype)), net.posenc(k1.to(pe_dtype))
        total = (n0 + n1).to(dev)
        early, prune = conf.depth_confidence > 0, conf.width_confidence > 0
        prune_th = net.pruning_min_kpts(dev)
        rows = torch.arange(len(pairs), device=dev)  # which pairs are still running
        # original keypoint index of each column (columns are compacted as points are pruned)
        ind0 = torch.arange(desc0.shape[1], device=dev)[None].expand(len(pairs), -1)
        ind1 = torch.arange(desc1.shape[1], device=dev)[None].expand(len(pairs), -1)
        out: list[dict | None] = [None] * len(pairs)

        def finish(sel, layer):
            """The assignment of the pairs ``sel`` (positions in the running batch) after ``layer``."""
            d0, d1, v0, v1 = desc0[sel], desc1[sel], a0[sel], a1[sel]
            la = net.log_assignment[layer]
            m0, m1 = la.final_proj(d0), la.final_proj(d1)
            d = m0.shape[-1]
            sim = torch.einsum("bmd,bnd->bmn", m0 / d**0.25, m1 / d**0.25)
            both = v0[:, :, None] & v1[:, None, :]
            sim = sim.masked_fill(~both, float("-inf"))
            z0, z1 = la.matchability(d0), la.matchability(d1)
            s0 = torch.log_softmax(sim, 2)
            s1 = torch.log_softmax(sim.transpose(-1, -2).contiguous(), 2).transpose(-1, -2)
            cert = torch.nn.functional.logsigmoid(z0) + torch.nn.functional.logsigmoid(z1).transpose(1, 2)
            scores = sim.new_full((len(sel), sim.shape[1] + 1, sim.shape[2] + 1), float("-inf"))
            scores[:, :-1, :-1] = (s0 + s1 + cert).masked_fill(~both, float("-inf"))
            idx0, _, ms0, _ = filter_matches(scores, conf.filter_threshold)
            for j, b in enumerate(rows[sel].tolist()):
                i0 = torch.where((idx0[j] > -1) & v0[j])[0]
                matches = torch.stack([ind0[sel[j]][i0], ind1[sel[j]][idx0[j][i0]]], -1)
                out[b] = {"matches": matches, "scores": ms0[j][i0]}

        def compact(alive, desc, enc, ind):
            """Drop the columns no pair needs: each pair's alive points first, in their order."""
            width = int(alive.sum(1).max())
            if width == alive.shape[1]:
                return alive, desc, enc, ind
            order = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :width]
            desc = desc.gather(1, order[..., None].expand(-1, -1, desc.shape[-1]))
            enc = enc.gather(3, order[None, :, None, :, None].expand(enc.shape[0], -1, enc.shape[2], -1, enc.shape[-1]))
            return alive.gather(1, order), desc, enc, ind.gather(1, order)

        for i in range(conf.n_layers):
            layer = net.transformers[i]
            if bool(a0.all()) and bool(a1.all()):  # nothing padded (e.g. one pair): kornia's own path
                desc0, desc1 = layer(desc0, desc1, enc0, enc1)
            else:
                # self-attention masks only the keys (padded rows attend to real points and are never read)
                desc0 = layer.self_attn(desc0, enc0, a0[:, None, None, :])
                desc1 = layer.self_attn(desc1, enc1, a1[:, None, None, :])
                desc0, desc1 = layer.cross_attn(desc0, desc1, (a0[:, :, None] & a1[:, None, :])[:, None])
            if i == conf.n_layers - 1:
                break
            token0 = token1 = None
            if early:
                token0, token1 = net.token_confidence[i](desc0, desc1)
                th = net.confidence_thresholds[i]
                unconfident = ((token0 < th) & a0).sum(1) + ((token1 < th) & a1).sum(1)
                stop = (1.0 - unconfident.float() / total[rows]) > conf.depth_confidence
                if stop.any():
                    finish(torch.where(stop)[0], i)
                    go = torch.where(~stop)[0]
                    if not len(go):
                        return out
                    rows, desc0, desc1, a0, a1 = rows[go], desc0[go], desc1[go], a0[go], a1[go]
                    ind0, ind1 = ind0[go], ind1[go]
                    enc0, enc1 = enc0[:, go], enc1[:, go]  # [2, B, 1, N, D]
                    token0, token1 = token0[go], token1[go]
            if prune:
                for side in (0, 1):
                    alive = a0 if side == 0 else a1
                    desc = desc0 if side == 0 else desc1
                    token = token0 if side == 0 else token1
                    # a side is pruned while it has more points than the device's threshold (CPU: always)
                    active = alive.sum(1) > prune_th
                    if active.any():
                        matchable = net.log_assignment[i].get_matchability(desc)
                        keep = net.get_pruning_mask(token, matchable, i)
                        alive = alive & (keep | ~active[:, None])
                        if side == 0:
                            a0, desc0, enc0, ind0 = compact(alive, desc0, enc0, ind0)
                        else:
                            a1, desc1, enc1, ind1 = compact(alive, desc1, enc1, ind1)
        finish(torch.arange(len(rows), device=dev), conf.n_layers - 1)
        return out
