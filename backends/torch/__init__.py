"""sdi_torch: the PyTorch backend of SDI."""
