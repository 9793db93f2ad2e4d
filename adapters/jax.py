"""JAX adapter (skeleton): the jit-compiled memory step arrives with the JAX issue.

The core objects already accept and return ``jax.Array`` (eagerly, outside ``jit``).
"""
