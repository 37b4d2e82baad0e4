"""sae.kernels.csr."""
