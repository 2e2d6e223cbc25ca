"""Evaluators: VQA (``absvl.evaluation.vqa``: official accuracy, submission files, Shapes steering and probes) and
image-text retrieval (``absvl.evaluation.retrieval``: Karpathy-protocol recalls, re-ranked top-down). The CLI,
training's validation and the demo use them."""
