"""The D3 paper's analyses as PNGs: path curves (Figure 2), weight-difference histograms
(Figure 3c), t-SNE of penultimate features (Figure 3a/b), Grad-CAM (supplement Figure 3) and
neuron norm vs trigger-activation change (FT-SAM paper, Figure 4); and the table and heat map of
a hyperparameter grid (Tables 6–7).

Analyses that read the backdoor test set (path, t-SNE, Grad-CAM, TAC) are evaluation tools: no
defense and no hyperparameter rule may call them.
"""
from d3jax.analysis.data import Paired, paired
from d3jax.analysis.gradcam import gradcam, plot_gradcam
from d3jax.analysis.grid import format_grid_table, heatmap
from d3jax.analysis.path import PathCurves, interpolate, path_curves, plot_paths
from d3jax.analysis.probe import activations, conv_layers, last_conv, penultimate
from d3jax.analysis.run import ANALYSES, analyze, defense_labels
from d3jax.analysis.tac import neuron_norms, plot_tac, trigger_activation_change
from d3jax.analysis.tsne import embed, plot_tsne
from d3jax.analysis.weights import plot_weight_differences, weight_differences

__all__ = ["ANALYSES", "Paired", "PathCurves", "activations", "analyze", "conv_layers",
           "defense_labels", "embed", "format_grid_table", "gradcam", "heatmap", "interpolate",
           "last_conv", "neuron_norms", "paired", "path_curves", "penultimate", "plot_gradcam",
           "plot_paths", "plot_tac", "plot_tsne", "plot_weight_differences",
           "trigger_activation_change", "weight_differences"]
