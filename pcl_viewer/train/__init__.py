"""Training loops: counterfactual model, pre-training, fine-tuning, linear probe."""
