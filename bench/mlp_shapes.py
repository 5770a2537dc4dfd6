"""MLP shapes the GPU benchmark times, (hidden, intermediate), by name: read by gpu_speed.py and by the test that
checks runtime.SPARSE_MIN_MB against its records (this file imports nothing, so CPU CI can read it)."""
SHAPES = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008), "smollm2-135m": (576, 1536),
          # between the default model's MLP and Llama-2-7B's: where sparsity starts to pay (--sweep --shapes)
          "smollm2-360m": (960, 2560), "qwen2.5-0.5b": (896, 4864), "llama3.2-1b": (2048, 8192),
          "llama3.2-3b": (3072, 8192)}
