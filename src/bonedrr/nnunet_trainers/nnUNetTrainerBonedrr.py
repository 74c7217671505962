"""nnU-Net trainers of bonedrr, found by name by :func:`bonedrr.segment.find_trainer_class`.

To use a model trained with them from nnU-Net's own command line, point nnU-Net at this folder:
``nnUNet_extTrainer=src/bonedrr/nnunet_trainers nnUNetv2_predict ...``. Keep these modules to trainer
classes that only import nnU-Net and torch.
"""

import torch
from torch.optim import AdamW

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA


class nnUNetTrainerBonedrr(nnUNetTrainerNoDA):
    """nnU-Net's trainer without data augmentation, with AdamW at 1e-3: for a few hundred CPU iterations.

    No augmentation (nnU-Net's ``nnUNetTrainerNoDA``), hence no mirroring either: the labels are
    lateral (femur_left/right, ...), and a mirrored patch would teach the network that a left femur may
    look like a right one (TotalSegmentator trains without mirroring for the same reason); the rest of
    nnU-Net's augmentation pays off over its 250 000 iterations, not over a few hundred, and the demo's
    virtual patients already differ in shape, size and scanner. AdamW at 1e-3 (as nnU-Net's
    ``nnUNetTrainerAdam1en3``) reaches useful Dice within a few hundred iterations, where nnU-Net's
    SGD schedule is tuned for 250 000. For a real cohort use nnU-Net's own (``nnUNetTrainerNoMirroring``).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3

    def configure_optimizers(self):
        optimizer = AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                          amsgrad=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
