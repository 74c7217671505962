"""The decomposition model's parts (torch): the U-Net and discriminator (:mod:`.network`), the losses
(:mod:`.losses`), training augmentation (:mod:`.augment`), and the hip locator (:mod:`.locator`).

Training, checkpoints and the loadable model are in :mod:`bonedrr.train`; the clinic command in
:mod:`bonedrr.estimate`, which runs the trained networks without torch (:mod:`.portable`, NumPy). Only
these modules (but :mod:`.portable`) and :mod:`bonedrr.dataset` import torch.
"""
