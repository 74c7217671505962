"""The decomposition model: network, losses, augmentation, training (reproducible, resumable), and
`bonedrr estimate` on real demo radiographs (DICOM and PNG) with a model trained on real shards."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bonedrr.bmd import drr_bmd
from bonedrr.errors import BonedrrError, InputError
from bonedrr.model.augment import AugmentSettings, RandomAugment, affine, affine_matrix, shift_matrix
from bonedrr.model.losses import gc_loss, gradient_correlation
from bonedrr.model.network import PatchDiscriminator, UNet
from bonedrr.register import gradient_correlation as register_gc
from bonedrr.train import CHECKPOINT_FILE, MODEL_FILE, Stage, TrainSettings, load_model, train_model

from conftest import REPO
from synthetic_shards import SyntheticShards

PHANTOM = {"method": "phantom", "phantom_rods_mg_cm3": [0, 100, 200, 400, 800]}
TINY = TrainSettings(stages=(Stage(("pelvis", "femur", "bone"), 2), Stage(("proximal_femur",), 2)), batch_size=4,
                     base_channels=4, depth=2, locator_epochs=1, locator_base_channels=4, seed=3)


@pytest.fixture(autouse=True)
def one_thread():
    """Weights are reproducible for a fixed thread count; one thread also keeps a busy CI machine fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_unet_and_discriminator_shapes():
    for depth, shape in ((2, (32, 16)), (3, (128, 64)), (4, (128, 256))):
        net = UNet(1, 5, base_channels=4, depth=depth)
        assert net(torch.rand(2, 1, *shape) * 4000).shape == (2, 5, *shape)
    d = PatchDiscriminator(1 + 3, base_channels=4, layers=3)
    assert d(torch.rand(2, 1, 128, 64), torch.rand(2, 3, 128, 64)).shape == (2, 1, 16, 8)


def test_input_normalisation_makes_exposure_irrelevant():
    net = UNet(1, 2, base_channels=4, depth=2).eval()
    x = torch.rand(1, 1, 32, 16)
    with torch.no_grad():
        a, b = net(x), net(x * 3700.0 + 120.0)
    assert torch.allclose(a, b, atol=1e-4)
    # a crop reaching beyond the radiograph (zero padded, as the shards store it) keeps the scale of
    # the pixels that are inside
    from bonedrr.model.network import RobustNormalise

    image = torch.rand(1, 1, 64, 32) * 1000 + 500
    padded = image.clone()
    padded[..., 40:, :] = 0
    norm = RobustNormalise()
    inside_only = RobustNormalise()(image[..., :40, :])
    assert torch.allclose(norm(padded)[..., :40, :], inside_only, atol=1e-5)


def test_the_whole_radiograph_scale_keeps_bone_density_and_follows_the_exposure():
    """With the overview's scale, a denser bone gives a brighter input; with the crop's own range it
    would not (its brightest pixels are that bone); an exposure change moves image and scale alike."""
    from bonedrr.model.augment import adjust_intensity
    from bonedrr.model.network import RobustNormalise, overview_scale

    body = torch.linspace(100.0, 1100.0, 30000)
    overview = torch.cat([body, torch.zeros(128 * 256 - 30000)]).reshape(1, 1, 128, 256)  # with air at 0
    scale = overview_scale(overview)
    assert scale[0].tolist() == pytest.approx([110.0, 600.0], abs=0.1)  # the body's 1st and 50th percentile
    # air a little above 0 (a JPEG of it), and more padding (a letterboxed overview): the same scale
    jpeg_air = torch.cat([body, torch.randint(0, 4, (128 * 256 - 30000,)).float()])[None]
    padded = torch.cat([body, torch.zeros(20000)])[None]
    for other in (jpeg_air, padded):
        assert overview_scale(other)[0].tolist() == pytest.approx([110.0, 600.0], abs=0.1)
    soft = torch.full((1, 1, 32, 16), 500.0)
    thin, dense = soft.clone(), soft.clone()
    thin[..., 8:24, 4:12], dense[..., 8:24, 4:12] = 700.0, 900.0  # the same bone, 2x its density
    norm = RobustNormalise()
    bone = (slice(None), slice(None), slice(8, 24), slice(4, 12))
    span = float(scale[0, 1] - scale[0, 0])
    assert float(norm(dense, scale)[bone].mean() - norm(thin, scale)[bone].mean()) == pytest.approx(200 / span, rel=1e-4)
    assert float(norm(dense)[bone].mean()) == pytest.approx(float(norm(thin)[bone].mean()))  # crop range: lost
    # an exposure change (gain 2.5, offset 0.3 of the crop's range) moves the scale with the image
    x = dense.clone()
    x[..., :4, :] = 0  # padding stays padding
    one, none = torch.ones(1), torch.zeros(1)
    moved, moved_scale = adjust_intensity(x, one, one, none, torch.tensor([2.5]), torch.tensor([0.3]), scale=scale)
    inside = x != 0
    assert torch.allclose(norm(moved, moved_scale)[inside], norm(x, scale)[inside], atol=1e-4)
    assert bool((moved[~inside] == 0).all())


def test_tone_augmentation_changes_a_crop_as_its_whole_radiograph():
    """A tone curve anchored on the whole radiograph (as a DX workstation's) cut to the crop is the crop's
    augmentation; the input scale then follows from the overview changed alike. Anchored on the crop's
    own range (the old way), the crop's bone would come out differently."""
    from bonedrr.model.augment import RandomAugment, adjust_intensity, tone_anchor
    from bonedrr.model.network import RobustNormalise, overview_scale

    rng = np.random.default_rng(2)
    whole = np.concatenate([rng.uniform(300, 900, (64, 200)), np.zeros((64, 56))], 1)  # body, then padding
    whole[20:40, 30:45] += 1500  # a bone
    whole = torch.tensor(whole, dtype=torch.float32)[None, None]
    crop = whole[..., 12:44, 25:41]
    g, c, gain, offset = 1.3, 1.2, 1.5, 0.1
    lo, hi = np.quantile(whole[whole != 0].numpy(), [0.01, 0.99])
    u = np.clip((whole.numpy() - lo) / (hi - lo), 0, 1.5) ** g
    processed = ((0.5 + (u - 0.5) * c) * (hi - lo) + lo) * gain + offset * (hi - lo)
    processed = torch.from_numpy(np.where(whole.numpy() != 0, processed, 0).astype(np.float32))
    args = (torch.tensor([g]), torch.tensor([c]), torch.zeros(1), torch.tensor([gain]), torch.tensor([offset]))
    anchored = adjust_intensity(crop, *args, anchor=tone_anchor(whole))
    torch.testing.assert_close(anchored, processed[..., 12:44, 25:41], rtol=1e-4, atol=1e-2)
    own = adjust_intensity(crop, *args)
    assert float((own - anchored).abs().max()) > 100.0
    # RandomAugment with the overview: the crop and the overview change alike (no geometry, no noise)
    settings = AugmentSettings(rotate_deg=0, scale=0, shift=0, gamma=0.4, contrast=0.3, noise=0)
    xray, _, overview = RandomAugment(settings, torch.Generator().manual_seed(0))(crop, crop.clone(), overview=whole)
    norm = RobustNormalise()
    torch.testing.assert_close(norm(xray, overview_scale(overview)),
                               norm(overview[..., 12:44, 25:41], overview_scale(overview)), rtol=1e-4, atol=1e-4)


def test_gradient_correlation_equals_the_registration_similarity(real_ct):
    ct = sitk.GetArrayFromImage(real_ct).astype(np.float64)
    pairs = [(ct[10], ct[12]), (ct[20], ct[40]), (ct[:, 30], ct[:, 31] * 2 + 5), (ct[30], ct[30] ** 2)]
    for a, b in pairs:
        expected = register_gc(a, b)
        got = float(gradient_correlation(torch.tensor(a)[None, None], torch.tensor(b)[None, None]))
        assert got == pytest.approx(expected, abs=2e-5)
    a, b = pairs[0]
    assert float(gc_loss(torch.tensor(a)[None, None], torch.tensor(a)[None, None])) == pytest.approx(0, abs=1e-6)


