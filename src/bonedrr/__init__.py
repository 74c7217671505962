"""bonedrr: training data for X-ray decomposition and BMD from a single hip radiograph.

The package is a picture of the pipeline: one module per stage (``demo``, ``ingest``, ...) and
shared modules for geometry (``geometry``), labels (``labels``), image and DICOM I/O (``images``,
``dicom``), configuration (``config``) and errors (``errors``). Rules call it through the ``bonedrr``
command line (``bonedrr.cli``); the package never imports Snakemake.
"""

__version__ = "0.1.0"
