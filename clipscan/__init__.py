"""clipscan: find the systematic blind spots of CLIP-like embedding models.

Importing the package is light on purpose: torch, faiss, ray and vllm are imported
inside the functions and constructors that need them.
"""

__version__ = "0.1.0"
