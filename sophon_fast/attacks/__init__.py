"""Fine-tuning attacks on (protected) models, the scratch baseline, suites and metrics.

``run(model, train, test, attack, seed)`` gives the restricted test-accuracy curve of one attack;
``evaluate_suite`` runs a list of attacks on the protected model, the unprotected model and a
freshly initialised copy (``scratch``); ``overhead`` and ``head_start_removed`` summarise curves.
"""
from sophon_fast.attacks.adaptive import AdaptiveAttack, AdaptiveConfig, evaluate_adaptive
from sophon_fast.attacks.metrics import Overhead, epochs_to_reach, head_start_removed, overhead
from sophon_fast.attacks.run import accuracy, evaluate_suite, run, scratch
from sophon_fast.attacks.spec import METHODS, OPTIMIZERS, PAPER, SUITES, Attack, suite
from sophon_fast.attacks import lm  # noqa: F401,E402  (language-model attacks: LMAttack, evaluate_suite)
from sophon_fast.attacks import diffusion  # noqa: F401,E402  (denoiser attacks: DiffusionAttack, evaluate_suite)

__all__ = ["METHODS", "OPTIMIZERS", "PAPER", "SUITES", "Attack", "Overhead", "accuracy", "epochs_to_reach",
           "evaluate_suite", "head_start_removed", "overhead", "run", "scratch", "suite"]
__all__ += ["AdaptiveAttack", "AdaptiveConfig", "evaluate_adaptive"]
