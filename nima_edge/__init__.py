"""nima-edge: train, quantize once, export to every edge runtime, verify, benchmark."""
__version__ = "0.1.0"
