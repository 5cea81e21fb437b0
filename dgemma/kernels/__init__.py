"""Fast paths, each beside the plain PyTorch reference it is tested against (same signature, switchable)."""