def test_known_affine_moves_input_and_target_identically():
    rng = np.random.default_rng(1)
    image = torch.tensor(rng.random((32, 32)), dtype=torch.float32)[None, None]
    # deterministic twin: an integer shift and a quarter turn are exact pixel moves
    moved = affine(image, shift_matrix(torch.tensor([[3.0, -2.0]]), (32, 32)))
    assert torch.allclose(moved[0, 0, 3:, :30], image[0, 0, :29, 2:], atol=1e-5)
    turned = affine(image, affine_matrix(torch.tensor([90.0]), torch.tensor([1.0]), torch.zeros(1, 2), (32, 32)))
    assert torch.allclose(turned, torch.rot90(image, 1, (2, 3)), atol=1e-5)
    # random draw: geometry shared by radiograph and targets; intensity changes only the radiograph
    xray = image * 1000
    targets = torch.cat([image, 2 * image, torch.ones_like(image)], 1)  # the last: where the image still is
    s = AugmentSettings(rotate_deg=10, scale=0.1, shift=0.1, gamma=0, contrast=0, noise=0)
    ax, at = RandomAugment(s, torch.Generator().manual_seed(5))(xray, targets)
    assert not torch.allclose(at[:, :1], image, atol=1e-2)  # it did move
    assert torch.allclose(at[:, 1], 2 * at[:, 0], atol=1e-6)
    # inside the moved image (and above the 1 % level the intensity step clips at), the radiograph is
    # gain x target + offset: the same pixels went to the same places
    inside = ((at[:, 2] > 0.9999) & (at[:, 0] > 0.05)).flatten().numpy()
    assert inside.sum() > 500
    corr = np.corrcoef(ax.flatten().numpy()[inside], at[:, 0].flatten().numpy()[inside])[0, 1]
    assert corr == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(ax, at[:, :1] * 1000, atol=1.0)  # but at another exposure
    # with intensity augmentation the radiograph's tone curve changes, the targets do not
    s2 = AugmentSettings(rotate_deg=10, scale=0.1, shift=0.1, gamma=0.5, contrast=0.3, noise=0.05)
    ax2, at2 = RandomAugment(s2, torch.Generator().manual_seed(5))(xray, targets)
    assert torch.allclose(at2, at, atol=1e-6)


def _state(model):
    return {f"{i}.{k}": v for i, n in enumerate(model.stage_nets + [model.locator]) if n is not None
            for k, v in n.state_dict().items()}


def test_jpeg_augmentation_is_the_last_intensity_step_and_keeps_the_padding():
    from bonedrr.model.augment import jpeg_compress

    torch.manual_seed(0)
    x = torch.rand(3, 1, 64, 32) * 800 + 200
    x[:, :, :, :6] = 0  # beyond the radiograph
    t = torch.rand(3, 2, 64, 32)
    strong = jpeg_compress(x, torch.tensor([5, 5, 0]))
    mild = jpeg_compress(x, torch.tensor([95, 95, 95]))
    assert torch.equal(strong[2], x[2]) and (strong[:, :, :, :6] == 0).all()
    body = x[:, :, :, 6:]
    err_strong, err_mild = ((strong - x)[:2, :, :, 6:]).abs().mean(), ((mild - x)[:, :, :, 6:]).abs().mean()
    assert err_mild < 0.3 * err_strong and err_strong > 0.02 * (body.max() - body.min())
    plain = RandomAugment(AugmentSettings(), torch.Generator().manual_seed(7))(x, t)
    lossy = RandomAugment(AugmentSettings(jpeg=1.0, jpeg_quality=(5, 5)), torch.Generator().manual_seed(7))(x, t)
    assert torch.equal(lossy[1], plain[1])  # targets untouched
    assert torch.allclose(lossy[0], jpeg_compress(plain[0], torch.tensor([5, 5, 5])))
    with pytest.raises(BonedrrError, match=r"jpeg_quality must be \[lowest, highest\] within 1-95, not \[50, 10\]"):
        AugmentSettings(jpeg=0.5, jpeg_quality=[50, 10])


def test_unsharp_augmentation_is_scipys_inside_and_leaves_the_padding_alone():
    from scipy import ndimage

    from bonedrr.model.augment import unsharp_mask

    torch.manual_seed(1)
    x = torch.rand(2, 1, 48, 40, dtype=torch.float64) * 500 + 100
    x[1, :, :, :10] = 0  # beyond the radiograph
    y = unsharp_mask(x, torch.tensor([0.6, 0.6], dtype=torch.float64), torch.tensor([2.0, 2.0]))
    ref = x[0, 0].numpy() + 0.6 * (x[0, 0].numpy() - ndimage.gaussian_filter(x[0, 0].numpy(), 2.0, truncate=3.0))
    np.testing.assert_allclose(y[0, 0, 6:-6, 6:-6].numpy(), ref[6:-6, 6:-6], rtol=1e-9)
    assert (y[1, :, :, :10] == 0).all()
    flat = torch.full((1, 1, 32, 32), 700.0, dtype=torch.float64)
    flat[..., :8] = 0
    # a uniform radiograph next to padding: no halo at its border
    np.testing.assert_allclose(unsharp_mask(flat, torch.tensor([1.0]), torch.tensor([4.0]))[..., 8:], 700.0)
    assert torch.equal(unsharp_mask(x, torch.tensor([0.0, 0.0]), torch.tensor([2.0, 2.0])), x)
    t = torch.rand(2, 2, 48, 40)
    a = RandomAugment(AugmentSettings(unsharp=0.8), torch.Generator().manual_seed(2))(x.float(), t)
    b = RandomAugment(AugmentSettings(), torch.Generator().manual_seed(2))(x.float(), t)
    assert torch.equal(a[1], b[1]) and not torch.allclose(a[0], b[0])
    with pytest.raises(BonedrrError, match=r"unsharp_sigma_px must be \[smallest, largest\] above 0, not \[0.0, 3.0\]"):
        AugmentSettings(unsharp=0.5, unsharp_sigma_px=(0, 3))


def test_seeded_training_is_reproducible_and_resume_gives_the_same_weights(tmp_path):
    data = SyntheticShards(8, (32, 16), seed=2)
    a = train_model(None, tmp_path / "a", TINY, dataset=data, progress=False)
    b = train_model(None, tmp_path / "b", TINY, dataset=data, progress=False)
    # killed inside stage 2 (after 3 epochs), then started again
    assert train_model(None, tmp_path / "c", TINY, dataset=data, stop_after_epochs=3, progress=False) is None
    assert (tmp_path / "c" / CHECKPOINT_FILE).is_file() and not (tmp_path / "c" / MODEL_FILE).exists()
    c = train_model(None, tmp_path / "c", TINY, dataset=data, progress=False)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    log = (tmp_path / "c" / "train_log.tsv").read_text().splitlines()
    assert len(log) == 1 + 2 + 2 + 1 and log[0].startswith("phase\tepoch\tloss")
    # another seed, other weights
    d = train_model(None, tmp_path / "d", TrainSettings(**{**TINY.__dict__, "seed": 4, "locator_epochs": 0}),
                    dataset=data, progress=False)
    assert not torch.equal(d.stage_nets[0].head.weight, a.stage_nets[0].head.weight)


def test_moving_average_weights_are_kept_and_resumed(tmp_path):
    """With ema, the model keeps the average: not the last step's weights, the same after a kill and
    a resume (the checkpoint holds it), and with ema 0 the last step's weights as before."""
    data = SyntheticShards(8, (32, 16), seed=2)
    settings = TrainSettings(**{**TINY.__dict__, "ema": 0.8})  # with the locator phase, which has no average
    a = train_model(None, tmp_path / "a", settings, dataset=data, progress=False)
    assert train_model(None, tmp_path / "b", settings, dataset=data, stop_after_epochs=3, progress=False) is None
    b = train_model(None, tmp_path / "b", settings, dataset=data, progress=False)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    last = torch.load(tmp_path / "a" / CHECKPOINT_FILE, weights_only=True)["nets"][1]
    assert float((last["head.weight"] - a.stage_nets[1].head.weight).abs().max()) > 1e-4
    torch.testing.assert_close(torch.load(tmp_path / "a" / CHECKPOINT_FILE, weights_only=True)["averages"][1]["head.weight"],
                               a.stage_nets[1].head.weight)
    with pytest.raises(BonedrrError, match=r"train ema must be in \[0, 1\), not 1.0"):
        TrainSettings.from_config({"ema": 1.0})


