import numpy as np
import SimpleITK as sitk

from bonedrr.images import world_axis_grid
from bonedrr.labels import CANONICAL_LABELS, PRESETS, proximal_femur_mask, remap

from conftest import REAL_LABELS


def test_totalsegmentator_preset_on_the_real_segmentation():
    seg = sitk.ReadImage(str(REAL_LABELS))
    canonical = remap(sitk.GetArrayFromImage(seg), PRESETS["totalsegmentator_v2"])
    counts = {name: int((canonical == i).sum()) for name, i in CANONICAL_LABELS.items()}
    # Voxel counts of the data set's README.
    assert counts["femur_left"] == 4488 and counts["femur_right"] == 4396
    assert counts["hip_left"] == 13166 and counts["hip_right"] == 13048
    assert counts["gluteus_maximus_left"] == 11956 and counts["iliopsoas_right"] == 9881
    assert counts["other_bone"] > 10000  # sacrum and lumbar vertebrae
    assert canonical.dtype == np.uint8


def test_proximal_femur_is_a_cut_below_the_head_top():
    seg = sitk.ReadImage(str(REAL_LABELS))
    canonical = remap(sitk.GetArrayFromImage(seg), PRESETS["totalsegmentator_v2"])
    z = world_axis_grid(seg, 2)
    full = proximal_femur_mask(canonical, "right", z, length_mm=200)
    short = proximal_femur_mask(canonical, "right", z, length_mm=15)
    assert full.sum() == 4396  # the scan ends above 200 mm: the whole femur
    femur_z = np.broadcast_to(z, canonical.shape)[canonical == CANONICAL_LABELS["femur_right"]]
    assert np.broadcast_to(z, canonical.shape)[short].min() >= femur_z.max() - 15
    assert 0 < short.sum() < full.sum()
    assert not proximal_femur_mask(np.zeros((3, 3, 3), np.uint8), "left", np.zeros((3, 3, 3))).any()
