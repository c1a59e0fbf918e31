"""Everything that talks to libllama and llama.cpp's programs; nothing else imports llama_cpp."""
