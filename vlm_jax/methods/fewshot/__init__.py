"""The faces of the few-shot CLIP methods (`vlm_jax.methods.fewshot_registry`), one module per method family.

Every public module here is imported by the registry on its first lookup and registers its methods; the math
stays in the method's own module (`vlm_jax.methods.tip_adapter`, `vlm_jax.methods.dualadapter`, ...).
"""
