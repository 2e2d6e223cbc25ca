"""Metrics: the official VQA accuracy (``vqa``), retrieval recall (``retrieval``), and what the Shapes world
lets us measure of a model: steering scores (``steering``), linear probes of its tokens (``probes``) and the
question-only / image-only baselines (``baselines``)."""
