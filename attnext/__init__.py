"""attnext: fast exact attention, softmax(Q·Kᵀ·scale)·V, for PyTorch on CPUs and NVIDIA GPUs."""

from attnext import _ops  # noqa: F401  (loads the kernels and registers fake kernels and autograd)
from attnext.api import attention, flash_attn_func, scaled_dot_product_attention

__version__ = "0.1.0"
__all__ = ["attention", "scaled_dot_product_attention", "flash_attn_func", "__version__"]
