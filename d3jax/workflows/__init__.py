"""In-memory workflows on the methods: a model on the test sets (``evaluation``), backdoor →
defend → measure on a named dataset (``pipeline``), grids trained at once (``sweep``), a grid's
point chosen without test data (``auto_choice``) and the ``d3jax demo`` (``demo``)."""
