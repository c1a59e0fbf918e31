"""Everything that talks to the Hugging Face Hub; nothing else imports huggingface_hub."""
