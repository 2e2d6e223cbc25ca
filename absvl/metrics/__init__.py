"""Evaluation metrics (official VQA accuracy)."""
