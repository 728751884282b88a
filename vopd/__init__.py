"""vopd: benchmark and reproduction suite for on-policy distillation gradient estimators.

The estimator math lives in :mod:`vopd.estimators`; every other module is an entry point
(``python -m vopd.<name>``) that a Snakemake rule calls.
"""

__version__ = "0.1.0"
