"""fusedopt: fused SGD, Adam and AdamW for PyTorch.

Drop-in replacements for ``torch.optim.SGD``, ``Adam`` and ``AdamW`` with torch.optim's
results and checkpoints: each param group is packed into flat buffers per (device,
dtype) and every step is one fused kernel per buffer, on the CPU and on CUDA.
"""
from . import ops  # noqa: F401  (loads the kernels)
from .adam import Adam, AdamW
from .sgd import SGD

__version__ = "0.1.0"
__all__ = ["SGD", "Adam", "AdamW"]
