"""Runtime: full diffusers pipelines (SD3, Flux, PixArt-Sigma, DiT) around (pruned) transformers, on PyTorch,
ONNX Runtime or TensorRT. Everything architecture-specific comes from the model's adapter
(``shiva_export.models``). Submodules import torch/diffusers lazily."""
