"""moeprep: prepare Mixture-of-Experts models as GGUF files people can trust."""

__version__ = "0.1.0"
