"""Data for NoProp training: image datasets (`image`) and their file readers (`formats`)."""

from noprop_fast.data.formats import read_cifar_pickle, read_idx
from noprop_fast.data.image import IMAGE_DATASETS, ImageData, batches, load_image_dataset

__all__ = ["IMAGE_DATASETS", "ImageData", "batches", "load_image_dataset", "read_cifar_pickle",
           "read_idx"]
