"""Our Triton kernels, each with a torch reference that is also its CPU backend.

Knows nothing of the model: plain tensors in, tensors out; imports neither `moca` nor `engine` (the
README's layout: engine -> moca -> kernels).
"""

from kernels.attention import varlen_attention
from kernels.infonce import infonce
from kernels.recon_loss import masked_lm_loss, masked_patch_loss

__all__ = ["varlen_attention", "masked_lm_loss", "masked_patch_loss", "infonce"]
