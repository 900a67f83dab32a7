"""Triton kernels of fastkd, installed as ``fastkd.kernels``.

Each module defines one loss's kernels and registers them as ``torch.library.triton_op`` ops
(``fastkd::<loss>_fwd_triton``); fastkd/ops.py adds their fake and autograd implementations.
Importing this package needs Triton; kernels run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from . import channel_attention, feature_regression, kd_loss, scale_grad, scale_grads  # noqa: F401
