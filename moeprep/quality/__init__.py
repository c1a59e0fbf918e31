"""Quality as llama-perplexity scores it: pure maths over logits, apart from the stage that runs it."""
