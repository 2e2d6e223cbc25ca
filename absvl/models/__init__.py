"""Models: vision backbones (``absvl.models.vision``)."""
