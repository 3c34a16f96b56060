"""Tokenizers (placeholder until the tokenizer package lands)."""


def load_tokenizer(path):
    return None
