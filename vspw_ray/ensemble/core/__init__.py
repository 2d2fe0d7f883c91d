"""The hierarchical ensemble's Ray-free core (no Ray, no MLflow): group means and weighted
fusion (``fusion``), the one-pass grid search over the score store (``grid``), the stratified
pixel sample that scores a weight setting in milliseconds (``sample``), greedy forward selection
(``greedy``), the candidates and their exact rescoring on full folds (``candidates``,
``rescore``) and the chosen candidate's figures (``outcome``). The stage
(:mod:`vspw_ray.ensemble`: Tune trials, sharding over Ray tasks, report, submission) wires them
up.
"""
