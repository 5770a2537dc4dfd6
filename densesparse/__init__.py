"""densesparse: turn a dense transformer LM into a sparse-inference model (neuron-group experts + threshold routers)."""
__version__ = "0.1.0"

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
