"""The hierarchical ensemble's Ray-free core: group means and weighted fusion (``fusion``), the
one-pass grid search over the score store (``grid``), the stratified pixel sample that scores a
weight setting in milliseconds (``sample``) and greedy forward selection (``greedy``). The stage
(`vspw-ray ensemble`: Tune trials, sharding over Ray tasks, report, submission) wires them up.
"""
