"""The runtime floor: mesh and sharding, multi-host setup, metric writers, workdirs, checkpoint location, cache.

Everything above (models, convert, data, eval, methods, train, programs) may import it; it imports nothing of
vlm_jax but `vlm_jax.errors`.
"""
