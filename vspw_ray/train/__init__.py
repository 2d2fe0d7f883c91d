"""Training: plain loop functions (``loop``); the Ray Train shell builds on them."""
