import json

import numpy as np
import pytest

from bonedrr.geometry import (AP_ROTATION, Geometry, ap_pose, apply, check_rigid, params_from_pose,
                              pose_from_params, translation)

DESIGN_EXAMPLE = {"sdd_mm": 1000.0, "rows": 256, "cols": 256, "pixel_mm": [1.0, 1.0],
                  "principal_point_px": [127.5, 127.5],
                  "world_to_camera": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 600], [0, 0, 0, 1]]}


def test_design_example_round_trips_and_projects_with_magnification():
    g = Geometry.from_dict(DESIGN_EXAMPLE)
    assert g.to_dict() == json.loads(json.dumps(g.to_dict()))
    assert Geometry.from_dict(g.to_dict()).to_dict() == g.to_dict()
    # A world point 10 mm along +x at depth 600 mm lands 10 * 1000/600 pixels right of the centre.
    rc = g.project(np.array([[10.0, 0.0, 0.0]]))[0]
    assert rc[0] == pytest.approx(127.5)
    assert rc[1] == pytest.approx(127.5 + 10 * 1000 / 600)
    # +y in camera is a larger row index.
    assert g.project(np.array([[0.0, 6.0, 0.0]]))[0][0] == pytest.approx(127.5 + 10.0)


def test_pixel_centres_follow_the_contract():
    g = Geometry(sdd_mm=900.0, rows=4, cols=5, pixel_mm=(0.5, 2.0), principal_point_px=(1.0, 3.0))
    centres = g.pixel_centers_camera()
    assert centres.shape == (4, 5, 3)
    np.testing.assert_allclose(centres[2, 4], [(4 - 3) * 2.0, (2 - 1) * 0.5, 900.0])
    # Projecting the centres back (pose = identity) gives their own indices.
    rc = g.project(centres.reshape(-1, 3)).reshape(4, 5, 2)
    np.testing.assert_allclose(rc[..., 0], np.arange(4)[:, None] * np.ones((1, 5)), atol=1e-9)
    np.testing.assert_allclose(rc[..., 1], np.arange(5)[None, :] * np.ones((4, 1)), atol=1e-9)


def test_pose_parameters_round_trip():
    params = np.array([3.0, -2.0, 10.0, 5.0, -7.0, 650.0])
    pose = pose_from_params(params)
    np.testing.assert_allclose(params_from_pose(pose), params, atol=1e-9)
    # 90 degrees about z takes x to y.
    np.testing.assert_allclose(apply(pose_from_params([0, 0, 90, 0, 0, 0]), np.array([1.0, 0, 0])),
                               [0, 1, 0], atol=1e-12)


def test_ap_pose_puts_patient_left_to_image_right_and_head_up():
    centre = np.array([10.0, -20.0, 150.0])
    g = Geometry.centered(1000.0, 101, 101, (1.0, 1.0), ap_pose(centre, 800.0))
    c = g.project(centre[None])[0]
    np.testing.assert_allclose(c, [50, 50], atol=1e-9)
    left = g.project((centre + [50, 0, 0])[None])[0]
    head = g.project((centre + [0, 0, 50])[None])[0]
    assert left[1] > c[1] and abs(left[0] - c[0]) < 1e-9  # patient's left: larger column
    assert head[0] < c[0]  # superior: smaller row (top of the image)
    # The source is anterior (smaller LPS y) of the centre, at 800 mm.
    source = g.source_world()
    np.testing.assert_allclose(source, centre - [0, 800, 0], atol=1e-9)
    assert np.linalg.det(AP_ROTATION) == pytest.approx(1.0)


def test_non_rigid_pose_is_rejected():
    with pytest.raises(ValueError, match="rigid"):
        check_rigid(np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="rigid"):
        check_rigid(np.diag([-1.0, 1.0, 1.0, 1.0]))  # a reflection
    with pytest.raises(ValueError, match="4x4"):
        check_rigid(np.eye(3))
    np.testing.assert_allclose(check_rigid(translation([1, 2, 3]))[:3, 3], [1, 2, 3])
