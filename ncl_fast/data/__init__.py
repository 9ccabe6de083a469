"""Datasets in IMDL-BenCo's formats: discovery, validation and decoding (`sources`),
the PyTorch dataset (`dataset`), the training sampler (`sampler`), batches to model
inputs on the device (`model_input`), robustness attacks (`attacks`)."""
from .dataset import ForgeryDataset
from .model_input import MEAN, STD, ModelInput, to_model_input
from .sampler import EpochSampler
from .sources import (DatasetError, Entry, ImageTooLargeError, UnsupportedImageError, allow_large_images, check_entries,
                      list_dataset, list_test_sets, load_entries, read_image, read_mask, tampered)

__all__ = [
    "DatasetError",
    "Entry",
    "EpochSampler",
    "ForgeryDataset",
    "ImageTooLargeError",
    "MEAN",
    "ModelInput",
    "STD",
    "UnsupportedImageError",
    "allow_large_images",
    "check_entries",
    "list_dataset",
    "list_test_sets",
    "load_entries",
    "read_image",
    "read_mask",
    "tampered",
    "to_model_input",
]
