"""brainseg-monai: brain tumour segmentation in MRI on MONAI, from any scanner file to masks in the source geometry."""

__version__ = "0.9.0"
