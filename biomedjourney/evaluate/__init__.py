"""Evaluation battery: does a generated follow-up show the described findings and stay the same patient?

    python -m biomedjourney.evaluate --model PATH --split val --out DIR  # the results table
    python train/train_evaluators.py --out assets/evaluators             # the evaluator CNN (repository)
"""
from .evaluators import Evaluators, EvaluatorConfig, load_evaluators, tiny_evaluators  # noqa: F401
from .metrics import cmig, macro_auc, pearson_r, reid_auc, roc_auc  # noqa: F401
