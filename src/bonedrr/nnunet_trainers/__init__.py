"""nnU-Net trainer classes of bonedrr (see nnUNetTrainerBonedrr.py)."""
