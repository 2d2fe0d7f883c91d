"""`vspw-ray tune`: the hyperparameter search (Ray Tune + Optuna, each trial a Ray Train run)."""
