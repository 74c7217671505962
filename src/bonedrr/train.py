"""The ``train`` stage: the decomposition model, trained on shards, saved as a model folder.

The published recipe (Gu et al. 2023): hierarchical stages. Stage 1 maps the radiograph crop to the
bone DRRs of the pelvis and femur (here also the all-bone and muscle channels, as configured); stage 2
starts from stage 1's weights and learns the proximal-femur DRR, the channel BMD is read from; here a
stage 3 starts from stage 2's and learns the proximal femur's thickness, for the volumetric density
(:func:`bonedrr.bmd.drr_vbmd`; a stage of its own, so that it does not cost the density accuracy). Losses:
L1 + gradient correlation (+ an optional conditional PatchGAN term), weighted by the config. Paired
geometric augmentation (the same affine for the radiograph and its DRRs) and intensity augmentation of
the radiograph only (:mod:`bonedrr.model.augment`). A hip locator (:mod:`bonedrr.model.locator`) is
trained last, on the shards' overviews, for ``bonedrr estimate`` on whole radiographs.

A model folder (``results/models/<name>/``) holds:

- ``model.pt``: everything :func:`load_model` needs (weights, channels, crop geometry, settings,
  training folds, the optional DXA calibration); written last, so its presence means done;
- ``checkpoint.pt``: the state after the last finished epoch (weights, optimisers, schedule, log);
  a killed run started again resumes from it, and ends with the same weights as an uninterrupted run;
- ``train_log.tsv`` (one row per epoch) and ``curves.png`` (the training curves).

Every epoch draws its shuffling and augmentation from a generator seeded by (seed, phase, epoch), so
a seeded CPU run is reproducible and a resumed one draws what the uninterrupted one would have.
GPU when present (``device``), with bfloat16 autocast; CPU otherwise.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from bonedrr.bmd import BMD_CHANNEL, BMD_THRESHOLD_G_CM2, THICKNESS_CHANNEL, drr_bmd
from bonedrr.errors import BonedrrError, InputError
from bonedrr.images import atomic_path
from bonedrr.model import locator as loc
from bonedrr.model.augment import AugmentSettings, RandomAugment
from bonedrr.model.losses import bmd_loss, gan_loss, gc_loss, gradient_correlation, l1_loss
from bonedrr.model.network import PatchDiscriminator, UNet, detector_scale, overview_scale, tone_condition
from bonedrr.model.portable import (CONDITIONS, PORTABLE_FILE, CropGeometry, HipModel, condition_size, kvp_condition,
                                    torch_file_digest, write_portable)

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.tsv"
CURVES_FILE = "curves.png"
FORMAT_VERSION = 1
LOG_COLUMNS = ("phase", "epoch", "loss", "l1", "gc", "gan", "bmd", "val_l1", "val_gc", "val_bmd_mae", "seconds")


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Stage:
    """One stage of the hierarchy: the channels it predicts and how long it trains."""

    channels: tuple[str, ...]
    epochs: int


#: How a radiograph crop is scaled for the network (:attr:`TrainSettings.input_scale`).
INPUT_SCALES = ("overview", "crop", "detector")


@dataclass(frozen=True)
class TrainSettings:
    """The ``train:`` block of the config (documented in config/README.md).

    Args:
        stages: The hierarchy; each stage after the first starts from the previous one's weights.
        batch_size, lr, weight_decay: Optimiser (AdamW, cosine schedule per stage).
        l1, gc, gan, bmd: Loss weights (0 switches a term off; ``gan`` > 0 trains a PatchGAN beside;
            ``bmd``: the soft DRR-BMD of the predicted proximal femur against the true one's).
        base_channels, depth: The U-Net's size.
        augment: Augmentation strengths.
        locator_epochs, locator_base_channels: The hip locator (0 epochs: no locator).
        seed: Seeds weights, shuffling and augmentation.
        num_workers: DataLoader workers.
        input_scale: What maps the radiograph to the network's input scale: ``overview``, the whole
            radiograph's 1st and 50th percentiles (:func:`bonedrr.model.network.overview_scale`), or
            ``crop``, the crop's own 1st and 99th (divides out much of the bone's density; kept for
            models trained before), or ``detector``, for raw radiographs whose pixel values are the
            detector's log signal on one scale for the whole cohort ("for processing" images of one
            detector model): the whole radiograph's 1st percentile maps to 0 and ``input_span`` more
            to 1 (:func:`bonedrr.model.network.detector_scale`), so the input keeps the absolute
            attenuation, and the augmentation changes no tone curve or gain.
        input_span: With ``input_scale: detector``: the span of stored values the input maps to 1;
            None: the median over the training radiographs of their 1st-50th percentile span, fixed
            when training starts and kept in the model.
        open_beam: With ``input_scale: detector``: the detector's stored value where nothing
            attenuates, mapped to the input's 0 for every radiograph (the demo's raw images: 1000,
            :data:`bonedrr.demo.xray_physics.RAW_OPEN_BEAM`); for radiographs whose log scale is
            referenced to the open beam (nothing attenuating reads the same at any dose). None: each
            radiograph's body's 1st percentile, which follows a dose change but moves with the pose and
            with whether air is in the field (docs/validation.md, "Raw radiographs"). With it the augmentation
            shifts no offset either: on this scale an offset is density.
        dxa_calibration: Fit a linear map from predicted DRR-BMD to DXA aBMD on the training samples.
        amp: bfloat16 autocast on a GPU.
        condition: ``none``; ``kvp``: condition the U-Nets on each radiograph's tube voltage (the
            shards' ``kvp``, from DICOM KVP; every training sample must have it, and so must every
            radiograph the model reads); ``tone``: on quantiles of the whole radiograph and of the crop
            (:func:`bonedrr.model.network.tone_condition`; needs ``input_scale`` ``overview`` or
            ``detector``); or ``kvp+tone``.
        equivariant: Multiply each U-Net's output by the crop's mean level in the input's units
            (:class:`bonedrr.model.network.UNet`), so that it follows the input's scale; for
            ``input_scale: detector``.
        ema: Decay of an exponential moving average of each stage's weights, updated every step; the
            model keeps the averages (0: the last step's weights). 0.99 averages about the last 100 steps;
            the decay ramps up as (1 + step) / (10 + step) over a stage's first steps.
    """

    stages: tuple[Stage, ...] = (Stage(("pelvis", "femur", "bone", "muscle"), 30),
                                 Stage(("proximal_femur",), 30), Stage(("proximal_femur_thickness",), 30))
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    l1: float = 1.0
    gc: float = 0.5
    gan: float = 0.0
    bmd: float = 0.0
    base_channels: int = 16
    depth: int = 3
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    locator_epochs: int = 40
    locator_base_channels: int = 8
    seed: int = 0
    num_workers: int = 0
    input_scale: str = "overview"
    input_span: float | None = None
    open_beam: float | None = None
    dxa_calibration: bool = False
    amp: bool = True
    condition: str = "none"
    equivariant: bool = False
    ema: float = 0.0

    @classmethod
    def from_config(cls, block: dict | None) -> "TrainSettings":
        """Settings from the config's ``train:`` block (missing keys take the defaults above)."""
        block = dict(block or {})
        block.pop("threads", None)  # how many CPU threads: the caller's (torch.set_num_threads), not the recipe's
        kwargs = {}
        if "stages" in block:
            kwargs["stages"] = tuple(Stage(tuple(s["channels"]), int(s["epochs"])) for s in block.pop("stages"))
        if "loss" in block:
            kwargs.update({k: float(v) for k, v in block.pop("loss").items()})
        if "augment" in block:
            kwargs["augment"] = AugmentSettings(**block.pop("augment"))
        if "network" in block:
            kwargs.update(block.pop("network"))
        if "locator" in block:
            lb = block.pop("locator")
            kwargs.update({f"locator_{k}": v for k, v in lb.items()})
        unknown = set(block) - {f.name for f in cls.__dataclass_fields__.values()}
        if unknown:
            raise BonedrrError(f"unknown train settings: {', '.join(sorted(unknown))}")
        return cls(**kwargs, **block)

    def __post_init__(self):
        if self.input_scale not in INPUT_SCALES:
            raise BonedrrError(f"train input_scale must be one of {', '.join(INPUT_SCALES)}, not {self.input_scale!r}")
        if self.condition not in CONDITIONS:
            raise BonedrrError(f"train network condition must be one of {', '.join(CONDITIONS)}, not {self.condition!r}")
        if "tone" in self.condition and self.input_scale == "crop":
            raise BonedrrError("train network condition tone needs input_scale overview or detector (its "
                               "statistics are the whole radiograph's)")
        if self.input_span is not None and not (self.input_scale == "detector" and self.input_span > 0):
            raise BonedrrError(f"train input_span ({self.input_span}) is for input_scale detector and must be "
                               "above 0")
        if self.open_beam is not None and self.input_scale != "detector":
            raise BonedrrError(f"train open_beam ({self.open_beam}) is for input_scale detector, not "
                               f"{self.input_scale!r}")
        if not 0.0 <= self.ema < 1.0:
            raise BonedrrError(f"train ema must be in [0, 1), not {self.ema}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [{"channels": list(s.channels), "epochs": s.epochs} for s in self.stages]
        return d

    @property
    def channels(self) -> list[str]:
        """Every channel a stage predicts, in stage order (a later stage's wins a duplicate)."""
        out: list[str] = []
        for s in self.stages:
            out = [c for c in out if c not in s.channels] + list(s.channels)
        return out


def _fingerprint(settings: TrainSettings, folds, val_folds, n_train: int) -> str:
    key = json.dumps([settings.to_dict(), folds, val_folds, n_train], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The model


class DecompositionModel(HipModel):
    """A trained model: radiograph crops in, DRR channels (g/cm2) out; and the hip locator (torch; the
    torch-free twin for inference is :class:`bonedrr.model.portable.PortableModel`).

    Args:
        stage_nets: One U-Net per stage.
        stage_channels: The channels each stage predicts.
        crop: The crop geometry of the training data.
        locator: The hip-locator network, or None.
        calibration: ``{"slope", "intercept"}`` of DXA aBMD against predicted DRR-BMD, or None.
        info: Training facts (settings, folds, samples), kept in ``model.pt``.
        device: Where the networks run.
    """

    def __init__(self, stage_nets: list[UNet], stage_channels: list[list[str]], crop: CropGeometry,
                 locator: loc.Locator | None = None, calibration: dict | None = None, info: dict | None = None,
                 device: str = "cpu"):
        super().__init__(stage_channels, crop, calibration, info)
        self.stage_nets = [n.eval() for n in stage_nets]
        self.locator = locator.eval() if locator is not None else None
        self.device = torch.device(device)
        self.to(device)

    @property
    def has_locator(self) -> bool:
        return self.locator is not None

    def to(self, device: str | torch.device) -> "DecompositionModel":
        self.device = torch.device(device)
        for n in self.stage_nets:
            n.to(self.device)
        if self.locator is not None:
            self.locator.to(self.device)
        return self

    @torch.no_grad()
    def predict(self, xray_crops: np.ndarray, scale: np.ndarray | None = None, batch_size: int = 16,
                kvp=None) -> np.ndarray:
        x, scale, condition = self._inputs(xray_crops, scale, kvp)
        out = []
        for i in range(0, len(x), batch_size):
            t = torch.from_numpy(x[i:i + batch_size])[:, None].to(self.device)
            sc = torch.from_numpy(scale[i:i + batch_size]) if scale is not None else None
            cond = torch.from_numpy(condition[i:i + batch_size]) if condition is not None else None
            size = t.shape[-2:]
            if tuple(size) != self.crop_shape:
                t = F.interpolate(t, size=self.crop_shape, mode="bilinear", align_corners=False)
            stage_out = [net(t, sc, cond).float() for net in self.stage_nets]
            y = torch.stack([stage_out[s][:, j] for s, j in self._source.values()], 1).clamp_min(0)
            if tuple(size) != self.crop_shape:
                y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
            out.append(y.cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    predict.__doc__ = HipModel.predict.__doc__

    @torch.no_grad()
    def _locate(self, overview: np.ndarray) -> tuple[tuple[float, float], float]:
        rc, conf = self.locator.locate(torch.from_numpy(np.asarray(overview, np.float32))[None, None].to(self.device))
        return (float(rc[0, 0]), float(rc[0, 1])), float(conf[0])

    def save(self, path: str | Path) -> None:
        """Write ``model.pt`` and then, beside it, its torch-free copy ``model.npz`` (each atomically;
        the copy names ``model.pt`` by its content's digest, and is not used beside another)."""
        payload = {
            "format_version": FORMAT_VERSION,
            "stage_states": [n.state_dict() for n in self.stage_nets],
            "locator_state": self.locator.state_dict() if self.locator is not None else None,
            **self._meta(),
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        arrays = [{k: v.detach().cpu().numpy() for k, v in n.state_dict().items()} for n in self.stage_nets]
        locator = ({k: v.detach().cpu().numpy() for k, v in self.locator.state_dict().items()}
                   if self.locator is not None else None)
        write_portable(Path(path).with_name(PORTABLE_FILE), self, arrays, locator, twin_of=torch_file_digest(path))


def _unet(settings: dict, channels: Sequence[str]) -> UNet:
    """The U-Net of a stage predicting ``channels``; with ``equivariant``, every channel but a
    thickness follows the input's scale (a thickness is a shape, not a density)."""
    conditions = condition_size(settings.get("condition", "none"))
    equivariant = bool(settings.get("equivariant", False))
    return UNet(1, len(channels), int(settings["base_channels"]), int(settings["depth"]), conditions=conditions,
                equivariant=[equivariant and c != THICKNESS_CHANNEL for c in channels])


def _locator_net(settings: dict) -> loc.Locator:
    return loc.Locator(int(settings["locator_base_channels"]))


def load_model(model_dir: str | Path, device: str = "cpu") -> DecompositionModel:
    """Load a trained model folder (or its ``model.pt``).

    Raises:
        InputError: No folder, no finished model in it, or a file that is not a bonedrr model.
    """
    model_dir = Path(model_dir)
    path = model_dir if model_dir.is_file() else model_dir / MODEL_FILE
    if not model_dir.exists():
        raise InputError("model folder not found", model_dir)
    if not path.is_file():
        hint = " (training not finished: checkpoint.pt only)" if (model_dir / CHECKPOINT_FILE).is_file() else ""
        raise InputError(f"no {MODEL_FILE} in the model folder{hint}", model_dir)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"not a bonedrr model ({type(e).__name__})", path) from e
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise InputError(f"not a bonedrr model of format {FORMAT_VERSION}", path)
    settings = payload["info"]["settings"]
    nets = []
    for chans, state in zip(payload["stage_channels"], payload["stage_states"]):
        net = _unet(settings, chans)
        net.load_state_dict(state)
        nets.append(net)
    locator = None
    if payload["locator_state"] is not None:
        locator = _locator_net(settings)
        locator.load_state_dict(payload["locator_state"])
    c = payload["crop"]
    crop = CropGeometry(tuple(c["shape"]), tuple(c["crop_mm"]), tuple(c["head_position"]))
    return DecompositionModel(nets, payload["stage_channels"], crop, locator, payload["calibration"],
                              payload["info"], device)


# ---------------------------------------------------------------------------------------------
# Training


def _generator(seed: int, phase: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + phase * 10_007 + epoch)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BonedrrError("device cuda was asked for, but torch finds no CUDA device")
    return torch.device(device)


def _crop_geometry(dataset, shape: tuple[int, int]) -> CropGeometry:
    """The crop geometry of a shard dataset (its manifest's pack settings; defaults for others)."""
    from bonedrr.shards import PackSettings

    packed = dict(getattr(dataset, "manifest", {}).get("settings", {}))
    default = PackSettings()
    crop_mm = tuple(packed.get("crop_mm", (shape[0] * 1.875, shape[1] * 1.875)))
    return CropGeometry(tuple(shape), tuple(float(v) for v in crop_mm),
                        tuple(float(v) for v in packed.get("head_position", default.head_position)))


class _Run:
    """State of one training run: nets, optimisers, the log, and checkpointing."""

    def __init__(self, settings: TrainSettings, out_dir: Path, device: torch.device, fingerprint: str):
        self.s, self.out_dir, self.device, self.fingerprint = settings, out_dir, device, fingerprint
        self.rows: list[dict] = []
        self.done: dict[str, int] = {}  # phase name -> finished epochs
        torch.manual_seed(settings.seed)
        sd = settings.to_dict()
        self.nets = [_unet(sd, s.channels) for s in settings.stages]
        # what the model keeps: the nets themselves, or their moving averages (settings.ema)
        self.kept = [copy.deepcopy(n) for n in self.nets] if settings.ema > 0 else self.nets
        self.locator = _locator_net(sd) if settings.locator_epochs > 0 else None
        self.discs = [PatchDiscriminator(1 + len(s.channels)) for s in settings.stages] if settings.gan > 0 else None
        self.opt_state: dict = {}
        self.threshold = BMD_THRESHOLD_G_CM2

    def checkpoint(self, phase: str, optimisers: dict) -> None:
        state = {"fingerprint": self.fingerprint, "done": self.done, "rows": self.rows,
                 "nets": [n.state_dict() for n in self.nets],
                 "averages": [n.state_dict() for n in self.kept] if self.kept is not self.nets else None,
                 "locator": self.locator.state_dict() if self.locator is not None else None,
                 "discs": [d.state_dict() for d in self.discs] if self.discs else None,
                 "optimisers": {k: v.state_dict() for k, v in optimisers.items()}, "phase": phase}
        with atomic_path(self.out_dir / CHECKPOINT_FILE) as tmp:
            torch.save(state, tmp)

    def resume(self) -> bool:
        path = self.out_dir / CHECKPOINT_FILE
        if not path.is_file():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged checkpoint: start again rather than fail
            log.warning("ignoring unreadable checkpoint %s (%s)", path, e)
            return False
        if state.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint %s is of other settings or data; starting afresh", path)
            return False
        for n, sd in zip(self.nets, state["nets"]):
            n.load_state_dict(sd)
        if self.kept is not self.nets:
            for n, sd in zip(self.kept, state["averages"]):
                n.load_state_dict(sd)
        if self.locator is not None and state["locator"] is not None:
            self.locator.load_state_dict(state["locator"])
        if self.discs and state["discs"]:
            for d, sd in zip(self.discs, state["discs"]):
                d.load_state_dict(sd)
        self.done, self.rows = dict(state["done"]), list(state["rows"])
        self.opt_state = {"phase": state["phase"], **state["optimisers"]}
        log.info("resuming from %s (%s)", path, ", ".join(f"{k}: {v} epochs" for k, v in self.done.items()))
        return True

    def optimiser_state(self, phase: str, name: str):
        return self.opt_state.get(name) if self.opt_state.get("phase") == phase else None


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _input_scale(settings: TrainSettings, overview: torch.Tensor) -> torch.Tensor | None:
    """The network's input scale (N, 2) of crops from radiographs with these overviews; None for
    ``input_scale: crop`` (each crop its own)."""
    if settings.input_scale == "crop":
        return None
    return detector_scale(overview, settings.input_span, settings.open_beam) if settings.input_scale == "detector" \
        else overview_scale(overview)


def _input_span(dataset: Dataset, n: int = 256) -> float:
    """The median 1st-50th percentile span of the body in up to ``n`` of the dataset's overviews,
    evenly spread: the cohort's ``input_span`` (:attr:`TrainSettings.input_span`)."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    overviews = torch.stack([torch.as_tensor(dataset[int(i)]["overview"]) for i in picks])
    scale = overview_scale(overviews)
    return float(np.median((scale[:, 1] - scale[:, 0]).numpy()))


def _check_open_beam(dataset: Dataset, settings: TrainSettings, shard_dir, n: int = 256) -> None:
    """Refuse an ``open_beam`` that the training radiographs contradict: where up to ``n`` of their
    overviews, evenly spread, have values below it (:func:`bonedrr.model.portable.below_open_beam`),
    the cohort's images are not referenced to it, and a model trained so would read the offset as
    density."""
    from bonedrr.model.portable import below_open_beam

    picks = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    darkest = [d for i in picks if (d := below_open_beam(np.asarray(dataset[int(i)]["overview"]), settings.open_beam,
                                                         settings.input_span)) is not None]
    if darkest:
        raise BonedrrError(f"train open_beam ({settings.open_beam:g}) is not this cohort's: {len(darkest)} of {len(picks)} "
                           f"training radiographs have values below it (down to {min(darkest):.0f}); set the "
                           "detector's value for the unattenuated beam, or leave open_beam unset", shard_dir)


def _condition(settings: TrainSettings, batch: dict, device: torch.device, xray: torch.Tensor,
               scale: torch.Tensor | None, overview: torch.Tensor) -> torch.Tensor | None:
    """The U-Nets' condition (N, conditions) of a batch (``xray``, ``scale`` and ``overview`` as the
    network gets them: augmented), or None for an unconditioned model."""
    parts = []
    if "kvp" in settings.condition:
        parts.append(torch.from_numpy(kvp_condition(batch["kvp"].numpy())))
    if "tone" in settings.condition:
        parts.append(tone_condition(xray.cpu(), scale.cpu(), overview.cpu()))
    return torch.cat(parts, 1).to(device) if parts else None


def _stage_epoch(run: _Run, k: int, loader: DataLoader, channel_idx: list[int], opt, disc_opt, gen) -> dict:
    s, net, dev = run.s, run.nets[k], run.device
    disc = run.discs[k] if run.discs else None
    augment = RandomAugment(s.augment, gen, tone=s.input_scale != "detector", offset=s.open_beam is None)
    net.train()
    sums = {"loss": 0.0, "l1": 0.0, "gc": 0.0, "gan": 0.0, "bmd": 0.0}
    channels = list(s.stages[k].channels)
    j = channels.index(BMD_CHANNEL) if s.bmd > 0 and BMD_CHANNEL in channels else None
    n = 0
    for i, batch in enumerate(loader):
        xray, drr, overview = batch["xray"], batch["drr"][:, channel_idx], batch["overview"]
        scale = None
        if s.input_scale != "crop":  # the tone curve changes the crop and its whole radiograph alike
            xray, drr, overview = augment(xray, drr, overview=overview)
            scale = _input_scale(s, overview)
        else:
            xray, drr = augment(xray, drr)
        condition = _condition(s, batch, dev, xray, scale, overview)
        xray, drr = xray.to(dev), drr.to(dev)
        scale = scale.to(dev) if scale is not None else None
        with _autocast(dev, s.amp):
            pred = net(xray, scale, condition)
        pred = pred.float()
        l1 = l1_loss(pred, drr)
        gcl = gc_loss(pred, drr) if s.gc > 0 else torch.zeros((), device=dev)
        loss = s.l1 * l1 + s.gc * gcl
        bl = bmd_loss(pred[:, j], drr[:, j], run.threshold) if j is not None else torch.zeros((), device=dev)
        loss = loss + s.bmd * bl
        adv = torch.zeros((), device=dev)
        if disc is not None:
            with _autocast(dev, s.amp):
                adv = gan_loss(disc(xray, pred), True)
            loss = loss + s.gan * adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if run.kept is not run.nets:
            # the decay ramps up over the first steps, so a short run's average is not its initial weights
            step = run.done.get(f"stage{k + 1}", 0) * len(loader) + i
            decay = min(s.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for average, current in zip(run.kept[k].parameters(), net.parameters()):
                    average.lerp_(current, 1.0 - decay)
        if disc is not None:
            with _autocast(dev, s.amp):
                d_loss = 0.5 * (gan_loss(disc(xray, drr), True) + gan_loss(disc(xray, pred.detach()), False))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        b = len(xray)
        n += b
        for key, v in (("loss", loss), ("l1", l1), ("gc", gcl), ("gan", adv), ("bmd", bl)):
            sums[key] += float(v.detach()) * b
    return {k: v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def _stage_validate(run: _Run, k: int, loader: DataLoader | None, channel_idx: list[int], channels: list[str]) -> dict:
    if loader is None:
        return {}

    net = run.kept[k].eval()  # what the model keeps
    l1s, gcs, bmd_err = [], [], []
    j = channels.index(BMD_CHANNEL) if BMD_CHANNEL in channels else None
    for batch in loader:
        drr = batch["drr"][:, channel_idx].to(run.device)
        scale = _input_scale(run.s, batch["overview"])
        condition = _condition(run.s, batch, run.device, batch["xray"], scale, batch["overview"])
        scale = scale.to(run.device) if scale is not None else None
        pred = net(batch["xray"].to(run.device), scale, condition).float().clamp_min(0)
        l1s.append(float(F.l1_loss(pred, drr, reduction="none").mean((1, 2, 3)).sum()))
        gcs.append(float(gradient_correlation(pred, drr).mean(1).sum()))
        if j is not None:
            for p, true_bmd in zip(pred[:, j].cpu().numpy(), batch["drr_bmd"].numpy()):
                b = drr_bmd(p, run.threshold)
                if np.isfinite(b) and np.isfinite(true_bmd):
                    bmd_err.append(abs(b - float(true_bmd)))
    count = len(loader.dataset)
    out = {"val_l1": sum(l1s) / count, "val_gc": sum(gcs) / count}
    if bmd_err:
        out["val_bmd_mae"] = float(np.mean(bmd_err))
    return out


def _locator_epoch(run: _Run, loader: DataLoader, opt, gen) -> dict:
    net, dev = run.locator, run.device
    augment = RandomAugment(AugmentSettings(rotate_deg=8, scale=0.15, shift=0.15, gamma=0.4, contrast=0.3,
                                            noise=0.03), gen)
    net.train()
    total, n = 0.0, 0
    for batch in loader:
        ov = batch["overview"]
        heat = loc.gaussian_heatmap(batch["head_overview_px"].float(), tuple(ov.shape[-2:]), sigma=4.0)
        ov, heat = augment(ov, heat)
        heat = F.avg_pool2d(heat, net.pool) * net.pool ** 2
        with _autocast(dev, run.s.amp):
            logits = net(ov.to(dev))
        loss = loc.heatmap_loss(logits.float(), heat.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(ov)
        n += len(ov)
    return {"loss": total / max(n, 1)}


@torch.no_grad()
def locator_errors(net: loc.Locator, dataset: Dataset, device: torch.device | str = "cpu") -> np.ndarray:
    """Distance (overview pixels) between the located and the true femoral-head centre, per sample."""
    net.eval()
    errs = []
    for batch in DataLoader(dataset, batch_size=16):
        rc, _ = net.locate(batch["overview"].to(device))
        errs.append(torch.linalg.norm(rc - batch["head_overview_px"].float(), dim=1).numpy())
    return np.concatenate(errs) if errs else np.zeros(0)


def _open(shard_dir, folds, exclude_folds=None, channels=None):
    from bonedrr.dataset import ShardDataset

    return ShardDataset(shard_dir, folds=folds, exclude_folds=exclude_folds, channels=channels)


def train_model(shard_dir: str | Path, out_dir: str | Path, settings: TrainSettings | dict | None = None,
                folds: Sequence[int] | None = None, exclude_folds: Sequence[int] | None = None,
                val_folds: Sequence[int] | None = None, device: str = "auto",
                stop_after_epochs: int | None = None, dataset: Dataset | None = None,
                val_dataset: Dataset | None = None, progress: bool = True) -> DecompositionModel | None:
    """Train the decomposition model (and the hip locator) on shards; write the model folder.

    Args:
        shard_dir: The cohort's shard folder (``results/<cohort>/shards``).
        out_dir: The model folder to write.
        settings: :class:`TrainSettings` or the config's ``train:`` block.
        folds: Folds to train on (None: all).
        exclude_folds: Then leave these folds out (the held-out fold of a cross-validation model).
        val_folds: Folds to report validation losses on per epoch (the curves); never trained on.
        device: ``auto``, ``cpu`` or ``cuda``.
        stop_after_epochs: Stop (as if killed) after this many epochs of this call, leaving the
            checkpoint; None trains to the end.
        dataset, val_dataset: Datasets to use instead of opening ``shard_dir`` (items as
            :class:`bonedrr.dataset.ShardDataset`'s; for tests).
        progress: Show progress bars.

    Returns:
        The trained model, or None when stopped early.
    """
    from tqdm import tqdm

    if not isinstance(settings, TrainSettings):
        settings = TrainSettings.from_config(settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    channels = settings.channels
    if BMD_CHANNEL not in channels:
        raise BonedrrError(f"no stage predicts {BMD_CHANNEL!r}, the channel BMD is read from")
    train_set = dataset if dataset is not None else _open(shard_dir, folds, exclude_folds, channels=channels)
    if val_dataset is None and val_folds:
        val_dataset = _open(shard_dir, val_folds, channels=channels)
    if len(train_set) == 0:
        raise InputError(f"no training samples (folds {folds})", shard_dir)
    missing = [c for c in channels if c not in train_set.channels]
    if missing:
        raise InputError(f"the shards have no channel(s) {', '.join(missing)} (they have "
                         f"{', '.join(train_set.channels)})", shard_dir)
    if "kvp" in settings.condition:
        _require_kvp(train_set, shard_dir)
        if val_dataset is not None:
            _require_kvp(val_dataset, shard_dir)
    if settings.input_scale == "detector" and settings.input_span is None:
        settings = replace(settings, input_span=_input_span(train_set))
        log.info("input_span: %.6g (the training radiographs' median 1st-50th percentile span)", settings.input_span)
    if settings.open_beam is not None:
        _check_open_beam(train_set, settings, shard_dir)
    first = train_set[0]
    shape = tuple(first["xray"].shape[-2:])
    depth_div = 2 ** settings.depth
    if shape[0] % depth_div or shape[1] % depth_div:
        raise BonedrrError(f"crop {shape[0]}x{shape[1]} is not divisible by 2**depth = {depth_div}")
    fingerprint = _fingerprint(settings, [folds, exclude_folds], val_folds,
                               [r.get("sample_id") for r in (getattr(train_set, "index", None) or [])] or len(train_set))
    run = _Run(settings, out_dir, dev, fingerprint)
    run.threshold = float(getattr(train_set, "manifest", {}).get("settings", {}).get("threshold_g_cm2",
                                                                                        BMD_THRESHOLD_G_CM2))
    run.resume()
    kept = run.kept if run.kept is not run.nets else []
    for m in run.nets + kept + ([run.locator] if run.locator else []) + (run.discs or []):
        m.to(dev)
    log.info("training on %d samples (folds %s, without %s), %s, channels %s", len(train_set),
             list(folds) if folds else "all", list(exclude_folds) if exclude_folds else "none", dev, ", ".join(channels))
    loader_kw = {"batch_size": settings.batch_size, "num_workers": settings.num_workers,
                 "drop_last": len(train_set) > settings.batch_size}
    from bonedrr.dataset import MappedBatchLoader, SharedBatchRing, ShardDataset, fork_available

    # From a worker, a batch in a reused shared block (the epochs below let go of a batch before taking
    # the next one, well within the rings' lifetime): mapped once where workers fork, else handed over
    mapped = bool(settings.num_workers) and isinstance(train_set, ShardDataset) and fork_available()
    if settings.num_workers and isinstance(train_set, ShardDataset) and not mapped:
        loader_kw["collate_fn"] = SharedBatchRing()
    if val_dataset is not None and len(val_dataset) == 0:
        log.warning("no validation samples in folds %s: the curves show training losses only", val_folds)
        val_dataset = None
    val_loader = DataLoader(val_dataset, batch_size=settings.batch_size) if val_dataset is not None else None
    data_channels = list(train_set.channels)
    budget = [math.inf if stop_after_epochs is None else stop_after_epochs]

    def spend() -> bool:
        budget[0] -= 1
        return budget[0] <= 0

    phases = [(f"stage{k + 1}", st.epochs) for k, st in enumerate(settings.stages)]
    if run.locator is not None:
        phases.append(("locator", settings.locator_epochs))
    for p, (phase, epochs) in enumerate(phases):
        start = run.done.get(phase, 0)
        if start >= epochs:
            continue
        if phase == "locator":
            net = run.locator
            params = net.parameters()
        else:
            k = p
            net = run.nets[k]
            if start == 0 and k > 0:
                _initialise_from(net, run.nets[k - 1], settings.stages[k - 1].channels, settings.stages[k].channels)
            if start == 0 and run.kept is not run.nets:  # the average starts at the stage's first weights
                run.kept[k].load_state_dict(net.state_dict())
            params = net.parameters()
            channel_idx = [data_channels.index(c) for c in settings.stages[k].channels]
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=settings.lr * 0.02)
        optimisers = {"opt": opt, "sched": sched}
        disc_opt = None
        if phase != "locator" and run.discs:
            disc_opt = torch.optim.AdamW(run.discs[k].parameters(), lr=settings.lr * 0.5, betas=(0.5, 0.999))
            optimisers["disc_opt"] = disc_opt
        for name, o in optimisers.items():
            saved = run.optimiser_state(phase, name)
            if saved is not None and start > 0:
                o.load_state_dict(saved)
        bar = tqdm(range(start, epochs), desc=f"train {phase}", unit="epoch", disable=not progress,
                   initial=start, total=epochs)
        for epoch in bar:
            t0 = time.perf_counter()
            gen = _generator(settings.seed, p, epoch)
            loader = (MappedBatchLoader if mapped else DataLoader)(
                train_set, shuffle=True, generator=_generator(settings.seed, p, epoch), **loader_kw)
            if phase == "locator":
                stats = _locator_epoch(run, loader, opt, gen)
            else:
                stats = _stage_epoch(run, k, loader, channel_idx, opt, disc_opt, gen)
                stats.update(_stage_validate(run, k, val_loader, channel_idx, list(settings.stages[k].channels)))
            sched.step()
            run.done[phase] = epoch + 1
            row = {"phase": phase, "epoch": epoch + 1, **stats, "seconds": round(time.perf_counter() - t0, 3)}
            run.rows.append(row)
            bar.set_postfix({k2: f"{v:.4f}" for k2, v in stats.items() if k2 in ("loss", "val_bmd_mae")})
            run.checkpoint(phase, optimisers)
            _write_log(out_dir / LOG_FILE, run.rows)
            finished = p == len(phases) - 1 and epoch + 1 == epochs
            if spend() and not finished:
                bar.close()
                log.info("stopped after %s epoch %d (checkpoint kept)", phase, epoch + 1)
                return None
        bar.close()

    crop = _crop_geometry(train_set, shape)
    info = {"settings": settings.to_dict(), "folds": list(folds) if folds else None,
            "exclude_folds": list(exclude_folds) if exclude_folds else None,
            "val_folds": list(val_folds) if val_folds else None, "n_train": len(train_set),
            "patients": sorted({str(r.get("patient_id")) for r in (getattr(train_set, "index", None) or [])}),
            "data_channels": data_channels, "device": str(dev),
            "threshold_g_cm2": run.threshold}
    model = DecompositionModel([copy.deepcopy(n).cpu() for n in run.kept], [list(s.channels) for s in settings.stages],
                               crop, copy.deepcopy(run.locator).cpu() if run.locator else None, None, info)
    if run.locator is not None:
        errs = locator_errors(model.locator, val_dataset if val_dataset is not None else train_set)
        info["locator_error_overview_px"] = {"median": float(np.median(errs)), "max": float(errs.max()),
                                             "on": "validation" if val_dataset is not None else "training"}
    if settings.dxa_calibration:
        model.calibration = fit_dxa_calibration(model, train_set)
    plot_curves(run.rows, out_dir / CURVES_FILE)
    model.save(out_dir / MODEL_FILE)
    log.info("wrote %s", out_dir / MODEL_FILE)
    return model


def _require_kvp(dataset: Dataset, shard_dir) -> None:
    """Every sample has a tube voltage (a kVp-conditioned model is trained on them)."""
    if hasattr(dataset, "kvp"):
        kvp = dataset.kvp()
    else:
        kvp = np.array([dataset[i]["kvp"] for i in range(len(dataset))], float)
    lacking = np.flatnonzero(~np.isfinite(kvp))
    if lacking.size:
        ids = [str(getattr(dataset, "index", [{}] * len(dataset))[i].get("sample_id", i)) for i in lacking[:3]]
        raise InputError(f"network condition kvp: {lacking.size} of {len(kvp)} samples have no kVp (their "
                         f"radiograph has no DICOM KVP; {', '.join(ids)}{', ...' if lacking.size > 3 else ''}); "
                         "set train network condition: none, or repack from radiographs that record it", shard_dir)


def _initialise_from(net: UNet, previous: UNet, prev_channels, channels) -> None:
    """Stage k+1 starts from stage k: every weight but the output layer; output channels that stage k
    also had (or, for the proximal femur, its femur) start from stage k's."""
    # not the equivariance flags either: one per output channel, the stage's own
    state = {k: v for k, v in previous.state_dict().items() if not k.startswith("head.") and k != "equivariant"}
    net.load_state_dict(state, strict=False)
    with torch.no_grad():
        for i, c in enumerate(channels):
            src = c if c in prev_channels else ("femur" if c == BMD_CHANNEL and "femur" in prev_channels else None)
            if src is not None:
                j = list(prev_channels).index(src)
                net.head.weight[i] = previous.head.weight[j]
                net.head.bias[i] = previous.head.bias[j]


def fit_dxa_calibration(model: DecompositionModel, train_set: Dataset) -> dict | None:
    """Least-squares line DXA aBMD = slope x predicted DRR-BMD + intercept, on the training samples
    that have a DXA value (None when fewer than 3 do)."""
    preds, dxa = [], []
    for batch in DataLoader(train_set, batch_size=16):
        b = model.bmd(model.predict(batch["xray"][:, 0].numpy(), model.scale_of(batch["overview"][:, 0].numpy()),
                                    kvp=batch["kvp"].numpy()))
        preds += list(b)
        dxa += [float(v) for v in batch["dxa_abmd"]]
    x, y = np.asarray(preds), np.asarray(dxa)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        log.warning("DXA calibration skipped: %d training samples have DXA values", int(ok.sum()))
        return None
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    r = float(np.corrcoef(x[ok], y[ok])[0, 1])
    log.info("DXA calibration: aBMD = %.3f x DRR-BMD + %.3f (n %d, r %.3f)", slope, intercept, ok.sum(), r)
    return {"slope": float(slope), "intercept": float(intercept), "n": int(ok.sum()), "r": r}


def _write_log(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_COLUMNS, delimiter="\t", extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot_curves(rows: list[dict], path: str | Path) -> None:
    """Training curves: loss (and validation L1 and BMD error when present) per epoch and phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(dict.fromkeys(r["phase"] for r in rows))
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        rs = [r for r in rows if r["phase"] == phase]
        ep = [r["epoch"] for r in rs]
        ax.plot(ep, [r["loss"] for r in rs], label="training loss")
        if any("l1" in r for r in rs) and phase != "locator":
            ax.plot(ep, [r.get("l1", np.nan) for r in rs], label="training L1 (g/cm2)")
        if any("val_l1" in r for r in rs):
            ax.plot(ep, [r.get("val_l1", np.nan) for r in rs], label="validation L1 (g/cm2)")
        if any("val_bmd_mae" in r for r in rs):
            ax.plot(ep, [r.get("val_bmd_mae", np.nan) for r in rs], label="validation BMD MAE (g/cm2)")
        ax.set_yscale("log")
        ax.set_title(phase if phase != "locator" else "hip locator (heatmap cross-entropy)")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