def test_gan_term_trains_a_discriminator(tmp_path):
    data = SyntheticShards(4, (32, 16), seed=2)
    s = TrainSettings(**{**TINY.__dict__, "gan": 0.1, "locator_epochs": 0,
                         "stages": (Stage(("femur",), 1), Stage(("proximal_femur",), 1))})
    model = train_model(None, tmp_path / "g", s, dataset=data, progress=False)
    log = (tmp_path / "g" / "train_log.tsv").read_text().splitlines()
    gan = [float(line.split("\t")[5]) for line in log[1:]]
    assert all(g > 0 for g in gan) and model.locator is None
    with pytest.raises(Exception, match="no hip locator"):
        model.locate_hips(np.zeros((64, 64), np.float32))


# ---------------------------------------------------------------------------------------------
# Real shards: two demo patients at their true pose (no registration), packed as the workflow does.


@pytest.fixture(scope="module")
def real_shards(demo_cases, tmp_path_factory):
    from bonedrr.bmd import bmd_case
    from bonedrr.calibrate import calibrate_case
    from bonedrr.drr import render_case, write_drr
    from bonedrr.geometry import Geometry
    from bonedrr.images import write_json
    from bonedrr.ingest import ingest_case
    from bonedrr.shards import PackSettings, pack_cohort

    demo_dir, settings, truths = demo_cases
    root = tmp_path_factory.mktemp("model_cohort")
    for truth in truths:
        out, src, files = root / truth["case_id"], demo_dir / truth["case_id"], truth["files"]
        ingest_case(truth["case_id"], src / files["ct"], src / files["xray"], out, pixel_mm=settings.pixel_mm,
                    sdd_mm=settings.sdd_mm, clinical=truth["clinical"])
        shutil.copy(src / "labels.nii.gz", out / "labels.nii.gz")
        calibrate_case(out / "ct.nii.gz", out / "labels.nii.gz", out, PHANTOM)
        write_json(out / "pose.json", {"world_to_camera": truth["geometry"]["world_to_camera"],
                                       "geometry": truth["geometry"], "similarity_value": 0.7, "converged": True,
                                       "qa_flags": []})
        write_drr(out / "drr.h5", render_case(out / "density.nii.gz", out / "labels.nii.gz",
                                              Geometry.from_dict(truth["geometry"]), device="cpu"))
        bmd_case(out / "density.nii.gz", out / "labels.nii.gz", out / "drr.h5", out / "case.json",
                 out / "bmd.json", calibration_json=out / "calibration.json")
    pack = PackSettings(crop_mm=(179.2, 89.6), crop_px=(64, 32), folds=2, seed=0)
    pack_cohort([root / t["case_id"] for t in truths], root / "shards", pack, cohort="tiny")
    return root / "shards", demo_dir, truths


@pytest.fixture(scope="module")
def real_model(real_shards, tmp_path_factory):
    shards, _, _ = real_shards
    out = tmp_path_factory.mktemp("models") / "tiny_all"
    settings = TrainSettings(stages=(Stage(("pelvis", "femur", "bone", "muscle"), 10), Stage(("proximal_femur",), 10)),
                             batch_size=2, base_channels=8, depth=3, locator_epochs=20, seed=0, dxa_calibration=True)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train_model(shards, out, settings, progress=False)
    return out


@pytest.mark.slow
def test_training_on_real_shards_lowers_the_loss_and_predicts_bmd(real_shards, real_model):
    from bonedrr.dataset import ShardDataset

    log = [line.split("\t") for line in (real_model / "train_log.tsv").read_text().splitlines()[1:]]
    for phase in ("stage1", "stage2", "locator"):
        losses = [float(r[2]) for r in log if r[0] == phase]
        assert losses[-1] < 0.8 * losses[0], (phase, losses)
    assert (real_model / "curves.png").stat().st_size > 10_000
    model = load_model(real_model)
    assert model.channels == ["pelvis", "femur", "bone", "muscle", "proximal_femur"]
    assert model.crop_shape == (64, 32) and model.calibration is not None
    data = ShardDataset(real_shards[0], channels=model.channels)
    batch = [data[i] for i in range(len(data))]
    xray = np.stack([b["xray"][0].numpy() for b in batch])
    assert model.input_scale == "overview"
    with pytest.raises(BonedrrError, match="this model scales its input by the whole radiograph"):
        model.predict(xray)
    pred = model.predict(xray, model.scale_of(np.stack([b["overview"][0].numpy() for b in batch])))
    assert pred.shape == (len(data), 5, 64, 32) and pred.min() >= 0
    true = np.stack([b["drr"].numpy() for b in batch])
    # after a few epochs on its 4 training hips: the proximal femur is where it should be
    corr = np.corrcoef(pred[:, 4].ravel(), true[:, 4].ravel())[0, 1]
    assert corr > 0.8, corr
    bmd = model.bmd(pred)
    assert np.all(np.isfinite(bmd)) and np.all((bmd > 0.2) & (bmd < 2.0))


