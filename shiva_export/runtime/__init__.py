"""Runtime: full diffusers pipelines around (pruned) SD3 transformers. Submodules import torch/diffusers lazily."""
