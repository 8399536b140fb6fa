"""ic-compile kernels: Triton kernels with pure-torch references, registered as torch.library ops."""
