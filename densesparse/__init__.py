"""densesparse: turn a dense transformer LM into a sparse-inference model (neuron-group experts + threshold routers)."""
import os

__version__ = "0.1.0"

# PyTorch's CPU allocator reads this when it first needs it: tensors of 2 MB and more are then backed by transparent
# huge pages, so the many vocabulary- and activation-sized temporaries of a conversion take far fewer page faults.
# Kept if the user set it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__all__ = ["__version__", "load", "convert", "calibrate", "evaluate"]


def __getattr__(name):
    # heavy imports (torch, transformers) stay lazy so `densesparse --help` is instant
    if name == "load":
        from densesparse.io import load
        return load
    if name in ("convert", "calibrate"):
        from densesparse import pipeline
        return getattr(pipeline, name)
    if name == "evaluate":
        from densesparse.evaluate import evaluate
        return evaluate
    raise AttributeError(name)
