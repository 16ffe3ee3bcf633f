"""``python -m d3jax``: the ``d3jax`` command."""
import sys

from d3jax.cli import main

sys.exit(main())
