"""bridge's runtime: llama.cpp contexts, drafting, verification and sampling.

Imports neither torch nor transformers, so a user who only chats installs neither.
"""
