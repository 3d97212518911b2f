"""volfm.evaluate: the checkpoint protocols behind ``volfm evaluate`` (pretraining, synthesis)."""
