"""Models: vision backbones (``absvl.models.vision``: ViT, AbSViT, VARS, ResNet, TDAM and their registry) and
the vision-language model (``absvl.models.vl``: text prior, fusion, heads, losses, Hub I/O)."""
