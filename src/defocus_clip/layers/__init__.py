"""Building blocks shared by the towers: one paper concept per module."""
