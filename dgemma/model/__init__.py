"""The DiffusionGemma network: layers and the shared encoder/decoder stack."""
