"""Framework adapters for clusterlearn (installed as ``clusterlearn.adapters``).

``clusterlearn.adapters.torch`` and ``clusterlearn.adapters.jax`` wire the framework-free core
into PyTorch and JAX training loops. Importing this package imports no framework.
"""
