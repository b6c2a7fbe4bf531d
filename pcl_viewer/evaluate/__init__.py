"""Evaluation: metrics, folds, benchmark tables, counterfactual quality."""
