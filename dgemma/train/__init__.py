"""Training and evaluation on code corpora."""
