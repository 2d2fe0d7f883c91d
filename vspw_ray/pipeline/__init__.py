"""`vspw-ray pipeline`: every stage of the recipe in order, each skipped when its output for the
same settings is already in storage (``keys``, ``records``, ``plan``, ``run``)."""
