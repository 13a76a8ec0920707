"""The release audit: an Optuna attack search on a protected model and its baselines (issue 39).

``audit(protected, train, test, unprotected=..., original=..., budget="quick")`` searches each model's
strongest fine-tuning attack (:mod:`sophon_fast.audit.spaces`), stores the studies in ``<out>/audit.db`` (a rerun
continues them) and writes report.json/.md/.png with the verdict (:mod:`sophon_fast.audit.report`). Needs optuna
(``pip install 'sophon_fast[audit]'``). Sits above :mod:`sophon_fast.attacks`; the core never imports it.
"""
from sophon_fast.audit.report import VERDICT_RULE, verdict
from sophon_fast.audit.search import BUDGETS, audit, fingerprint, load_studies, make_space
from sophon_fast.audit.spaces import IMAGE_METHODS, IMAGE_OPTIMIZERS, LR_RANGES, DiffusionSpace, ImageSpace, LMSpace

__all__ = ["BUDGETS", "IMAGE_METHODS", "IMAGE_OPTIMIZERS", "LR_RANGES", "VERDICT_RULE", "DiffusionSpace",
           "ImageSpace", "LMSpace", "audit", "fingerprint", "load_studies", "make_space", "verdict"]
