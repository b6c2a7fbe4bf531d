"""Networks, the counterfactual model, classifiers and model bundles."""
