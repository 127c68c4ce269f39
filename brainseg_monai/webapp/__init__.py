"""``brainseg serve``: a local web app to segment uploaded MR slices, volumes and DICOM series (research use only)."""

from brainseg_monai.webapp.app import create_app, serve
from brainseg_monai.webapp.service import Segmenter, Upload

__all__ = ["Segmenter", "Upload", "create_app", "serve"]
