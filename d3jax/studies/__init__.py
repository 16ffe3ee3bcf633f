"""Studies over many runs: a sweep run directory, measured and drawn (``sweep_runs``), and the
paper's Table 1 as one command (``table``)."""
