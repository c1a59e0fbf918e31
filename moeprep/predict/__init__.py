"""Predictions from recorded sizings: the offload plan and the tier table. No file is read here."""

# The GPU memory sizes (GiB) the tier table answers for: the common consumer and datacenter cards.
TIERS_GIB = (8, 12, 16, 24, 32, 48, 80, 96)
