"""Run directories on disk: their files, orbax checkpoints and manifest (``checkpoint``), per-epoch
curves (``curves``), attack and defense runs (``runs``) and runs imported from BackdoorBench
(``imported_runs``)."""
