"""Recipes, the release's stage list, the staging branch between CI jobs, promotion, capacity."""
