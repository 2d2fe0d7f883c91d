"""The hierarchical ensemble stage (`vspw-ray ensemble`): its members in the score store
(``members``, ``grouping``), the search methods (``methods``; Ray Tune + Optuna in
``tune_search``), sharding over Ray tasks (``raymap``), the report, charts and MLflow logging
(``report``, ``charts``, ``tracked``), the submission (``submit``), wired up in ``stage``.
The arithmetic is in :mod:`vspw_ray.ensemble.core`, which imports no Ray and no MLflow.
"""
