"""Bone and muscle segmentation with nnU-Net v2: train on a cohort's labelled CTs, predict the rest.

Two entry points, behind ``bonedrr train-segmenter`` and ``bonedrr segment``:

* :func:`train_segmenter` writes an nnU-Net v2 raw data set of the labelled cases (CT + canonical
  labels), lets nnU-Net extract its fingerprint, plan and preprocess (``3d_fullres`` only), trains one
  fold with an nnU-Net trainer, and leaves a standard nnU-Net model folder
  (``<trainer>__<plans>__3d_fullres`` with ``plans.json``, ``dataset.json``, ``fold_X/checkpoint_final.pth``)
  that ``nnUNetv2_predict`` could use as well.
* :func:`segment_case` predicts one CT with nnU-Net's own :class:`nnUNetPredictor` from any nnU-Net v2
  model folder (ours or, e.g., TotalSegmentator's), maps the model's label ids to the canonical ids
  (:mod:`bonedrr.labels`), checks the result is plausible, and measures it against reference labels
  where there are some (Dice, mean and 95th-percentile surface distance per structure).

nnU-Net is configured through environment variables (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``, ``nnUNet_n_proc_DA``) and writes temporary files; :func:`nnunet_environment` sets
them, and ``TMPDIR``, to folders inside the job's working folder for the duration of a call and
restores ``os.environ`` afterwards, so nothing leaks outside results/ or into the next job.

Orientation: nnU-Net works on arrays and ignores direction cosines, so a CT stored with another axis
order or flip would show the network mirrored anatomy (left femur on the right). Every CT is therefore
reoriented to ``RAS`` (NIfTI's canonical orientation, the one TotalSegmentator's models are trained in)
before training and prediction, and the labels are reoriented back to the CT's own grid: an exact
permutation and flip of axes, no resampling.

Plausibility: an empty segmentation, a missing femur or hemipelvis on a side the case is measured on
(``case.json`` ``side``), or a bone volume far outside the adult range is an
:class:`~bonedrr.errors.InputError` naming the CT, never a silent zero downstream.

Example (plausibility ranges, cm3):
    >>> PLAUSIBLE_VOLUME_CM3["femur"], PLAUSIBLE_VOLUME_CM3["hip"]
    ((20.0, 1500.0), (40.0, 1200.0))
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonedrr.errors import BonedrrError, ConfigError, InputError
from bonedrr.images import atomic_path, read_volume, write_image, write_json
from bonedrr.labels import CANONICAL_LABELS, LABEL_NAMES, PRESETS, SIDES, remap

log = logging.getLogger(__name__)

#: The array orientation nnU-Net sees (DICOM orientation code of SimpleITK): NIfTI's canonical RAS.
WORKING_ORIENTATION = "RAS"
#: nnU-Net data set id and name of a model trained by this workflow (one data set per working folder).
DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID:03d}_bonedrr"
#: Plausible volume of one bone of one side inside a hip CT, cm3. The femur's lower bound is the
#: femoral head alone (a scan ending at the lesser trochanter), its upper bound a whole large femur;
#: the hemipelvis (``hip_*``) of an adult lies between 150 and 600 cm3, with margin for scans that cut
#: the iliac crest. Override per cohort with ``segmentation.plausible_volume_cm3``.
PLAUSIBLE_VOLUME_CM3: dict[str, tuple[float, float]] = {"femur": (20.0, 1500.0), "hip": (40.0, 1200.0)}
#: The lowest median CT value of a segmented femur or hemipelvis: below water no bone label is bone
#: (cortex and marrow together lie well above it even in osteoporosis; air is -1000).
MIN_BONE_MEDIAN_HU = 0.0
#: Side-less structures of a model trained with ``sides: midline``: the network learns 7 classes
#: instead of 13 and never has to tell a left femur from a right one (a hard question for a small
#: convolutional network that sees a shifted patch); left and right are assigned afterwards by the
#: body's midline (:func:`split_at_midline`).
SIDELESS_LABELS: dict[str, int] = {"femur": 1, "hip": 2, "gluteus_maximus": 3, "gluteus_medius": 4,
                                   "gluteus_minimus": 5, "iliopsoas": 6, "other_bone": 7}
#: Structures whose Dice and surface distance are reported (every canonical label).
STRUCTURES = tuple(CANONICAL_LABELS)


# ----------------------------------------------------------------------------------------------------
# Environment and devices


_MAX_SOCKET_DIR = 107 - len("/pymp-xxxxxxxx/listener-xxxxxxxx") - 8  # AF_UNIX limit, a margin


@contextlib.contextmanager
def nnunet_environment(workdir: str | Path, processes: int = 1):
    """Point nnU-Net's folders and every temporary file at ``workdir`` while the block runs.

    Sets ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` (``workdir/nnUNet_*``),
    ``TMPDIR``/``TMP``/``TEMP`` and Python's :data:`tempfile.tempdir` (``workdir/tmp``), the number of
    data-augmentation and preprocessing processes, and disables ``torch.compile`` (slow to start, and
    unsupported on CPU). nnU-Net 2.8 reads its path variables when it uses them, so setting them here
    (before and after its import) is enough. ``os.environ`` and ``tempfile.tempdir`` are restored on
    exit, whatever happens.

    Example:
        >>> import os, tempfile
        >>> before = dict(os.environ)
        >>> with nnunet_environment(tempfile.mkdtemp()) as folders:
        ...     os.environ["nnUNet_raw"] == str(folders["raw"])
        True
        >>> dict(os.environ) == before
        True
    """
    workdir = Path(workdir).resolve()
    folders = {"raw": workdir / "nnUNet_raw", "preprocessed": workdir / "nnUNet_preprocessed",
               "results": workdir / "nnUNet_results", "tmp": workdir / "tmp"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    # nnU-Net's worker processes talk over Unix sockets that multiprocessing makes in the temporary
    # folder (".../pymp-XXXXXXXX/listener-XXXXXXXX"), and a socket path longer than 107 bytes fails
    # ("AF_UNIX path too long"). Deep results folders get a short private temporary folder instead,
    # removed when the process ends; nnU-Net's own folders stay in workdir.
    short_tmp = None
    if len(str(folders["tmp"]).encode()) > _MAX_SOCKET_DIR:
        short_tmp = Path(tempfile.mkdtemp(prefix="bonedrr-nnunet-"))
        folders["tmp"] = short_tmp
    saved = dict(os.environ)  # nnU-Net also sets variables of its own (KMP_*) when imported
    saved_tempdir = tempfile.tempdir
    os.environ.update({"nnUNet_raw": str(folders["raw"]), "nnUNet_preprocessed": str(folders["preprocessed"]),
                       "nnUNet_results": str(folders["results"]), "nnUNet_n_proc_DA": str(processes),
                       "nnUNet_def_n_proc": str(max(processes, 1)), "nnUNet_compile": "false",
                       "TMPDIR": str(folders["tmp"]), "TMP": str(folders["tmp"]), "TEMP": str(folders["tmp"])})
    tempfile.tempdir = str(folders["tmp"])
    try:
        yield folders
    finally:
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        os.environ.update(saved)
        tempfile.tempdir = saved_tempdir
        if short_tmp is not None:  # after multiprocessing has removed its own folder in it, at exit
            from multiprocessing import util

            util.Finalize(None, shutil.rmtree, args=(str(short_tmp),), kwargs={"ignore_errors": True},
                          exitpriority=-200)


def torch_device(device: str = "auto"):
    """The torch device for nnU-Net: ``auto`` -> CUDA when torch sees a GPU, else CPU.

    Raises:
        BonedrrError: ``cuda`` asked for where torch finds no GPU.
    """
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise BonedrrError(f"unknown device {device!r} (choose from auto, cpu, cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise BonedrrError("--device cuda was asked for, but torch finds no CUDA device (check nvidia-smi and "
                           "that torch is a CUDA build)")
    chosen = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    log.info("nnU-Net device: %s (asked: %s)", chosen, device)
    return torch.device(chosen)


# ----------------------------------------------------------------------------------------------------
# Orientation


def to_working_orientation(image: sitk.Image) -> sitk.Image:
    """The image with its axes permuted and flipped to :data:`WORKING_ORIENTATION` (no resampling)."""
    return sitk.DICOMOrient(image, WORKING_ORIENTATION)


def back_to_grid(labels: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """Labels in the working orientation, put back on ``grid`` (the CT as stored)."""
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(grid.GetDirection())
    out = sitk.DICOMOrient(labels, code)
    if out.GetSize() != grid.GetSize():  # an oblique CT: DICOMOrient picked the nearest axes
        out = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    out.CopyInformation(grid)
    return out


# ----------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainSettings:
    """How nnU-Net trains. ``None`` keeps nnU-Net's own choice (the defaults for a real cohort).

    Attributes:
        trainer: An nnU-Net trainer class name, found by nnU-Net's lookup (nnU-Net's own, e.g.
            ``nnUNetTrainerNoMirroring``, the default: nnU-Net's trainer without mirroring, which lateral
            labels need; or bonedrr's ``nnUNetTrainerBonedrr``).
        epochs: Epochs (nnUNetTrainer: 1000).
        iterations_per_epoch: Training iterations per epoch (nnUNetTrainer: 250).
        val_iterations_per_epoch: Validation iterations per epoch (nnUNetTrainer: 50).
        fold: ``"all"`` (train on every labelled case) or a fold of nnU-Net's 5-fold split.
        configuration: nnU-Net configuration, ``3d_fullres`` (nnU-Net's usual) or ``2d`` (axial slices;
            on a CPU an order of magnitude cheaper per iteration).
        sides: ``model`` (the network learns the 13 lateral labels, as nnU-Net and TotalSegmentator do)
            or ``midline`` (it learns :data:`SIDELESS_LABELS`; :func:`split_at_midline` assigns sides).
        device: ``auto``, ``cpu`` or ``cuda``.
        target_spacing_mm: Isotropic voxel size the network works at (nnU-Net: the median spacing).
        patch_size: Training patch [z, y, x] in voxels at the target spacing (nnU-Net: from its GPU
            memory target); the network topology is planned for it by nnU-Net's own rules.
        base_features: Features of the first U-Net stage (nnU-Net: 32).
        max_features: Most features of any stage (nnU-Net: 320 in 3D, 512 in 2D).
        batch_size: Patches per iteration (nnU-Net: from its GPU memory target, at least 2).
        processes: Processes for preprocessing and data augmentation.
        threads: torch CPU threads (default: torch's, one per core).
        seed: Seeds Python's, NumPy's and torch's generators and loads the training patches in the main
            process (nnU-Net's parallel loader seeds its workers at random and hands batches over in
            whatever order they finish), so that a rerun trains the same model on the same device and
            thread count. ``None``: nnU-Net's own behaviour, unseeded, with ``processes`` loader workers.
    """

    trainer: str = "nnUNetTrainerNoMirroring"
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    fold: str | int = "all"
    configuration: str = "3d_fullres"
    sides: str = "model"
    device: str = "auto"
    target_spacing_mm: float | None = None
    patch_size: list[int] | None = None
    base_features: int | None = None
    max_features: int | None = None
    batch_size: int | None = None
    processes: int = 1
    threads: int | None = None
    seed: int | None = None


def _planner_class(settings: TrainSettings):
    """nnU-Net's default ExperimentPlanner with the settings' features and patch size.

    Passed to nnU-Net's planning API as a class (not looked up by name), so it may live here.
    """
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    class BonedrrPlanner(ExperimentPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if settings.base_features:
                self.UNet_base_num_features = settings.base_features
            if settings.max_features:
                self.UNet_max_features_3d = self.UNet_max_features_2d = settings.max_features

        def get_plans_for_configuration(self, spacing, median_shape, data_identifier,
                                        approximate_n_voxels_dataset, _cache):
            plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                       approximate_n_voxels_dataset, _cache)
            if settings.batch_size:
                plan["batch_size"] = settings.batch_size
            if settings.patch_size is None or len(settings.patch_size) != len(spacing):
                return plan
            _, strides, kernels, patch, _ = get_pool_and_conv_props(
                spacing, settings.patch_size, self.UNet_featuremap_min_edge_length, 999999)
            n = len(strides)
            most = self.UNet_max_features_3d if len(spacing) == 3 else self.UNet_max_features_2d
            plan["patch_size"] = tuple(int(p) for p in patch)
            plan["architecture"]["arch_kwargs"].update({
                "n_stages": n, "kernel_sizes": kernels, "strides": strides,
                "features_per_stage": tuple(min(most, self.UNet_base_num_features * 2 ** i) for i in range(n)),
                "n_conv_per_stage": self.UNet_blocks_per_stage_encoder[:n],
                "n_conv_per_stage_decoder": self.UNet_blocks_per_stage_decoder[:n - 1]})
            return plan

    return BonedrrPlanner


def write_raw_dataset(cases: list[tuple[str, str | Path, str | Path]], raw_dir: Path, sides: str = "model") -> Path:
    """An nnU-Net raw data set of (case id, CT, canonical labels on the CT's grid) in working orientation.

    Raises:
        InputError: Labels not on their CT's grid or with non-canonical ids.
    """
    from bonedrr.ingest import read_labels

    folder = raw_dir / DATASET_NAME
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case_id, ct_path, labels_path in cases:
        ct = read_volume(ct_path)
        labels = read_labels(labels_path, ct)
        sitk.WriteImage(sitk.Cast(to_working_orientation(ct), sitk.sitkFloat32),
                        str(folder / "imagesTr" / f"{case_id}_0000.nii.gz"))
        if sides == "midline":
            merged = sitk.GetImageFromArray(to_sideless(sitk.GetArrayFromImage(labels)))
            merged.CopyInformation(labels)
            labels = merged
        sitk.WriteImage(to_working_orientation(labels), str(folder / "labelsTr" / f"{case_id}.nii.gz"))
    names = SIDELESS_LABELS if sides == "midline" else CANONICAL_LABELS
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **names},
               "numTraining": len(cases), "file_ending": ".nii.gz",
               "name": "bonedrr", "description": "hip CT, canonical bonedrr labels",
               "reference": "trained by bonedrr train-segmenter", "licence": "as the cohort's data"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def find_trainer_class(name: str):
    """An nnU-Net trainer class by name: bonedrr's (``bonedrr.nnunet_trainers``) or nnU-Net's own.

    nnU-Net's own lookup (``recursive_find_trainer_class_by_name``) imports every trainer module it
    passes, Primus's among them, which needs timm and so torchvision; where torchvision cannot be
    imported (beside the pinned CPU torch) that lookup fails for every trainer it reaches after
    Primus. This walk skips modules that cannot be imported instead.

    Raises:
        ConfigError: No such trainer.
    """
    import importlib
    import pkgutil

    import nnunetv2.training.nnUNetTrainer as trainers

    import bonedrr.nnunet_trainers as ours

    for package in (ours, trainers):
        modules = [package.__name__ + "." + m.name for m in pkgutil.walk_packages(
            package.__path__, onerror=lambda _: None) if not m.ispkg]
        for module in [package.__name__] + modules:
            try:
                found = getattr(importlib.import_module(module), name, None)
            except Exception:  # an optional trainer whose extra dependencies are missing
                continue
            if isinstance(found, type):
                return found
    raise ConfigError(f"config error: nnU-Net trainer {name!r} not found (neither in bonedrr.nnunet_trainers "
                      "nor in nnunetv2.training.nnUNetTrainer)")


def train_segmenter(cases: list[tuple[str, str | Path, str | Path]], workdir: str | Path, model_out: str | Path,
                    settings: TrainSettings | None = None, keep_workdir: bool = False) -> dict:
    """Train an nnU-Net v2 model on labelled CTs; leave a standard model folder at ``model_out``.

    Args:
        cases: (case id, CT file, canonical labels on the CT's grid) of every training case.
        workdir: Folder for nnU-Net's raw, preprocessed and results folders and temporary files
            (results/<cohort>/segmenter/work in the workflow); emptied first.
        model_out: The trained model folder to write (replaced atomically).
        settings: Trainer, epochs, fold, device, plans; default nnU-Net's own.
        keep_workdir: Keep nnU-Net's raw and preprocessed data (default: delete them once the model
            folder is written; the model folder holds all that prediction needs).

    Returns:
        The training record (also ``model_out/training.json``): cases, settings, plans summary,
        seconds per phase, final losses and nnU-Net's pseudo Dice per structure.
    """
    settings = settings or TrainSettings()
    if len(cases) < 1:
        raise ConfigError("config error: no labelled case to train the segmenter on")
    fold = settings.fold if settings.fold == "all" else int(settings.fold)
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    model_out = Path(model_out)
    timings = {}
    with nnunet_environment(workdir, settings.processes) as folders:
        import torch

        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = torch_device(settings.device)
        t = time.perf_counter()
        write_raw_dataset(cases, folders["raw"], settings.sides)
        timings["raw_dataset_s"] = time.perf_counter() - t

        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset)

        t = time.perf_counter()
        with _quiet():
            extract_fingerprint_dataset(DATASET_ID, num_processes=settings.processes, check_dataset_integrity=True,
                                        clean=True, verbose=False, show_progress_bar=False)
            spacing = None if settings.target_spacing_mm is None else [float(settings.target_spacing_mm)] * 3
            _, plans_name = plan_experiment_dataset(DATASET_ID, _planner_class(settings),
                                                    overwrite_target_spacing=spacing,
                                                    overwrite_plans_name="bonedrrPlans")
            preprocess_dataset(DATASET_ID, plans_name, configurations=(settings.configuration,),
                               num_processes=[settings.processes], show_progress_bar=False)
        timings["plan_preprocess_s"] = time.perf_counter() - t

        preprocessed = folders["preprocessed"] / DATASET_NAME
        plans = json.loads((preprocessed / f"{plans_name}.json").read_text())
        dataset_json = json.loads((preprocessed / "dataset.json").read_text())
        plans["continue_training"] = False  # what nnUNetv2_train's entry point sets for a fresh run
        trainer_class = find_trainer_class(settings.trainer)
        if settings.seed is not None:
            # only now: nnU-Net's planner sets torch's threads to this number (0 is refused there)
            os.environ["nnUNet_n_proc_DA"] = "0"  # restored with the rest of the environment on exit
            random.seed(settings.seed)
            np.random.seed(settings.seed)
            torch.manual_seed(settings.seed)
        if settings.configuration not in plans["configurations"]:
            raise ConfigError(f"config error: nnU-Net planned no {settings.configuration!r} configuration for "
                              "this data set")
        trainer = trainer_class(plans=plans, configuration=settings.configuration, fold=fold, dataset_json=dataset_json,
                                device=device)
        for attribute in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch"):
            value = getattr(settings, attribute)
            if value is not None:
                setattr(trainer, {"epochs": "num_epochs", "iterations_per_epoch": "num_iterations_per_epoch",
                                  "val_iterations_per_epoch": "num_val_iterations_per_epoch"}[attribute], value)
        t = time.perf_counter()
        with _quiet():  # nnU-Net's epoch log (losses, pseudo Dice) goes to the job's log
            trainer.run_training()
        timings["training_s"] = time.perf_counter() - t
        logging_state = trainer.logger.get_checkpoint()
        trained = Path(trainer.output_folder_base)
        configuration = plans["configurations"][settings.configuration]
        record = {
            "cases": [c[0] for c in cases],
            "settings": asdict(settings),
            "nnunet": {"version": _nnunet_version(), "trainer": trainer_class.__name__, "plans": plans_name,
                       "configuration": settings.configuration, "fold": fold, "device": str(device),
                       "epochs": trainer.num_epochs, "iterations_per_epoch": trainer.num_iterations_per_epoch,
                       "spacing_mm": configuration["spacing"], "patch_size": configuration["patch_size"],
                       "batch_size": configuration["batch_size"],
                       "features_per_stage": configuration["architecture"]["arch_kwargs"]["features_per_stage"]},
            "final_train_loss": float(logging_state["train_losses"][-1]),
            "final_val_loss": float(logging_state["val_losses"][-1]),
            "pseudo_dice": dict(zip(SIDELESS_LABELS if settings.sides == "midline" else STRUCTURES,
                                    map(float, logging_state["dice_per_class_or_region"][-1]))),
            "seconds": timings,
            "model_folder": trained.name,
        }
        (trained / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        tmp = model_out.with_name(f".{model_out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(trained, tmp)
    if model_out.exists():
        shutil.rmtree(model_out)
    os.replace(tmp, model_out)
    if not keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("trained %s on %d cases in %.0f s; pseudo Dice %s", record["nnunet"]["trainer"], len(cases),
             sum(timings.values()), {k: round(v, 3) for k, v in record["pseudo_dice"].items()})
    return record


def copy_progress_png(model_dir: str | Path, record: dict, out: str | Path) -> None:
    """nnU-Net's training curves (``fold_X/progress.png``: losses, pseudo Dice, learning rate), copied."""
    source = Path(model_dir) / f"fold_{record['nnunet']['fold']}" / "progress.png"
    if not source.is_file():
        raise InputError("nnU-Net wrote no progress.png", source.parent)
    with atomic_path(out) as tmp:
        shutil.copyfile(source, tmp)


@contextlib.contextmanager
def _quiet():
    """nnU-Net prints its plans and progress to stdout; send them to stderr (the job's log)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


# ----------------------------------------------------------------------------------------------------
# Prediction


def resolve_mapping(preset: str | dict, model_dir: str | Path | None = None) -> dict[int, str]:
    """Model label id -> canonical name, from a preset name or a custom mapping.

    Raises:
        ConfigError: Unknown preset, or a custom mapping naming a label that is not canonical.
    """
    if isinstance(preset, dict):
        mapping = {int(k): v for k, v in preset.items()}
    elif preset in PRESETS:
        mapping = PRESETS[preset]
    else:
        raise ConfigError(f"config error: unknown label preset {preset!r} (choose from {', '.join(PRESETS)} "
                          "or give a {model id: canonical name} mapping)")
    bad = sorted({v for v in mapping.values() if v not in CANONICAL_LABELS})
    if bad:
        raise ConfigError(f"config error: label mapping names {', '.join(bad)}, which are not canonical labels")
    return mapping


def load_predictor(model_dir: str | Path, fold: str | int = "all", device: str = "auto",
                   checkpoint: str = "checkpoint_final.pth", mirroring: bool = True):
    """nnU-Net's own predictor, initialised from a trained model folder.

    Raises:
        InputError: The folder is not an nnU-Net v2 model folder, or lacks the fold's checkpoint.
    """
    import torch

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model_dir = Path(model_dir)
    for required in ("plans.json", "dataset.json"):
        if not (model_dir / required).is_file():
            raise InputError(f"not an nnU-Net v2 model folder (no {required})", model_dir)
    fold = fold if fold == "all" else int(fold)
    if not (model_dir / f"fold_{fold}" / checkpoint).is_file():
        raise InputError(f"no fold_{fold}/{checkpoint} in the model folder", model_dir)
    torch_dev = torch_device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=torch_dev.type == "cuda", device=torch_dev,
                                verbose=False, allow_tqdm=False)
    # What initialize_from_trained_model_folder does, with bonedrr's trainer lookup (find_trainer_class).
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((model_dir / "plans.json").read_text()))
    state = torch.load(model_dir / f"fold_{fold}" / checkpoint, map_location="cpu", weights_only=False)
    configuration = plans_manager.get_configuration(state["init_args"]["configuration"])
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = find_trainer_class(state["trainer_name"]).build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        label_manager.num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(state["network_weights"])
    with _quiet():
        predictor.manual_initialization(network, plans_manager, configuration, [state["network_weights"]],
                                        dataset_json, state["trainer_name"],
                                        state.get("inference_allowed_mirroring_axes"))
    return predictor


def predict_labels(predictor, ct: sitk.Image, mapping: dict[int, str]) -> sitk.Image:
    """One CT through the predictor: canonical labels (uint8) on the CT's own grid.

    A model trained with ``sides: midline`` is recognised by its dataset.json and split at the midline;
    any other model's ids are mapped by ``mapping``.
    """
    working = to_working_orientation(ct)
    array = sitk.GetArrayFromImage(sitk.Cast(working, sitk.sitkFloat32))[None]
    spacing_zyx = list(working.GetSpacing())[::-1]
    with _quiet():
        model_ids = predictor.predict_single_npy_array(array, {"spacing": spacing_zyx})
    del array
    model_ids = np.asarray(model_ids)
    if is_sideless(predictor.dataset_json):
        from bonedrr.images import world_axis_grid

        canonical = split_at_midline(model_ids.astype(np.uint8), world_axis_grid(working, 0))
    else:
        canonical = remap(model_ids, mapping)
    canonical = keep_largest_components(canonical)
    labels = sitk.GetImageFromArray(canonical)
    labels.CopyInformation(working)
    return back_to_grid(labels, ct)


#: Structures that are one connected body each: a prediction keeps only its largest component.
SINGLE_BODIES = tuple(name for name in CANONICAL_LABELS if name.endswith(("_left", "_right")))


def keep_largest_components(labels: np.ndarray, names=SINGLE_BODIES) -> np.ndarray:
    """Background for every voxel of ``names`` outside that structure's largest connected component.

    A network's prediction has a few stray voxels of a label far from the structure (one or two voxels
    of "femur" in the spine), and the femoral head is found at the femur's most superior voxel: one
    stray voxel there would move the head, the proximal-femur region and the hip crop by decimetres.
    Each femur, hemipelvis and muscle is one body, so its largest component (26-connected) is kept
    (nnU-Net's own post-processing does the same where its cross-validation finds it helps).

    Example:
        >>> lab = np.zeros((1, 1, 9), np.uint8)
        >>> lab[0, 0, [0, 1, 2, 6]] = CANONICAL_LABELS["femur_left"]
        >>> (keep_largest_components(lab) > 0).astype(int).tolist()
        [[[1, 1, 1, 0, 0, 0, 0, 0, 0]]]
    """
    out = labels.copy()
    structure = ndimage.generate_binary_structure(3, 3)
    for name in names:
        mask = labels == CANONICAL_LABELS[name]
        if not mask.any():
            continue
        components, n = ndimage.label(mask, structure)
        if n > 1:
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            out[mask & (components != largest)] = 0
    return out


def is_sideless(dataset_json: dict) -> bool:
    """True for a model trained with ``sides: midline`` (its dataset.json names side-less structures)."""
    return dataset_json.get("labels", {}).get("femur") == SIDELESS_LABELS["femur"]


def to_sideless(labels: np.ndarray) -> np.ndarray:
    """Canonical labels -> :data:`SIDELESS_LABELS` ids (left and right merged)."""
    lut = np.zeros(max(LABEL_NAMES) + 1, np.uint8)
    for name, i in CANONICAL_LABELS.items():
        base = name.removesuffix("_left").removesuffix("_right")
        lut[i] = SIDELESS_LABELS[base]
    return lut[labels]


def split_at_midline(sideless: np.ndarray, x_lps: np.ndarray) -> np.ndarray:
    """Side-less labels -> canonical labels, left where LPS x lies left of the body's midline.

    The midline is the sagittal plane through the centroid (along LPS x) of the hemipelves (``hip``),
    which lie symmetric about it; without them, of every labelled voxel. LPS x grows to the patient's
    left.

    Example:
        >>> s = np.array([[[1, 1, 0, 2, 2, 1]]], np.uint8)  # femur, hip
        >>> split_at_midline(s, np.arange(6.0)[None, None, :]).tolist()
        [[[2, 2, 0, 4, 3, 1]]]
    """
    x = np.broadcast_to(x_lps, sideless.shape)
    hips = sideless == SIDELESS_LABELS["hip"]
    basis = hips if hips.any() else sideless > 0
    midline = float(x[basis].mean()) if basis.any() else 0.0
    left = x > midline
    out = np.zeros(sideless.shape, np.uint8)
    for base, i in SIDELESS_LABELS.items():
        mask = sideless == i
        if base == "other_bone":
            out[mask] = CANONICAL_LABELS["other_bone"]
            continue
        out[mask & left] = CANONICAL_LABELS[f"{base}_left"]
        out[mask & ~left] = CANONICAL_LABELS[f"{base}_right"]
    return out


def volumes_cm3(labels: np.ndarray, spacing_mm) -> dict[str, float]:
    """Volume of every canonical structure, cm3."""
    counts = np.bincount(labels.ravel(), minlength=max(LABEL_NAMES) + 1)
    voxel_cm3 = float(np.prod(spacing_mm)) / 1000.0
    return {name: float(counts[i] * voxel_cm3) for name, i in CANONICAL_LABELS.items()}


def check_plausible(volumes: dict[str, float], side: str = "both",
                    ranges: dict[str, tuple[float, float]] | None = None,
                    median_hu: dict[str, float] | None = None) -> None:
    """Raise if a segmentation cannot be measured: empty, a bone missing on a measured side, a bone
    volume outside its plausible range, or a bone whose voxels are not bone (median below
    :data:`MIN_BONE_MEDIAN_HU`: a model that paints bone into air or soft tissue).

    Args:
        volumes: :func:`volumes_cm3` of the segmentation.
        side: ``left``, ``right`` or ``both``: the hips the case is measured on.
        ranges: ``{"femur": (lo, hi), "hip": (lo, hi)}`` in cm3 (default :data:`PLAUSIBLE_VOLUME_CM3`).
        median_hu: Median CT value of each structure's voxels (:func:`median_hu_of`; None: not checked).

    Raises:
        InputError: Without a path (the caller adds the CT's).

    Example:
        >>> v = dict.fromkeys(CANONICAL_LABELS, 0.0)
        >>> try:
        ...     check_plausible(v)
        ... except InputError as e:
        ...     print(e)
        segmentation is empty: no canonical structure was found
    """
    ranges = {**PLAUSIBLE_VOLUME_CM3, **(ranges or {})}
    if not any(v > 0 for v in volumes.values()):
        raise InputError("segmentation is empty: no canonical structure was found")
    for s in (SIDES if side == "both" else (side,)):
        for bone in ("femur", "hip"):
            name = f"{bone}_{s}"
            lo, hi = ranges[bone]
            if volumes[name] == 0:
                raise InputError(f"segmentation has no {name} (the case is measured on side {side!r})")
            if not lo <= volumes[name] <= hi:
                raise InputError(f"segmentation's {name} is {volumes[name]:.1f} cm3, outside the plausible "
                                 f"range {lo:g}-{hi:g} cm3")
            if median_hu is not None and median_hu[name] < MIN_BONE_MEDIAN_HU:
                raise InputError(f"segmentation's {name} has a median of {median_hu[name]:.0f} HU, below "
                                 f"{MIN_BONE_MEDIAN_HU:g} HU: not bone")


def median_hu_of(labels: np.ndarray, ct_hu: np.ndarray) -> dict[str, float]:
    """Median CT value (HU) of each canonical structure's voxels (NaN where it is absent)."""
    return {name: float(np.median(ct_hu[labels == value])) if (labels == value).any() else math.nan
            for name, value in CANONICAL_LABELS.items()}


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def compare_labels(predicted: np.ndarray, reference: np.ndarray, spacing_zyx) -> dict[str, dict]:
    """Dice and symmetric surface distances (mean and 95th percentile, mm) per canonical structure.

    A structure absent from both is left out; absent from one of them it has Dice 0 and no distance.

    Example:
        >>> a = np.zeros((1, 4, 4), np.uint8); a[0, :2, :2] = 1
        >>> b = a.copy(); b[0, 2, 0] = 1
        >>> round(compare_labels(b, a, (1, 1, 1))["femur_left"]["dice"], 3)
        0.889
    """
    out = {}
    for name, i in CANONICAL_LABELS.items():
        p, r = predicted == i, reference == i
        np_, nr = int(p.sum()), int(r.sum())
        if np_ == 0 and nr == 0:
            continue
        dice = 2.0 * float((p & r).sum()) / (np_ + nr)
        entry = {"dice": dice, "assd_mm": None, "hd95_mm": None, "volume_ratio": np_ / nr if nr else None}
        if np_ and nr:
            sp, sr = _surface(p), _surface(r)
            to_r = ndimage.distance_transform_edt(~sr, sampling=spacing_zyx)[sp]
            to_p = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)[sr]
            both = np.concatenate([to_r, to_p])
            entry["assd_mm"] = float(both.mean())
            entry["hd95_mm"] = float(np.percentile(both, 95))
        out[name] = entry
    return out


def segment_case(ct_path: str | Path, model_dir: str | Path, out_labels: str | Path, *,
                 preset: str | dict = "canonical", fold: str | int = "all", device: str = "auto",
                 side: str = "both", reference: str | Path | None = None, reference_preset: str | dict | None = None,
                 plausible_volume_cm3: dict | None = None, record_path: str | Path | None = None,
                 overlay: str | Path | None = None, use_reference_downstream: bool = False,
                 threads: int | None = None, split: str | None = None) -> dict:
    """Segment one CT: canonical labels.nii.gz, a record (volumes, checks, Dice), an overlay picture.

    Args:
        ct_path: The ingested ct.nii.gz (HU).
        model_dir: An nnU-Net v2 trained model folder.
        out_labels: labels.nii.gz to write.
        preset: Label mapping of the model (:func:`resolve_mapping`).
        fold: The model's fold to use (``all`` or 0-4).
        device: ``auto``, ``cpu`` or ``cuda``.
        side: The case's measured side(s) (``case.json``), for the plausibility check.
        reference: Reference labels on the CT's grid for Dice and surface distances.
        reference_preset: Mapping of the reference's ids (default: they are canonical).
        plausible_volume_cm3: Overrides of :data:`PLAUSIBLE_VOLUME_CM3`.
        record_path: segmentation.json to write.
        overlay: segmentation.png to write.
        use_reference_downstream: Write the reference (not the prediction) as ``out_labels`` when there
            is one (the prediction is still made, measured and checked; an implausible prediction is
            then recorded and logged, and the reference is what must pass the checks).
        threads: torch CPU threads (default: torch's).
        split: ``train`` or ``test``: whether the case trained the model (recorded for the summary).

    Returns:
        The record written to ``record_path``.

    Raises:
        InputError: Unreadable CT or model folder, or an implausible segmentation (naming the CT).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    ct = read_volume(ct_path)
    mapping = resolve_mapping(preset)
    workdir = Path(out_labels).parent / ".segment-tmp"
    t0 = time.perf_counter()
    with nnunet_environment(workdir):
        predictor = load_predictor(model_dir, fold, device)
        t1 = time.perf_counter()
        labels = predict_labels(predictor, ct, mapping)
        t2 = time.perf_counter()
    shutil.rmtree(workdir, ignore_errors=True)
    array = sitk.GetArrayFromImage(labels)
    volumes = volumes_cm3(array, ct.GetSpacing())
    record = {"model": Path(model_dir).name, "fold": fold, "device": str(predictor.device), "side": side,
              "split": split, "labels_downstream": "predicted",
              "seconds": {"load_model": t1 - t0, "inference": t2 - t1},
              "volumes_cm3": volumes, "plausible": True, "problem": None, "metrics": None}
    ref_array = None
    if reference is not None:
        if reference_preset is None:
            from bonedrr.ingest import read_labels

            ref_array = sitk.GetArrayFromImage(read_labels(reference, ct))  # grid and ids checked
        else:
            ref_array = remap(sitk.GetArrayFromImage(read_volume(reference)), resolve_mapping(reference_preset))
            if ref_array.shape != array.shape:
                raise InputError(f"reference labels {ref_array.shape[::-1]} are not on the CT's grid "
                                 f"{array.shape[::-1]}", reference)
        record["metrics"] = compare_labels(array, ref_array, ct.GetSpacing()[::-1])
    try:
        check_plausible(volumes, side, plausible_volume_cm3, median_hu_of(array, sitk.GetArrayViewFromImage(ct)))
    except InputError as e:
        record.update(plausible=False, problem=e.message)
    downstream_is_reference = use_reference_downstream and ref_array is not None
    if downstream_is_reference:
        record["labels_downstream"] = "reference"
        labels = sitk.GetImageFromArray(ref_array.astype(np.uint8))
        labels.CopyInformation(ct)
        if record["problem"]:
            log.warning("the prediction is implausible (%s), but the reference labels go downstream", record["problem"])
    if overlay:
        overlay_png(ct, array, overlay, title=_overlay_title(Path(ct_path).parent.name, record), reference=ref_array)
    if record_path:
        write_json(record_path, record)
    if downstream_is_reference:  # what goes downstream must be plausible
        check_plausible(volumes_cm3(ref_array, ct.GetSpacing()), side, plausible_volume_cm3)
    elif record["problem"]:
        raise InputError(record["problem"], ct_path)
    write_image(sitk.Cast(labels, sitk.sitkUInt8), out_labels)
    log.info("segmented %s in %.1f s (%s): femur L/R %.0f/%.0f cm3, hip L/R %.0f/%.0f cm3%s", ct_path,
             t2 - t1, record["device"], volumes["femur_left"], volumes["femur_right"], volumes["hip_left"],
             volumes["hip_right"], "" if record["metrics"] is None else "; Dice " + ", ".join(
                 f"{k} {v['dice']:.3f}" for k, v in record["metrics"].items() if k.startswith(("femur", "hip"))))
    return record


def _overlay_title(case: str, record: dict) -> str:
    title = f"{case}: {record['device']}, {record['seconds']['inference']:.1f} s"
    if record["metrics"]:
        dice = [record["metrics"][k]["dice"] for k in ("femur_left", "femur_right", "hip_left", "hip_right")
                if k in record["metrics"]]
        title += f"; Dice femur/hip mean {np.mean(dice):.3f}"
    if record["problem"]:
        title += (f"\nprediction implausible ({record['problem']}); the reference labels go downstream"
                  if record["labels_downstream"] == "reference" else f"\nREJECTED: {record['problem']}")
    return title


# ----------------------------------------------------------------------------------------------------
# Pictures and the cohort summary

_COLOURS = {"femur": "#e41a1c", "hip": "#377eb8", "gluteus_maximus": "#4daf4a", "gluteus_medius": "#984ea3",
            "gluteus_minimus": "#ff7f00", "iliopsoas": "#a65628", "other_bone": "#f781bf"}


def _colour(name: str) -> str:
    return next(c for k, c in _COLOURS.items() if name.startswith(k))


def overlay_png(ct: sitk.Image, labels: np.ndarray, path: str | Path, title: str = "",
                reference: np.ndarray | None = None) -> None:
    """Coronal and axial CT slices through the femoral heads with label contours (reference: dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hu = sitk.GetArrayFromImage(sitk.DICOMOrient(ct, "LPS")).astype(np.float32)  # [S.., P.., L..] axes
    lab = sitk.GetArrayFromImage(sitk.DICOMOrient(_image_like(labels, ct), "LPS"))
    ref = None if reference is None else sitk.GetArrayFromImage(sitk.DICOMOrient(_image_like(reference, ct), "LPS"))
    sx, sy, sz = sitk.DICOMOrient(ct, "LPS").GetSpacing()
    femurs = np.isin(lab, [CANONICAL_LABELS["femur_left"], CANONICAL_LABELS["femur_right"]])
    bone = femurs if femurs.any() else lab > 0
    if bone.any():
        k, j, _ = (int(round(c)) for c in ndimage.center_of_mass(bone))
        k = int(np.nonzero(bone.any(axis=(1, 2)))[0].max()) - max(1, int(round(20 / sz)))  # 2 cm below the top
        k = max(k, 0)
    else:
        k, j = hu.shape[0] // 2, hu.shape[1] // 2
    # Display: patient right on the image's left (radiological convention): LPS x grows to the left.
    views = [("coronal", hu[::-1, j, :], lab[::-1, j, :], None if ref is None else ref[::-1, j, :], sz / sx),
             ("axial", hu[k], lab[k], None if ref is None else ref[k], sy / sx)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    for ax, (name, img, l2, r2, aspect) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=-250, vmax=1250, aspect=aspect, interpolation="nearest")
        for label_name, i in CANONICAL_LABELS.items():
            if (l2 == i).any():
                ax.contour(l2 == i, levels=[0.5], colors=_colour(label_name), linewidths=1.0)
            if r2 is not None and (r2 == i).any():
                ax.contour(r2 == i, levels=[0.5], colors=_colour(label_name), linewidths=0.7, linestyles="dashed")
        ax.set_title(f"{name} (patient right on the left)", fontsize=9)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in _COLOURS.items()]
    if reference is not None:
        handles.append(plt.Line2D([], [], color="k", linestyle="dashed", label="reference"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _image_like(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(grid)
    return image


def segmentation_summary(case_dirs: list[str | Path], out_tsv: str | Path, out_png: str | Path) -> list[dict]:
    """A cohort's segmentations in one table (one row per case) and a Dice picture per structure.

    Columns: case_id, split (train/test), device, inference seconds, volumes of the femurs and
    hemipelves, then ``dice_<structure>`` and ``assd_mm_<structure>`` for every structure with a
    reference. The picture shows each structure's Dice over the held-out (test) and training cases.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for d in map(Path, case_dirs):
        record = json.loads((d / "segmentation.json").read_text())
        row = {"case_id": d.name, "split": record.get("split") or "", "device": record["device"],
               "inference_s": f"{record['seconds']['inference']:.2f}",
               "labels_downstream": record.get("labels_downstream", "predicted")}
        for name in ("femur_left", "femur_right", "hip_left", "hip_right"):
            row[f"volume_cm3_{name}"] = f"{record['volumes_cm3'][name]:.1f}"
        for name in STRUCTURES:
            m = (record.get("metrics") or {}).get(name)
            row[f"dice_{name}"] = "" if m is None else f"{m['dice']:.4f}"
            row[f"assd_mm_{name}"] = "" if m is None or m["assd_mm"] is None else f"{m['assd_mm']:.2f}"
        rows.append(row)
    header = list(rows[0]) if rows else ["case_id"]
    with atomic_path(out_tsv) as tmp:
        tmp.write_text("\t".join(header) + "\n" + "".join("\t".join(str(r[h]) for h in header) + "\n" for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for offset, split, colour in ((-0.15, "test", "#1f77b4"), (0.15, "train", "#bbbbbb")):
        for x, name in enumerate(STRUCTURES):
            values = [float(r[f"dice_{name}"]) for r in rows if r["split"] == split and r[f"dice_{name}"]]
            if values:
                ax.scatter(np.full(len(values), x + offset), values, s=12, color=colour,
                           label=f"{split} cases" if x == 0 else None)
                ax.plot([x + offset - 0.1, x + offset + 0.1], [np.median(values)] * 2, color="k", lw=1.5)
    ax.axhline(0.9, color="r", lw=0.8, ls=":")
    ax.set_xticks(range(len(STRUCTURES)), STRUCTURES, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("Dice vs reference")
    ax.set_ylim(max(0.0, min([0.8] + [float(r[f"dice_{n}"]) for r in rows for n in STRUCTURES
                                       if r[f"dice_{n}"]]) - 0.02), 1.0)
    n_test = sum(r["split"] == "test" for r in rows)
    ax.set_title(f"Segmentation against reference labels: {n_test} held-out, {len(rows) - n_test} training cases "
                 "(bar: median; dotted: 0.90)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return rows
