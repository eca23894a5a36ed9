"""sdi_jax: the JAX backend of SDI."""
