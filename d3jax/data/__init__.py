"""Datasets as arrays (DESIGN.md, Data): sources, seeded splits, jittable augmentation."""
from d3jax.data.augment import augment, crop_at, normalize, random_crop, random_flip
from d3jax.data.dataset import Dataset, validate_images, validate_labels
from d3jax.data.sources import NORMALIZATION, from_arrays, load_dataset
from d3jax.data.splits import draw_reserved, split_holdout, stratified_split, subset

__all__ = [
    "Dataset", "NORMALIZATION", "augment", "crop_at", "draw_reserved", "from_arrays",
    "load_dataset", "normalize", "random_crop", "random_flip", "split_holdout",
    "stratified_split", "subset", "validate_images", "validate_labels",
]
