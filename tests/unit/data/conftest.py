"""Fixtures of the data tests: tiny private datasets (see ``private_datasets.py``)."""

from private_datasets import image_folder, presplit_folder

__all__ = ["image_folder", "presplit_folder"]
