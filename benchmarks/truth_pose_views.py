"""Training views of truth-pose cohort patients (benchmarks/truth_pose_cohort.sh OUT N JOBS VIEWS).

For each given case of OUT/demo_input, views 1..V as :func:`bonedrr.demo.cohort.simulate_view` makes
them with ``views_protocol: random`` (other poses, and other kVp and processing: the anatomy held, the
radiograph varied) or, with the environment's ``VIEWS_PROTOCOL=same``, ``same`` (other poses at the
case's own protocol: a single-site cohort's repeat radiographs), from the random streams of the demo's own views. A held-out patient's views are
the ones ``benchmarks/pose_repeatability.py`` makes too, but they sit in the patient's own fold, which
the fold's model never trains on. Writes OUT/views/<case>_v<k>/xray.dcm
(16-bit DICOM DX, no patient data) and view.json (its true geometry and exposure).

    python benchmarks/truth_pose_views.py OUT V demo_000 demo_001 ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from bonedrr.demo.cohort import DemoSettings, draw_patient, simulate_view
from bonedrr.demo.naming import DEFAULTS
from bonedrr.demo.xray_physics import XrayExposure
from bonedrr.dicom import write_radiograph_dicom

def main() -> None:
    out, n_views, cases = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    for case in cases:
        truth = json.loads((out / "demo_input" / case / "truth.json").read_text())
        geometry = truth["geometry"]
        settings = DemoSettings(seed=truth["seed"], rows=geometry["rows"], cols=geometry["cols"],
                                pixel_mm=tuple(geometry["pixel_mm"]), sdd_mm=DEFAULTS["sdd_mm"],
                                proximal_femur_cut_mm=truth["proximal_femur_cut_mm"], views_protocol=os.environ.get("VIEWS_PROTOCOL", "random"))
        patient, _, _ = draw_patient(truth["index"], settings)
        for k in range(1, n_views + 1):
            folder = out / "views" / f"{case}_v{k}"
            if (folder / "view.json").is_file():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            view = simulate_view(patient, truth["view_centre_world_mm"], XrayExposure(**truth["exposure"]), settings,
                                 truth["index"], k)
            image = view.pop("image")
            write_radiograph_dicom(folder / "xray.dcm", np.round(image * 65535).astype(np.uint16), settings.pixel_mm,
                                   view["geometry"]["sdd_mm"], view["source_to_centre_mm"],
                                   {"PatientIdentityRemoved": "YES", "StudyDate": ""},
                                   key=f"truth-pose/{case}/view{k}", bits_stored=16, kvp=view["exposure"]["kvp"])
            (folder / "view.json").write_text(json.dumps(view))


if __name__ == "__main__":
    main()
