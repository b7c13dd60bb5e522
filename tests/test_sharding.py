"""Sharded model state on 8 fake CPU devices: created shape-first and sharded, forward equal to 1 device."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, transformers
    jax.config.update("jax_default_matmul_precision", "highest")
    from vlm_jax.models.llava import Llava
    from vlm_jax.runtime import mesh as mesh_lib

    assert len(jax.devices()) == 8
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=120)
    model = Llava.from_hf_config(config)   # 2 vision layers: LLaVA reads the one before last
    args = model.init_inputs(batch=2)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    params = mesh_lib.sharded_init(model, args, jax.random.key(0), mesh)
    q = params["language_model"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    # ('embed', 'heads', 'kv') -> ('fsdp', 'tensor', None): each device holds a 1/8 slice.
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None), q.sharding.spec
    assert q.addressable_shards[0].data.size * 8 == q.size
    emb = params["language_model"]["model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), emb.sharding.spec

    # Both forwards jitted (one compile each): op-by-op dispatch of the reference took most of this test's time.
    single = jax.device_put(params, jax.devices()[0])
    ref = jax.jit(model.apply)({"params": single}, *args)
    with mesh:
        out = jax.jit(model.apply)({"params": params}, *args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    print("OK")
""")


def test_sharded_init_and_forward_on_8_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_a_config_mesh_rule_changes_a_params_sharding():
    """config.mesh_rules reaches the programs' placement (`runner.make_mesh` -> `stream.shardings_for`, which
    `load_lvlm` and the few-shot Backbone use): a rule moves a parameter's sharding; a bad rule is one line."""
    import jax
    import pytest

    from configs import dualadapter as da_config
    from vlm_jax import errors
    from vlm_jax.convert import stream
    from vlm_jax.models import clip
    from vlm_jax.programs import runner

    tower = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5)
    model = clip.CLIP(clip.VisionConfig(**tower, image_size=16, patch_size=8),
                      clip.TextConfig(**tower, vocab_size=64, max_position_embeddings=8, eos_token_id=2), 8)
    config = da_config.get_config("runlocal")

    def q_spec():
        mesh, rules = runner.make_mesh(config)
        tree = stream.shardings_for(model, mesh, rules)
        return tree["vision_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec
    P = jax.sharding.PartitionSpec
    assert q_spec() == P("fsdp", "tensor", None)              # DEFAULT_RULES: ('embed', 'heads', 'kv')
    config.mesh_rules = (("heads", None), ("embed", ("fsdp", "tensor")))
    assert q_spec() == P(("fsdp", "tensor"), None, None)
    for rules, match in (((("hedas", None),), "unknown logical axis 'hedas'"),
                         ((("heads", "model"),), "unknown mesh axis 'model'"), (("heads",), "pair")):
        config.mesh_rules = rules
        with pytest.raises(errors.UserError, match=match):
            runner.make_mesh(config)
