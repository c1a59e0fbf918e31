"""Predictions from recorded sizings: the offload plan and the tier table. No file is read here."""
