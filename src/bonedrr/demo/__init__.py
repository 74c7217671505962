"""The demo cohort: virtual patients made from one real CT, with radiographs simulated by physics
the pipeline itself does not use.

* :mod:`bonedrr.demo.xray_physics` - X-ray spectrum, attenuation of bone mineral, soft tissue and fat,
  scatter, noise, detector blur and image processing.
* :mod:`bonedrr.demo.virtual_patient` - the template's materials and how one patient differs from it.
* :mod:`bonedrr.demo.cohort` - the ``demo-cohort`` stage: one patient's files, as users have theirs.
"""
