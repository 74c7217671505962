"""A small synthetic stand-in for bonedrr.dataset.ShardDataset (the same item dict), for model tests
that need no shards: a bright "femur" (shaft and head) and a "pelvis" blob over smooth soft tissue,
whose radiograph is a non-linear mix of the channels (or, with ``thickness``, a raw log image). Besides
the shards' default channels, ``channels`` may ask for ``proximal_femur_thickness`` (cm)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

CHANNELS = ["proximal_femur", "femur", "hip", "pelvis", "bone", "muscle", "soft_tissue"]


def _disc(rr, cc, r, c, radius):
    return np.clip(1 - np.sqrt((rr - r) ** 2 + (cc - c) ** 2) / radius, 0, None) ** 0.5


class SyntheticShards(Dataset):
    """``kvp``: each item's tube voltage (None: NaN, unknown); ``kvp_effect``: the bone's attenuation in
    the radiograph scales as (80 / kVp) ** kvp_effect, as a harder beam lowers bone contrast (0: none).
    ``thickness``: each item's soft-tissue thickness factor; given, the radiograph and its overview are
    raw log images on one detector scale (1000 per unit of attenuation) shifted by a random dose offset,
    whose soft tissue scales with the thickness: a per-image intensity span then divides the bone's
    contrast by the thickness, which the detector's own scale does not. ``open_beam`` (with ``thickness``):
    the raw images are referenced to the open beam instead (no dose offset: nothing attenuating is
    ``open_beam``), 0-2 % of each overview's field, at one edge, is air, and the overview is
    letterboxed: whether its body's 1st percentile is air or the thinnest tissue then depends on the
    field, not on the hip."""

    def __init__(self, n: int = 12, shape=(64, 32), seed: int = 0, channels=None, folds=None, kvp=None,
                 kvp_effect: float = 0.0, thickness=None, open_beam: float | None = None):
        self.shape = shape
        self.channels = list(channels or CHANNELS)
        rng = np.random.default_rng(seed)
        pelvis_density = np.random.default_rng([seed, 1]).uniform(0.6, 1.4, n)
        air = np.random.default_rng([seed, 2]).uniform(0.0, 0.02, n)  # a stream of its own: the others' draws stay
        self.items = []
        h, w = shape
        rr, cc = np.mgrid[0:h, 0:w].astype(float)
        ov_rr, ov_cc = np.mgrid[0:128, 0:256].astype(float)
        for i in range(n):
            density = rng.uniform(0.6, 1.4)
            hr, hc = h * rng.uniform(0.2, 0.3), w * rng.uniform(0.4, 0.6)
            head = _disc(rr, cc, hr, hc, 0.18 * h) * density
            shaft = (np.abs(cc - hc - (rr - hr) * 0.15) < 0.12 * w) * (rr > hr) * density * 0.8
            femur = np.maximum(head, shaft)
            proximal = femur * (rr < hr + 0.5 * h)
            pelvis = _disc(rr, cc, hr - 0.1 * h, hc - 0.45 * w, 0.3 * h) * 0.7
            if kvp_effect:  # no bone of known density in the image: the kVp cannot be read off the pelvis
                pelvis = pelvis * pelvis_density[i]
            t = 1.0 if thickness is None else float(thickness[i])
            muscle = (2.0 + np.sin(rr / h * math.pi) * 1.5) * t
            soft = (3.0 + 0.5 * cc / w) * t
            drr = {"proximal_femur": proximal, "femur": femur, "hip": pelvis, "pelvis": pelvis,
                   "bone": femur + pelvis, "muscle": muscle, "soft_tissue": soft,
                   "proximal_femur_thickness": 4.0 * proximal / density}  # cm: the shape, not the density
            kv = float(kvp[i]) if kvp is not None else math.nan
            bone_mu = 2.0 * (80.0 / kv) ** kvp_effect if kvp_effect else 2.0
            mu = bone_mu * (femur + pelvis) + 0.2 * muscle + 0.18 * soft
            if thickness is None:  # the draws in the order the tests' measured numbers were made with
                xray = 1000 * (1 - np.exp(-mu / 3)) + rng.normal(0, 5, (h, w))
                head_ov = (rng.uniform(40, 80), rng.uniform(60, 110))
                ov = 0.2 + _disc(ov_rr, ov_cc, *head_ov, 9) + 0.5 * _disc(ov_rr, ov_cc, head_ov[0] - 10, 128, 30)
            else:  # raw log: a dose offset, the body's soft tissue (thinner to the sides) and its bones
                head_ov = (rng.uniform(40, 80), rng.uniform(60, 110))
                dose = rng.uniform(200, 600)
                if open_beam is not None:
                    dose = open_beam
                xray = dose + 1000 * mu + rng.normal(0, 5, (h, w))
                body = t * (0.4 + 0.6 * np.sin(ov_cc / 256 * math.pi)) * 1.0
                ov = dose + 1000 * (body + 2.0 * density * _disc(ov_rr, ov_cc, *head_ov, 9)
                                    + 1.4 * _disc(ov_rr, ov_cc, head_ov[0] - 10, 128, 30))
                if open_beam is not None:
                    ov[:, : int(air[i] * 256)] = open_beam
                    ov[-12:] = 0  # the overview's letterbox, as a radiograph of another aspect ratio gets
            self.items.append({
                "xray": torch.tensor(xray, dtype=torch.float32)[None],
                "drr": torch.tensor(np.stack([drr[c] for c in self.channels]), dtype=torch.float32),
                "mask": torch.tensor(proximal > 0.05, dtype=torch.float32)[None],
                "overview": torch.tensor(ov, dtype=torch.float32)[None],
                "head_overview_px": torch.tensor(head_ov, dtype=torch.float32),
                "drr_bmd": float(proximal[proximal > 0.3].mean()), "qct_vbmd": 250.0 * density,
                "dxa_abmd": 0.8 * density + 0.05, "kvp": kv, "sample_id": f"syn_{i:03d}_right", "patient_id": f"syn{i // 2}",
                "fold": i % 3,
            })
        self.index = [{"sample_id": it["sample_id"], "patient_id": it["patient_id"], "fold": it["fold"]}
                      for it in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
