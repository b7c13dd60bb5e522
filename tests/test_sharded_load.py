"""Loading at scale: tensors streamed from safetensors straight into their sharding on 8 fake CPU devices.

Each check runs in a child process (tests/sharded_load_child.py) with 8 devices; the checkpoints are written
here. The reference for every value is the in-memory conversion (`load_tensors` + `apply_table`), the path
the HF parity tests (test_llama, test_llava, test_clip) check against PyTorch.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from vlm_jax.convert import llama as llama_convert
from vlm_jax.convert import llava as llava_convert
from vlm_jax.convert import loader, stream
from vlm_jax.models.llama import CausalLM, DecoderConfig
from vlm_jax.models.llava import Llava

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny depth, wide: 268 MB in float32; the embedding and the head are 67 MB each.
WIDE = dict(vocab_size=16384, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=64)


def run_child(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_load_child.py"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def random_checkpoint(out, family, model):
    """Random weights of `model`'s shapes, written by the family's own exporter (`to_hf`).

    numpy draws, not `model.init`: no compilation, about a second for the 200 MB model.
    """
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), family.param_shapes(model))
    return family.to_hf(model, params, out)


def llama(**overrides):
    return CausalLM(DecoderConfig.from_hf(transformers.LlamaConfig(**{**llama_convert.TINY, **overrides})))


def tiny_llava():
    """A tiny LLaVA (CLIP tower: every transform kind) with a vocabulary the meshes divide."""
    return Llava.from_hf_config(transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=120))


def test_each_device_holds_its_slice_and_host_memory_stays_near_one_checkpoint(tmp_path):
    big = random_checkpoint(tmp_path / "wide", llama_convert, llama(**WIDE))
    tiny = random_checkpoint(tmp_path / "tiny", llama_convert, llama())
    out = json.loads(run_child("scale", big, tiny).strip().splitlines()[-1])
    size, total = out["file_bytes"], out["total_bytes"]
    assert size > 250e6 and abs(total - size) < 1e5, (size, total)  # float32 in the file and on the devices
    # fsdp=8: the sharded params (all but the norms) split exactly in 8, so no device holds more than 1/8 of
    # the model plus the small replicated rest.
    assert all("'fsdp'" in spec for spec in out["specs"].values()), out["specs"]
    assert len(out["sharded_per_device"]) == 8
    for nbytes in out["sharded_per_device"].values():
        assert nbytes * 8 == out["sharded_total"], (nbytes, out["sharded_total"])
    assert out["sharded_total"] > 0.99 * total
    assert max(out["per_device"].values()) < 1.01 * total / 8, out["per_device"]
    # On CPU the devices' buffers are host memory (1x the checkpoint); everything else the load holds at once
    # (one device slice, one read block) must stay small.
    assert out["peak_rss"] < 1.3 * size, (out["peak_rss"], size)
    print(f"\ncheckpoint {size / 2**20:.1f} MiB; peak RSS of the load {out['peak_rss'] / 2**20:.1f} MiB "
          f"({out['peak_rss'] / size:.3f}x); per device {max(out['per_device'].values()) / 2**20:.2f} MiB")


def test_every_layout_and_dtype_equals_the_in_memory_conversion(tmp_path):
    assert "OK" in run_child("layouts", random_checkpoint(tmp_path / "llava", llava_convert, tiny_llava()),
                             random_checkpoint(tmp_path / "llama", llama_convert, llama()))


def split_into_shards(src, out):
    """Copies a checkpoint as two safetensors shards plus an index, as `save_pretrained(max_shard_size=...)` does."""
    from safetensors.numpy import save_file

    tensors, names = loader.load_tensors(src), sorted(loader.load_tensors(src))
    out.mkdir()
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text((src / "config.json").read_text())
    return out


def test_lazy_reads_equal_eager_reads_for_bfloat16_and_sharded_checkpoints(tmp_path):
    single = llama_convert.write_random_checkpoint(tmp_path / "bf16", dtype=jnp.bfloat16, model_type="qwen2")
    path = split_into_shards(single, tmp_path / "sharded")
    eager, lazy = loader.load_tensors(single), stream.open_tensors(path)
    assert eager.keys() == lazy.keys() and len({t.path for t in lazy.values()}) == 2
    for name, x in eager.items():
        assert lazy[name].dtype == x.dtype == np.dtype("bfloat16"), name
        np.testing.assert_array_equal(lazy[name].read(), x, err_msg=name)
        np.testing.assert_array_equal(lazy[name].read(1, 3), x[1:3], err_msg=name)
    # Streamed (blocks of a few rows, bf16 -> f32 per tensor) == in memory, one device.
    stream_block, stream._BLOCK_BYTES = stream._BLOCK_BYTES, 100
    try:
        model, params = llama_convert.from_pretrained(path, param_dtype=jnp.float32)
    finally:
        stream._BLOCK_BYTES = stream_block
    ref = loader.apply_table(llama_convert.table_for(model), eager, llama_convert.param_shapes(model),
                             ignore=llama_convert.IGNORE)
    for k, v in loader._flat(params).items():
        assert v.dtype == jnp.float32 and v.sharding.device_set == {jax.devices()[0]}, k
        np.testing.assert_array_equal(np.asarray(v), loader._flat(ref)[k], err_msg="/".join(k))


def test_mis_shaped_tensor_is_named_before_reading(tmp_path):
    path = llama_convert.write_random_checkpoint(tmp_path / "ok")
    tensors = loader.load_tensors(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :-1]
    del tensors["model.norm.weight"]
    tensors["model.extra"] = np.zeros(2, np.float32)
    loader.write_checkpoint(tmp_path / "bad", tensors, loader.read_config(path))
    with pytest.raises(loader.CheckpointError) as e:
        llama_convert.from_pretrained(tmp_path / "bad", scan_layers=True)
    msg = str(e.value)
    assert "wrong shape for model.layers.1.mlp.up_proj.weight: expected (64, 32)" in msg and "got (64, 31)" in msg
    assert "missing tensors: ['model.norm.weight']" in msg and "unexpected tensors: ['model.extra']" in msg