def test_worker_processes_train_the_same_weights(real_shards, tmp_path):
    """With ``num_workers`` the batches come through ``SharedBatchRing`` (blocks reused across
    batches); the model must be the one trained without workers."""
    shards = real_shards[0]
    a = train_model(shards, tmp_path / "a", TINY, progress=False)
    b = train_model(shards, tmp_path / "b", TrainSettings(**{**TINY.__dict__, "num_workers": 2}), progress=False)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _run(*args):
    """The CLI in a fresh process (what a user times: python start-up included)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "bonedrr", *args], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    return p, time.perf_counter() - t0


def _main(capsys, *args):
    """The CLI in this process: (exit code, stdout, stderr)."""
    from bonedrr.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_estimate_cli_on_dicom_and_png_radiographs(real_shards, real_model, tmp_path, capsys):
    _, demo_dir, truths = real_shards
    dicom = demo_dir / truths[0]["case_id"] / truths[0]["files"]["xray"]
    png = demo_dir / truths[1]["case_id"] / truths[1]["files"]["xray"]
    assert dicom.suffix == ".dcm" and png.suffix == ".png"
    timings = {}
    p, timings["dicom"] = _run("estimate", "--model", str(real_model), "--xray", str(dicom), "--out", str(tmp_path / "a"),
                               "--threads", "1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["right hip", "left hip"]
    assert all(" g/cm2 (DRR-BMD), DXA-equivalent aBMD " in line for line in lines)
    result = json.loads((tmp_path / "a" / "estimate.json").read_text())
    assert set(result["sides"]) == {"right", "left"} and result["pixel_spacing_source"] == "ImagerPixelSpacing"
    for side, r in result["sides"].items():
        assert 0.2 < r["drr_bmd_g_cm2"] < 2.0
        assert (tmp_path / "a" / f"{side}_decomposition.png").stat().st_size > 5_000
        drr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / f"{side}_drr.nii.gz")))
        assert drr.shape == (5, 64, 32)
    # the located femoral heads lie near the true ones (4 training overviews: a loose bound, in mm)
    truth_heads = json.loads((real_shards[0].parent / truths[0]["case_id"] / "bmd.json").read_text())["sides"]
    for side in ("right", "left"):
        err_px = np.subtract(result["sides"][side]["femoral_head_px"], truth_heads[side]["femoral_head_px"])
        assert np.linalg.norm(err_px) * 2.8 < 15.0, (side, err_px)
    text = (tmp_path / "a" / "estimate.json").read_text()
    assert "Quispe" not in text and str(demo_dir) not in text and "PatientName" not in text

    code, out, err = _main(capsys, "estimate", "--model", str(real_model), "--xray", str(png), "--side", "left",
                           "--json", "--pixel-mm", "2.8", "2.8", "--t-reference", "0.94", "0.12")
    assert code == 0, err
    r = json.loads(out)["sides"]["left"]
    assert r["t_score"] == pytest.approx((r["dxa_equivalent_abmd_g_cm2"] - 0.94) / 0.12, abs=0.01)
    timings["png, in process"] = json.loads(out)["seconds"]
    # JPEG of the same radiograph (lossy): a BMD close to the PNG's
    from PIL import Image

    jpg = tmp_path / "x.jpg"
    Image.open(png).convert("L").save(jpg, quality=50)
    code, out, err = _main(capsys, "estimate", "--model", str(real_model), "--xray", str(jpg), "--side", "left",
                           "--json", "--pixel-mm", "2.8", "2.8")
    assert code == 0, err
    jpeg_bmd = json.loads(out)["sides"]["left"]["drr_bmd_g_cm2"]
    assert jpeg_bmd == pytest.approx(r["drr_bmd_g_cm2"], abs=0.05)
    # several radiographs in one call (the model loads once): each as on its own, each in its own folder
    code, out, err = _main(capsys, "estimate", "--model", str(real_model), "--xray", str(png), str(jpg), "--side",
                           "left", "--json", "--pixel-mm", "2.8", "2.8", "--out", str(tmp_path / "many"))
    assert code == 0, err
    both = json.loads(out)
    assert [b["xray"] for b in both] == [png.name, "x.jpg"]
    assert [b["sides"]["left"]["drr_bmd_g_cm2"] for b in both] == [r["drr_bmd_g_cm2"], jpeg_bmd]
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == sorted([png.name.split(".")[0], "x"])
    assert (tmp_path / "many" / "x" / "left_decomposition.png").is_file()
    timings["png + jpeg in one call, per radiograph after the first"] = both[1]["seconds"]
    # a hip crop as the shards store it, given as a 16-bit PNG: the same BMD as predicting the crop itself
    from bonedrr.dataset import ShardDataset

    model = load_model(real_model)
    item = ShardDataset(real_shards[0])[0]
    crop = item["xray"][0].numpy()
    stored = np.round((crop - crop.min()) / np.ptp(crop) * 65535).astype(np.uint16)
    crop_png = tmp_path / "crop.png"
    Image.fromarray(stored).save(crop_png)
    code, out, err = _main(capsys, "estimate", "--model", str(real_model), "--xray", str(crop_png), "--crop",
                           "--side", "right", "--json")
    assert code == 0, err
    # a crop alone: its input scale is taken from the crop itself (estimate warns)
    scale = model.scale_of(model.overview_of(stored.astype(np.float32))[None])
    expected = model.bmd(model.predict(stored.astype(np.float32)[None], scale))[0]
    assert json.loads(out)["sides"]["right"]["drr_bmd_g_cm2"] == pytest.approx(expected, abs=1e-3)
    assert json.loads(out)["sides"]["right"]["input"] == "crop"
    with capsys.disabled():
        print("\nestimate wall time, s (dicom: a fresh process, python start-up included):", timings)


# ---------------------------------------------------------------------------------------------
# The torch-free model (model.npz) that `bonedrr estimate` runs on a CPU


def test_numpy_layers_are_torchs():
    from torch.nn import functional as F

    from bonedrr.model import portable

    rng = np.random.default_rng(5)
    for k, shape in ((3, (2, 5, 9, 6)), (1, (1, 4, 7, 3))):
        x = rng.normal(size=shape).astype(np.float32)
        w, b = rng.normal(size=(7, shape[1], k, k)).astype(np.float32), rng.normal(size=7).astype(np.float32)
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=k // 2).numpy()
        np.testing.assert_allclose(portable._conv2d(x, w, b), ref, atol=2e-5)
    x = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
    for size in ((10, 14), (9, 13), (3, 4), (5, 7)):  # up, odd, down, same
        ref = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()
        np.testing.assert_allclose(portable.resize_bilinear(x, size), ref, atol=1e-5)
    overviews = rng.gamma(2.0, 100.0, size=(3, 16, 32)).astype(np.float32)
    overviews[0, :, :4] = 0  # letterbox
    overviews[2] = 0  # nothing but padding: the whole range
    from bonedrr.model.network import overview_scale, robust_range

    np.testing.assert_allclose(portable.overview_scale(overviews), overview_scale(torch.from_numpy(overviews)).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(np.stack(portable.robust_range(overviews)),
                               torch.stack(robust_range(torch.from_numpy(overviews))).numpy(), rtol=1e-5)


def test_body_quantiles_from_one_sort_are_torchs_quantiles():
    """The overview's body quantiles (every training step's input scale) come from one sort; they are
    exactly what torch.quantile and torch.nanquantile give, on letterboxed, empty, constant and
    few-valued overviews."""
    from bonedrr.model.network import _body_quantiles
    from bonedrr.model.portable import AIR_FRACTION

    def reference(overview, quantiles, fallback):
        flat = overview.flatten(1).float()
        bottom = flat.min(1, keepdim=True).values
        top = torch.quantile(flat, 0.995, dim=1, keepdim=True)
        body = flat.masked_fill(flat <= bottom + AIR_FRACTION * (top - bottom), float("nan"))
        q = torch.nanquantile(body, torch.tensor(quantiles), dim=1).T
        return torch.where(torch.isnan(q), torch.quantile(flat, torch.tensor(fallback), dim=1).T, q)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 64, 128, generator=g) * 3000
    x[:, :, 50:] = 0  # letterbox
    x[1] = 0  # padding only
    x[2] = 5.0  # constant
    x[3] = torch.randint(0, 5, (1, 64, 128), generator=g).float()  # few values, many ties
    for quantiles, fallback in (([0.01, 0.5], [0.0, 1.0]), ([0.0, 0.05, 0.5, 0.99, 1.0], [0.1, 0.3, 0.5, 0.7, 0.9])):
        assert torch.equal(_body_quantiles(x, quantiles, fallback), reference(x, quantiles, fallback))


@pytest.mark.parametrize("scaled,conditioned,equivariant", [(True, False, False), (False, False, False),
                                                             (True, True, False), (True, False, True),
                                                             (True, False, (True, False, True))])
def test_numpy_unet_is_the_torch_unet(scaled, conditioned, equivariant):
    """Random weights (GroupNorm's affine and the FiLM layers too), so a wrong key or layer order cannot hide."""
    from bonedrr.model.portable import kvp_condition, unet_forward

    torch.manual_seed(0)
    net = UNet(1, 3, base_channels=8, depth=3, conditions=int(conditioned), equivariant=equivariant).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(2, 1, 32, 16) * 900 + 50
    scale = torch.tensor([[60.0, 500.0], [100.0, 700.0]]) if scaled else None
    condition = kvp_condition([70.0, 85.0]) if conditioned else None
    with torch.no_grad():
        ref = net(x, scale, None if condition is None else torch.from_numpy(condition)).numpy()
    weights = {k: v.numpy() for k, v in net.state_dict().items()}
    assert ("film.3.weight" in weights) == conditioned  # bottleneck + 3 decoder levels
    out = unet_forward(weights, x.numpy(), depth=3, scale=None if scale is None else scale.numpy(), condition=condition)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(out, ref, atol=5e-4 * np.abs(ref).max())
    zero = scale[:, :1, None, None] if scaled else 0.0
    with torch.no_grad():  # twice the contrast about the input scale's zero
        doubled = net(zero + 2 * (x - zero), scale,
                      None if condition is None else torch.from_numpy(condition)).numpy()
    # the GroupNorms make a plain U-Net blind to the input's scale; an equivariant one follows it, in
    # the channels it is equivariant in (a thickness is a shape: it does not)
    follows = np.broadcast_to(np.asarray(equivariant, bool), (3,))
    expected = np.where(follows[None, :, None, None], 2 * ref, ref)
    np.testing.assert_allclose(doubled, expected, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    if conditioned:  # the condition matters, and is required
        with torch.no_grad():
            other = net(x, scale, torch.from_numpy(kvp_condition([85.0, 70.0]))).numpy()
        assert np.abs(other - ref).max() > 0.1 * np.abs(ref).max()
        with pytest.raises(ValueError, match=r"needs a condition of shape \(2, 1\), got None"):
            net(x, scale)
        with pytest.raises(BonedrrError, match="conditioned .FiLM layers.: give its condition"):
            unet_forward(weights, x.numpy(), depth=3, scale=scale.numpy())


def test_a_stage_scales_its_densities_with_the_input_and_not_its_thickness():
    """With ``equivariant``, the density channels follow the input's scale and the thickness (cm) does
    not; a U-Net equivariant in every channel keeps the one-number flag that models saved before have."""
    from bonedrr.train import _unet

    settings = {"base_channels": 4, "depth": 2, "equivariant": True}
    net = _unet(settings, ["proximal_femur", "proximal_femur_thickness"])
    assert net.equivariant.tolist() == [1.0, 0.0]
    assert _unet(settings, ["pelvis", "femur"]).equivariant.shape == ()
    assert not hasattr(_unet({**settings, "equivariant": False}, ["proximal_femur_thickness"]), "equivariant")
    with pytest.raises(ValueError, match=r"one flag per output channel \(2\), got 3"):
        UNet(1, 2, equivariant=[True, False, True])


def test_film_layers_start_as_the_identity():
    """A kVp-conditioned U-Net starts as the plain U-Net with the same convolutions, whatever the kVp."""
    from bonedrr.model.portable import kvp_condition

    torch.manual_seed(1)
    plain = UNet(1, 2, base_channels=4, depth=2).eval()
    conditioned = UNet(1, 2, base_channels=4, depth=2, conditions=1).eval()
    conditioned.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(3, 1, 16, 8) * 500
    with torch.no_grad():
        torch.testing.assert_close(conditioned(x, None, torch.from_numpy(kvp_condition([60.0, 80.0, 100.0]))),
                                   plain(x))


def test_kvp_conditioning_needs_every_training_kvp(tmp_path):
    settings = TrainSettings(**{**TINY.__dict__, "condition": "kvp", "locator_epochs": 0})
    kvp = [80.0] * 11 + [math.nan]
    data = SyntheticShards(n=12, kvp=kvp)
    with pytest.raises(InputError, match=r"network condition kvp: 1 of 12 samples have no kVp .* syn_011_right"):
        train_model(None, tmp_path / "m", settings, dataset=data, progress=False)
    with pytest.raises(BonedrrError, match="train network condition must be one of none, kvp, tone, kvp.tone, not 'mAs'"):
        TrainSettings.from_config({"network": {"condition": "mAs"}})


def test_tone_condition_numpy_is_torch_and_ignores_the_exposure():
    """The tone statistics are the same in NumPy and torch (padding and an all-padding crop too), and a
    change of exposure or window (an affine map of the whole radiograph's values) leaves them as they are:
    they carry the tone curve's shape, not the file's scale."""
    from bonedrr.model import network
    from bonedrr.model.portable import TONE_OVERVIEW_QUANTILES, body_quantiles, overview_scale, tone_condition

    rng = np.random.default_rng(5)
    overviews = (rng.random((3, 128, 256)) ** 2 * 800 + 100).astype(np.float32)
    overviews[:, :, :30] = 0  # letterbox
    crops = (rng.random((3, 128, 64)) * 900 + 50).astype(np.float32)
    crops[0, :20] = 0  # beyond the radiograph
    crops[2] = 0
    numpy_condition = tone_condition(crops, overview_scale(overviews), body_quantiles(overviews, TONE_OVERVIEW_QUANTILES))
    torch_condition = network.tone_condition(torch.from_numpy(crops), network.overview_scale(torch.from_numpy(overviews)),
                                             torch.from_numpy(overviews)).numpy()
    assert numpy_condition.shape == (3, 16)
    np.testing.assert_allclose(numpy_condition, torch_condition, atol=1e-4)
    gain, offset = 0.37, 2000.0
    exposed = tone_condition(np.where(crops != 0, gain * crops + offset, 0), overview_scale(np.where(overviews != 0, gain * overviews + offset, 0)),
                             body_quantiles(np.where(overviews != 0, gain * overviews + offset, 0), TONE_OVERVIEW_QUANTILES))
    np.testing.assert_allclose(exposed[:2], numpy_condition[:2], atol=1e-3)
    gamma = tone_condition(crops, overview_scale(overviews ** 1.3), body_quantiles(overviews ** 1.3, TONE_OVERVIEW_QUANTILES))
    assert np.abs(gamma[:, :11] - numpy_condition[:, :11]).max() > 0.05  # a tone curve does change them


def test_tone_conditioned_model_trains_predicts_and_needs_its_statistics(tmp_path):
    """A ``tone`` model's U-Nets get 16 conditions; the portable model computes them as training did (its
    predictions are the torch model's), and a bare two-number scale is refused."""
    from bonedrr.model.portable import load_portable

    settings = TrainSettings(**{**TINY.__dict__, "condition": "tone", "locator_epochs": 0})
    data = SyntheticShards(n=12)
    model = train_model(None, tmp_path / "m", settings, dataset=data, progress=False)
    assert model.stage_nets[0].conditions == 16
    xray = np.stack([it["xray"][0].numpy() for it in data.items[:4]])
    overview = np.stack([it["overview"][0].numpy() for it in data.items[:4]])
    scale = model.scale_of(overview)
    assert scale.shape == (4, 13)
    portable = load_portable(tmp_path / "m" / "model.npz")
    np.testing.assert_allclose(portable.predict(xray, portable.scale_of(overview)), model.predict(xray, scale), atol=1e-4)
    with pytest.raises(BonedrrError, match="give predict.. the 13 statistics of each crop's radiograph"):
        model.predict(xray, scale[:, :2])
    with pytest.raises(BonedrrError, match="condition tone needs input_scale overview or detector"):
        TrainSettings(condition="tone", input_scale="crop")


@pytest.mark.parametrize("layout", ["stage 3 of its own", "beside the density in stage 2"])
def test_an_equivariant_model_learns_the_thickness_beside_the_density(tmp_path, layout):
    """The thickness in a stage of its own (configured: stage 3, started from stage 2's weights, an
    U-Net not equivariant at all), or beside the proximal femur in stage 2 (one flag per channel; stage
    1's weights go over, its one-number equivariance flag does not); the saved model, its portable twin
    and the DRR-vBMD read off both agree."""
    from bonedrr.bmd import drr_vbmd_of
    from bonedrr.model.portable import load_portable
    from synthetic_shards import CHANNELS

    later = ((Stage(("proximal_femur",), 2), Stage(("proximal_femur_thickness",), 2)) if layout.startswith("stage 3")
             else (Stage(("proximal_femur", "proximal_femur_thickness"), 2),))
    settings = TrainSettings(**{**TINY.__dict__, "equivariant": True, "locator_epochs": 0,
                                "stages": (Stage(("pelvis", "femur", "bone"), 2), *later)})
    data = SyntheticShards(n=8, channels=[*CHANNELS, "proximal_femur_thickness"])
    model = train_model(None, tmp_path / "m", settings, dataset=data, progress=False)
    assert model.stage_nets[0].equivariant.shape == ()
    if layout.startswith("stage 3"):
        assert model.stage_nets[1].equivariant.shape == () and not hasattr(model.stage_nets[2], "equivariant")
        assert model.channels == ["pelvis", "femur", "bone", "proximal_femur", "proximal_femur_thickness"]
    else:
        assert model.stage_nets[1].equivariant.tolist() == [1.0, 0.0]
    loaded = load_model(tmp_path / "m")
    xray = np.stack([it["xray"][0].numpy() for it in data.items[:4]])
    scale = loaded.scale_of(np.stack([it["overview"][0].numpy() for it in data.items[:4]]))
    pred = loaded.predict(xray, scale)
    np.testing.assert_allclose(pred, model.predict(xray, scale), atol=1e-5)
    portable = load_portable(tmp_path / "m" / "model.npz")
    np.testing.assert_allclose(portable.predict(xray, scale), pred, atol=1e-5 * np.abs(pred).max())
    assert loaded.channels[-1] == "proximal_femur_thickness"
    vbmd = portable.vbmd(pred)
    np.testing.assert_allclose(vbmd, drr_vbmd_of(loaded.channels, pred, 0.05), equal_nan=True)
    assert vbmd.shape == (4,)
    # a model without the channel reads no volumetric density
    plain = train_model(None, tmp_path / "plain", TrainSettings(**{**TINY.__dict__, "locator_epochs": 0}),
                        dataset=SyntheticShards(n=4), progress=False)
    assert plain.vbmd(plain.predict(xray, scale)) is None


@pytest.mark.slow
def test_kvp_conditioned_model_reads_density_the_image_alone_cannot(tmp_path):
    """Bone contrast that falls with kVp (a harder beam) while density does not: given the kVp, the model
    tells a dense bone at 85 kV from a light one at 70; without it, it cannot."""
    kvps = np.random.default_rng(7).choice([70.0, 75.0, 80.0, 85.0], size=48)
    train = SyntheticShards(n=40, seed=11, kvp=kvps[:40], kvp_effect=4.0)
    held = SyntheticShards(n=8, seed=12, kvp=kvps[40:], kvp_effect=4.0)
    errors = {}
    for condition in ("none", "kvp"):
        settings = TrainSettings(stages=(Stage(("femur", "bone"), 60), Stage(("proximal_femur",), 60)), batch_size=4,
                                 base_channels=8, depth=2, locator_epochs=0, seed=0, condition=condition,
                                 input_scale="crop", augment=AugmentSettings(rotate_deg=0, scale=0, shift=0,
                                                                             gamma=0, contrast=0, noise=0))
        model = train_model(None, tmp_path / condition, settings, dataset=train, progress=False)
        xray = np.stack([it["xray"][0].numpy() for it in held.items])
        pred = model.bmd(model.predict(xray, kvp=[it["kvp"] for it in held.items]))
        truth = np.array([drr_bmd(it["drr"][0].numpy()) for it in held.items])  # channel 0: proximal_femur
        errors[condition] = float(np.mean(np.abs(pred - truth)))
    assert errors["kvp"] < 0.7 * errors["none"], errors  # measured: 0.061 against 0.120 g/cm2


@pytest.mark.slow
def test_a_detector_scale_model_of_several_beams_reads_density_given_each_ones_kvp(tmp_path):
    """Raw radiographs of several protocols (a cohort of several sites, ``demo.presentation: raw``): on
    the detector's one scale a harder beam lowers the bone's log attenuation, so without the kVp a
    detector-scale model cannot tell a dense bone at 85 kV from a light one at 70; conditioned on it
    (``network.condition: kvp``), it can. Its portable twin takes the kVp alike."""
    from bonedrr.model.portable import load_portable

    kvps = np.random.default_rng(7).choice([70.0, 75.0, 80.0, 85.0], size=48)
    thickness = np.random.default_rng(5).uniform(0.6, 1.6, 48)
    train = SyntheticShards(n=40, seed=11, kvp=kvps[:40], kvp_effect=4.0, thickness=thickness[:40])
    held = SyntheticShards(n=8, seed=12, kvp=kvps[40:], kvp_effect=4.0, thickness=thickness[40:])
    xray = np.stack([it["xray"][0].numpy() for it in held.items])
    overview = np.stack([it["overview"][0].numpy() for it in held.items])
    kvp = [it["kvp"] for it in held.items]
    truth = np.array([drr_bmd(it["drr"][0].numpy()) for it in held.items])  # channel 0: proximal_femur
    errors = {}
    for condition in ("none", "kvp"):
        settings = TrainSettings(stages=(Stage(("femur", "bone"), 60), Stage(("proximal_femur",), 60)), batch_size=4,
                                 base_channels=8, depth=2, locator_epochs=0, seed=0, condition=condition,
                                 input_scale="detector", equivariant=True,
                                 augment=AugmentSettings(rotate_deg=0, scale=0, shift=0, gamma=0, contrast=0, noise=0))
        model = train_model(None, tmp_path / condition, settings, dataset=train, progress=False)
        pred = model.predict(xray, model.scale_of(overview), kvp=kvp)
        errors[condition] = float(np.mean(np.abs(model.bmd(pred) - truth)))
    portable = load_portable(tmp_path / "kvp" / "model.npz")
    np.testing.assert_allclose(portable.predict(xray, portable.scale_of(overview), kvp=kvp), pred, atol=1e-4)
    assert errors["kvp"] < 0.3 * errors["none"], errors  # measured: 0.024 against 0.204 g/cm2


@pytest.mark.slow
def test_detector_scale_reads_the_density_that_a_per_image_span_divides_out(tmp_path):
    """Raw log radiographs whose soft tissue is thicker in some patients than others, read by an
    equivariant U-Net: scaled by each radiograph's own span (``overview``), a thick patient's bone looks
    lighter and the model cannot tell density from thickness; on the detector's one scale
    (``detector``) it can. The dose offsets differ too, which both scales remove. The span is the
    training radiographs' median, kept in the model, and the portable model scales and multiplies as
    training did."""
    from bonedrr.model.portable import load_portable
    from bonedrr.model.portable import overview_scale as portable_overview_scale

    thickness = np.random.default_rng(5).uniform(0.6, 1.6, 48)
    train = SyntheticShards(n=40, seed=11, thickness=thickness[:40])
    held = SyntheticShards(n=8, seed=12, thickness=thickness[40:])
    xray = np.stack([it["xray"][0].numpy() for it in held.items])
    overview = np.stack([it["overview"][0].numpy() for it in held.items])
    truth = np.array([drr_bmd(it["drr"][0].numpy()) for it in held.items])  # channel 0: proximal_femur
    errors = {}
    for input_scale in ("overview", "detector"):
        settings = TrainSettings(stages=(Stage(("femur", "bone"), 60), Stage(("proximal_femur",), 60)), batch_size=4,
                                 base_channels=8, depth=2, locator_epochs=0, seed=0, input_scale=input_scale, equivariant=True,
                                 augment=AugmentSettings(rotate_deg=0, scale=0, shift=0, gamma=0, contrast=0, noise=0))
        model = train_model(None, tmp_path / input_scale, settings, dataset=train, progress=False)
        pred = model.bmd(model.predict(xray, model.scale_of(overview)))
        errors[input_scale] = float(np.mean(np.abs(pred - truth)))
    spans = np.diff(portable_overview_scale(np.stack([it["overview"][0].numpy() for it in train.items])), axis=1)
    assert model.input_span == pytest.approx(float(np.median(spans)), rel=1e-3)
    portable = load_portable(tmp_path / "detector" / "model.npz")
    assert portable.input_span == pytest.approx(model.input_span)
    np.testing.assert_allclose(portable.predict(xray, portable.scale_of(overview)),
                               model.predict(xray, model.scale_of(overview)), atol=1e-4)
    assert errors["detector"] < 0.3 * errors["overview"], errors  # measured: 0.014 against 0.123 g/cm2
    with pytest.raises(BonedrrError, match=r"train input_span \(2.0\) is for input_scale detector"):
        TrainSettings(input_span=2.0)


def test_the_open_beam_fixes_the_detector_scale_where_the_body_percentile_follows_the_field():
    """With ``open_beam`` every raw radiograph's input scale starts at the detector's open beam, in NumPy
    and torch alike, whatever the field holds; the body's 1st percentile (no ``open_beam``) jumps when
    a little air enters the field. Such a model's augmentation shifts no offset (on its scale an offset
    is density), and ``open_beam`` belongs to ``input_scale: detector`` only."""
    from bonedrr.model import network
    from bonedrr.model.portable import detector_scale

    data = SyntheticShards(n=6, seed=3, thickness=np.ones(6), open_beam=1000.0)
    overviews = np.stack([it["overview"][0].numpy() for it in data.items])
    air = ((overviews > 0) & (overviews <= 1000.0)).sum((1, 2)) / (overviews > 0).sum((1, 2))
    assert air.min() < 0.01 < air.max()  # some fields hold more than 1 % air, some less
    body_low = detector_scale(overviews, 2000.0)
    assert np.ptp(body_low[:, 0]) > 300  # moves with the field's air
    fixed = detector_scale(overviews, 2000.0, open_beam=1000.0)
    np.testing.assert_array_equal(fixed, np.tile([[1000.0, 3000.0]], (6, 1)))
    for open_beam in (None, 1000.0):
        np.testing.assert_allclose(network.detector_scale(torch.from_numpy(overviews), 2000.0, open_beam).numpy(),
                                   detector_scale(overviews, 2000.0, open_beam), rtol=1e-6)
    overview = torch.from_numpy(overviews)[:, None]
    quiet = AugmentSettings(rotate_deg=0, scale=0, shift=0, gamma=0, contrast=0, noise=0)
    # the whole overview as the crop; compared where the tone curve's range does not clip it, away from
    # the border that the identity affine's resampling touches
    lo, hi = (v.view(-1, 1, 1, 1) for v in network.robust_range(overview))
    kept = (overview > lo) & (overview < hi)
    kept[..., [0, -1], :] = kept[..., :, [0, -1]] = False
    for offset in (False, True):  # as training augments: the crop and its overview alike
        out, _, _ = RandomAugment(quiet, torch.Generator().manual_seed(0), tone=False, offset=offset)(
            overview, overview.clone(), overview=overview.clone())
        moved = float((out - overview)[kept].abs().amax())
        assert moved < 0.01 if not offset else moved > 10, (offset, moved)
    with pytest.raises(BonedrrError, match=r"train open_beam \(1000.0\) is for input_scale detector, not 'overview'"):
        TrainSettings(open_beam=1000.0)


def test_training_refuses_an_open_beam_that_its_radiographs_contradict(tmp_path):
    """An ``open_beam`` above the cohort's own (its radiographs have values below it, which no image
    referenced to it has) is refused before training, with the count; the cohort's own trains."""
    data = SyntheticShards(n=6, seed=3, thickness=np.ones(6), open_beam=1000.0)
    wrong = TrainSettings(**{**TINY.__dict__, "input_scale": "detector", "input_span": 2000.0, "open_beam": 1500.0,
                             "locator_epochs": 0})
    # the 2 fields with more than 0.1 % air show it; the others' thinnest tissue lies about 400 above the open beam
    with pytest.raises(BonedrrError, match=r"train open_beam \(1500\) is not this cohort's: 2 of 6 training "
                                           r"radiographs have values below it \(down to 1000\)"):
        train_model(None, tmp_path / "wrong", wrong, dataset=data, progress=False)
    assert not (tmp_path / "wrong" / "model.pt").exists()
    right = TrainSettings(**{**wrong.__dict__, "open_beam": 1000.0})
    model = train_model(None, tmp_path / "right", right, dataset=data, progress=False)
    assert model.open_beam == 1000.0


@pytest.mark.slow
def test_a_detector_scale_model_given_the_open_beam_reads_density_and_keeps_it(tmp_path):
    """An equivariant detector-scale model trained with ``open_beam`` on raw radiographs referenced to the
    open beam (their fields holding 0-2 % air) reads the held-out hips' density; the model keeps the
    open beam, and its portable twin scales every radiograph from it as training did. (Whether the
    open beam beats the body's percentile is the real cohort's question: these synthetic hips do not
    move with a pose; docs/validation.md, "Raw radiographs".)"""
    from bonedrr.model.portable import load_portable

    thickness = np.random.default_rng(5).uniform(0.6, 1.6, 48)
    train = SyntheticShards(n=40, seed=11, thickness=thickness[:40], open_beam=1000.0)
    held = SyntheticShards(n=8, seed=12, thickness=thickness[40:], open_beam=1000.0)
    xray = np.stack([it["xray"][0].numpy() for it in held.items])
    overview = np.stack([it["overview"][0].numpy() for it in held.items])
    truth = np.array([drr_bmd(it["drr"][0].numpy()) for it in held.items])  # channel 0: proximal_femur
    settings = TrainSettings(stages=(Stage(("femur", "bone"), 60), Stage(("proximal_femur",), 60)), batch_size=4,
                             base_channels=8, depth=2, locator_epochs=0, seed=0, input_scale="detector",
                             equivariant=True, open_beam=1000.0,
                             augment=AugmentSettings(rotate_deg=0, scale=0, shift=0, gamma=0, contrast=0, noise=0))
    model = train_model(None, tmp_path / "m", settings, dataset=train, progress=False)
    scale = model.scale_of(overview)
    np.testing.assert_allclose(scale, np.tile([[1000.0, 1000.0 + model.input_span]], (8, 1)))
    pred = model.predict(xray, scale)
    error = float(np.mean(np.abs(model.bmd(pred) - truth)))
    assert error < 0.06, error  # measured: 0.040 g/cm2 (the training mean for every hip: 0.116)
    portable = load_portable(tmp_path / "m" / "model.npz")
    assert portable.open_beam == 1000.0
    np.testing.assert_allclose(portable.predict(xray, portable.scale_of(overview)), pred, atol=1e-4)


def test_estimate_warns_when_a_radiograph_is_darker_than_the_models_open_beam(demo_cases, tmp_path, capsys, caplog):
    """An open-beam model (train ``open_beam``, trained on raw images referenced to it) reads a raw
    radiograph referenced to that open beam without a word, not even about a crop's input scale (the
    open beam and the span fix it, whatever surrounds the hip); the same radiograph shifted 400 units
    darker (as a higher dose or another detector's reference shifts a log image) has values below the
    open beam, which no image on the model's scale has: the warning names the file and the values."""
    import dataclasses

    import pydicom

    from bonedrr.demo.cohort import make_case
    from bonedrr.demo.xray_physics import RAW_OPEN_BEAM

    demo_dir, settings, truths = demo_cases
    raw_case = tmp_path / "raw" / truths[0]["case_id"]
    make_case(raw_case, truths[0]["case_id"], 0, dataclasses.replace(settings, presentation="raw"))
    ds = pydicom.dcmread(raw_case / "xray.dcm")
    ds.PixelData = (ds.pixel_array - 400).astype(ds.pixel_array.dtype).tobytes()
    shifted = tmp_path / "shifted" / "xray.dcm"
    shifted.parent.mkdir()
    ds.save_as(shifted)
    model_dir = tmp_path / "open_beam_model"
    raw_hips = SyntheticShards(n=6, shape=(128, 64), seed=3, thickness=np.ones(6), open_beam=RAW_OPEN_BEAM)
    train_model(None, model_dir, TrainSettings(**{**TINY.__dict__, "input_scale": "detector", "input_span": 2000.0,
                                                 "open_beam": RAW_OPEN_BEAM, "locator_epochs": 0}),
                dataset=raw_hips, progress=False)
    logged = {}
    for name, xray in (("raw", raw_case / "xray.dcm"), ("shifted", shifted)):
        caplog.clear()
        code, out, err = _main(capsys, "estimate", "--model", str(model_dir), "--xray", str(xray), "--json",
                               "--side", "right", "--crop")
        assert code == 0, err
        logged[name] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert logged["raw"] == []
    assert len(logged["shifted"]) == 1 and logged["shifted"][0].startswith("xray.dcm: its darkest values (6")
    assert "lie below the model's open beam (1000): they are not referenced to that open beam" in logged["shifted"][0]


@pytest.mark.slow
def test_portable_model_predicts_and_locates_as_the_torch_model(real_shards, real_model, tmp_path):
    from bonedrr.dataset import ShardDataset
    from bonedrr.dicom import read_radiograph
    from bonedrr.estimate import load_for_inference
    from bonedrr.model.portable import PortableModel, load_portable, portable_path

    _, demo_dir, truths = real_shards
    assert portable_path(real_model) == real_model / "model.npz"
    model, portable = load_model(real_model), load_portable(real_model / "model.npz")
    assert (portable.channels, portable.crop_shape, portable.calibration, portable.input_scale) == (
        model.channels, model.crop_shape, model.calibration, model.input_scale)
    data = ShardDataset(real_shards[0], channels=model.channels)
    batch = [data[i] for i in range(len(data))]
    xray = np.stack([b["xray"][0].numpy() for b in batch])
    scale = model.scale_of(np.stack([b["overview"][0].numpy() for b in batch]))
    expected = model.predict(xray, scale)
    assert expected.max() > 0.5
    np.testing.assert_allclose(portable.predict(xray, scale), expected, atol=1e-4)
    np.testing.assert_allclose(portable.bmd(portable.predict(xray, scale)), model.bmd(expected), atol=1e-5)
    # crops of another size are resized in and out alike
    bigger = np.repeat(np.repeat(xray[:2], 2, 1), 2, 2)
    np.testing.assert_allclose(portable.predict(bigger, scale[:2]), model.predict(bigger, scale[:2]), atol=1e-4)
    radiograph = read_radiograph(demo_dir / truths[0]["case_id"] / truths[0]["files"]["xray"])
    heads, conf = model.locate_hips_with_confidence(radiograph.pixels, radiograph.pixel_mm)
    p_heads, p_conf = portable.locate_hips_with_confidence(radiograph.pixels, radiograph.pixel_mm)
    for side in ("right", "left"):
        np.testing.assert_allclose(p_heads[side], heads[side], atol=0.01)
        assert p_conf[side] == pytest.approx(conf[side], abs=1e-4)
    # the CPU gets the torch-free copy, also after its model.pt was touched (Snakemake touches a job's
    # outputs when it ends, and model.npz is not one); a replaced model.pt or a damaged copy does not
    folder = Path(shutil.copytree(real_model, tmp_path / "m"))
    assert isinstance(load_for_inference(folder, "cpu"), PortableModel)
    assert not isinstance(load_for_inference(folder, "auto"), PortableModel)
    os.utime(folder / "model.pt", ns=(time.time_ns(), (folder / "model.npz").stat().st_mtime_ns + 10**9))
    assert portable_path(folder) == folder / "model.npz"
    assert isinstance(load_for_inference(folder, "cpu"), PortableModel)
    payload = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    torch.save({**payload, "info": {**payload["info"], "replaced": True}}, folder / "model.pt")
    assert portable_path(folder) is None and not isinstance(load_for_inference(folder, "cpu"), PortableModel)
    (folder / "model.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(InputError, match=r"model.npz: not a bonedrr portable model"):
        load_portable(folder / "model.npz")


@pytest.mark.slow
def test_estimate_in_a_fresh_process_does_not_import_torch(real_shards, real_model):
    _, demo_dir, truths = real_shards
    dicom = demo_dir / truths[0]["case_id"] / truths[0]["files"]["xray"]
    code = ("import sys; from bonedrr.cli import main; rc = main(['estimate', '--model', sys.argv[1], '--xray', "
            "sys.argv[2], '--json']); print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(real_model), str(dicom)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("torch imported: False")
    result = json.loads(p.stdout.rsplit("torch imported", 1)[0])
    expected = load_model(real_model)
    from bonedrr.estimate import estimate

    torch_result = estimate(real_model, dicom, device="auto")  # auto: the torch model
    for side in ("right", "left"):
        assert result["sides"][side]["drr_bmd_g_cm2"] == pytest.approx(torch_result["sides"][side]["drr_bmd_g_cm2"],
                                                                        abs=2e-4)
    assert expected.calibration is not None


@pytest.mark.slow
def test_estimate_errors_are_one_line(real_shards, real_model, tmp_path, capsys):
    _, demo_dir, truths = real_shards
    dicom = demo_dir / truths[0]["case_id"] / truths[0]["files"]["xray"]
    png = demo_dir / truths[1]["case_id"] / truths[1]["files"]["xray"]
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not an image at all")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cases = [
        ((tmp_path / "nope", dicom), f"{tmp_path / 'nope'}: model folder not found"),
        ((empty, dicom), f"{empty}: no model.pt in the model folder"),
        ((real_model, bad), f"{bad}: not a DICOM file (no DICM preamble)"),
        ((real_model, tmp_path / "missing.dcm"), f"{tmp_path / 'missing.dcm'}: radiograph file not found"),
        ((real_model, png), f"{png}: a PNG/JPEG has no pixel spacing: give --pixel-mm ROW COL (mm at the detector)"),
    ]
    for (model, xray), message in cases:
        code, out, err = _main(capsys, "estimate", "--model", str(model), "--xray", str(xray))
        assert (code, out, err) == (2, "", f"bonedrr estimate: error: {message}\n")


@pytest.mark.slow
def test_estimate_with_a_kvp_conditioned_model(real_shards, tmp_path, capsys):
    """The kVp reaches the model from the DICOM's KVP, from --kvp for a PNG, and from the sample sheet's
    xray_kvp through ingest into the shards (which a conditioned model trains on); without it, one clear error."""
    from bonedrr.dataset import ShardDataset
    from bonedrr.model.portable import load_portable

    shards, demo_dir, truths = real_shards
    dataset = ShardDataset(shards)
    by_case = {t["case_id"]: t["exposure"]["kvp"] for t in truths}
    assert [item["kvp"] for item in dataset] == [by_case[r["case_id"]] for r in dataset.index]  # the PNG's too
    settings = TrainSettings(**{**TINY.__dict__, "condition": "kvp", "locator_epochs": 3})
    model = train_model(shards, tmp_path / "kvp_model", settings, progress=False)
    assert model.needs_kvp and load_portable(tmp_path / "kvp_model" / "model.npz").needs_kvp
    with pytest.raises(BonedrrError, match="conditioned on the tube voltage: give each radiograph's kVp"):
        model.predict(dataset[0]["xray"].numpy(), model.scale_of(dataset[0]["overview"].numpy()))

    dicom = demo_dir / truths[0]["case_id"] / truths[0]["files"]["xray"]
    png = demo_dir / truths[1]["case_id"] / truths[1]["files"]["xray"]
    code, out, err = _main(capsys, "estimate", "--model", str(tmp_path / "kvp_model"), "--xray", str(dicom), "--json",
                           "--side", "right")
    assert code == 0, err
    result = json.loads(out)
    assert (result["kvp"], result["kvp_source"]) == (truths[0]["exposure"]["kvp"], "dicom")
    code, out, err = _main(capsys, "estimate", "--model", str(tmp_path / "kvp_model"), "--xray", str(png),
                           "--pixel-mm", "2.8", "2.8", "--side", "left")
    assert (code, out) == (2, "")
    assert err == (f"bonedrr estimate: error: {png}: this model is conditioned on the tube voltage and the radiograph "
                   "does not record it (no DICOM KVP): give --kvp KV\n")
    bmd = {}
    for kv in (70, 85):
        code, out, err = _main(capsys, "estimate", "--model", str(tmp_path / "kvp_model"), "--xray", str(png),
                               "--pixel-mm", "2.8", "2.8", "--side", "left", "--json", "--kvp", str(kv))
        assert code == 0, err
        result = json.loads(out)
        assert (result["kvp"], result["kvp_source"]) == (kv, "--kvp")
        bmd[kv] = result["sides"]["left"]["drr_bmd_g_cm2"]
    assert bmd[70] != bmd[85]  # the condition reaches the prediction


def test_estimate_warns_when_a_detector_scale_model_reads_a_processed_radiograph(demo_cases, real_shards, tmp_path,
                                                                                  capsys, caplog):
    """A model on the detector's log scale (``input_scale: detector``) reads a DICOM "FOR PROCESSING"
    radiograph without a word, and warns, naming the file, on the same patient's processed radiograph
    (its values are on a workstation's display scale, so its BMD is off: docs/validation.md, "Raw radiographs");
    of a raw PNG, which no tag describes, it says that the file cannot tell."""
    import dataclasses

    from bonedrr.demo.cohort import make_case

    demo_dir, settings, truths = demo_cases
    raw_case, raw_png_case = (tmp_path / "raw" / truths[i]["case_id"] for i in (0, 1))
    make_case(raw_case, truths[0]["case_id"], 0, dataclasses.replace(settings, presentation="raw"))
    make_case(raw_png_case, truths[1]["case_id"], 1, dataclasses.replace(settings, presentation="raw"))
    model_dir = tmp_path / "detector_model"
    train_model(real_shards[0], model_dir, TrainSettings(**{**TINY.__dict__, "input_scale": "detector"}), progress=False)
    logged = {}
    for name, xray in (("raw", raw_case / "xray.dcm"), ("processed", demo_dir / truths[0]["case_id"] / "xray.dcm"),
                       ("raw_png", raw_png_case / "xray.png")):
        caplog.clear()
        code, out, err = _main(capsys, "estimate", "--model", str(model_dir), "--xray", str(xray), "--json",
                               "--side", "right", "--pixel-mm", *map(str, settings.pixel_mm))
        assert code == 0, err
        assert json.loads(out)["sides"]["right"]["drr_bmd_g_cm2"] is not None
        logged[name] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert logged["raw"] == []
    assert logged["processed"] == [
        "xray.dcm: the model reads raw radiographs on its detector's log scale (input_scale detector), and this is "
        "not a DICOM 'FOR PROCESSING' image: its BMD is only right if its values are on that scale"]
    assert logged["raw_png"] == [
        "xray.png: the model reads raw radiographs on its detector's log scale (input_scale detector), and a PNG file "
        "does not say which scale its values are on: its BMD is only right if they are on that one"]


def test_the_portable_copy_is_known_by_its_model_pt_content_not_its_time(tmp_path):
    """model.npz names its model.pt by content: a touched model.pt keeps it, a replaced one does not,
    and two saves of the same weights (torch draws a new serialization id each time, under another
    temporary name) name the same; a copy from before the digest falls back to the times."""
    from bonedrr.images import atomic_path
    from bonedrr.model.portable import portable_path, torch_file_digest

    def save(weights, path):
        with atomic_path(path) as tmp:
            torch.save({"w": weights}, tmp)

    pt, npz = tmp_path / "model.pt", tmp_path / "model.npz"
    save(torch.arange(4.0), pt)
    digest = torch_file_digest(pt)
    save(torch.arange(4.0), tmp_path / "again.pt")
    assert digest is not None and torch_file_digest(tmp_path / "again.pt") == digest
    assert (tmp_path / "again.pt").read_bytes() != pt.read_bytes()
    np.savez(npz, meta=np.array(json.dumps({"model_pt_digest": digest})))
    later = npz.stat().st_mtime_ns + 10**9
    os.utime(pt, ns=(later, later))
    assert portable_path(tmp_path) == npz and portable_path(pt) == npz
    save(torch.arange(4.0) + 1, pt)
    assert portable_path(tmp_path) is None
    np.savez(npz, meta=np.array(json.dumps({})))  # written before the digest was kept
    os.utime(pt, ns=(later + 10**9,) * 2)
    assert portable_path(tmp_path) is None
    os.utime(npz, ns=(later + 2 * 10**9,) * 2)
    assert portable_path(tmp_path) == npz
    pt.write_bytes(b"not a torch archive")
    assert torch_file_digest(pt) is None
    pt.unlink()
    assert portable_path(tmp_path) == npz
    npz.unlink()
    assert portable_path(tmp_path) is None
