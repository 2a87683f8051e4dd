"""The scale-adaptive neural operator (SANO): encoder layers, heads and the model."""
