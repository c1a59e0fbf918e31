"""GGUF files read and written with gguf-py: the header a probe reads, the shards a split writes."""
