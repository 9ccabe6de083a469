"""Datasets in IMDL-BenCo's formats: discovery and validation (`sources`), the
PyTorch dataset (`dataset`), robustness attacks (`attacks`)."""
from .dataset import ForgeryDataset, normalize
from .sources import (DatasetError, Entry, ImageTooLargeError, UnsupportedImageError, allow_large_images, check_entries,
                      list_dataset, list_test_sets, load_entries, read_image, read_mask)

__all__ = [
    "DatasetError",
    "Entry",
    "ForgeryDataset",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "allow_large_images",
    "check_entries",
    "list_dataset",
    "list_test_sets",
    "load_entries",
    "normalize",
    "read_image",
    "read_mask",
]
