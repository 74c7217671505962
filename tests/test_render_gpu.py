"""The CUDA paths against the CPU kernels (skipped where no NVIDIA GPU with CuPy is present)."""

import numpy as np
import pytest
import SimpleITK as sitk

from bonedrr.device import cuda_available
from bonedrr.geometry import Geometry, ap_pose
from bonedrr.images import index_to_world
from bonedrr.labels import PRESETS, remap
from bonedrr.render import Renderer

from conftest import REAL_CT, REAL_LABELS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA device (CuPy)")]


@pytest.mark.parametrize("method", ["siddon", "trilinear"])
@pytest.mark.parametrize("backend", ["compiled", "array"])
def test_cuda_matches_cpu_on_the_real_ct(method, backend):
    ct = sitk.ReadImage(str(REAL_CT), sitk.sitkFloat32)
    density = np.clip(1000.0 + sitk.GetArrayFromImage(ct), 0, None).astype(np.float32)
    labels = remap(sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_LABELS))), PRESETS["totalsegmentator_v2"])
    a = index_to_world(ct)
    centre = a[:3, :3] @ ((np.array(ct.GetSize()) - 1) / 2) + a[:3, 3]
    g = Geometry.centered(1000.0, 128, 160, (2.5, 2.5), ap_pose(centre, 700.0, rotvec_deg=(4, -7, 12)))
    cpu = Renderer(density, labels, a, n_channels=14, method=method, device="cpu").render(g)
    gpu = Renderer(density, labels, a, n_channels=14, method=method, device="cuda", backend=backend).render(g)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)
