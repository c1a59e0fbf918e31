"""The model card: rendered from the manifest alone, and linted by rendering it again."""
