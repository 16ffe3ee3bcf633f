"""``python -m d3jax``: the ``d3jax`` command."""
from d3jax.cli import run

run()
