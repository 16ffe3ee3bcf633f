"""Optax transformations for backdoor detoxification; independent of d3jax models and data."""
from d3jax.optim.d3 import clean_hinge, d3, distance, distance_ascent, loss_scale, project_norm
from d3jax.optim.norms import NORMS, norm_gradient, tensor_norm
from d3jax.optim.reference import keep_reference
from d3jax.optim.sam import adaptive_sam
from d3jax.optim.selection import param_paths, path_string, select_mask

__all__ = [
    "NORMS", "adaptive_sam", "clean_hinge", "d3", "distance", "distance_ascent", "keep_reference", "loss_scale", "norm_gradient",
    "param_paths", "path_string", "project_norm", "select_mask", "tensor_norm",
]
