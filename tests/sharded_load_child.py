"""Child process for tests/test_sharded_load.py (needs 8 fake CPU devices; run by the test).

  python tests/sharded_load_child.py scale BIG_CKPT TINY_CKPT
  python tests/sharded_load_child.py layouts LLAVA_CKPT LLAMA_CKPT

scale: loads BIG_CKPT (a wide float32 Llama) scanned onto an fsdp=8 mesh and prints one JSON line with the
peak host RSS of the load above the RSS before it (VmHWM, reset through /proc/self/clear_refs after a warm-up
load of TINY_CKPT, so one-time imports and caches are not counted), the bytes each device holds, and whether
every value equals the in-memory conversion (`loader.load_tensors` + `apply_table` + `stack_layers`, the path
the HF parity tests check).

layouts: loads a LLaVA (every transform kind) and a scanned Llama onto meshes that split rows, columns and
heads, in float32 and cast to bfloat16 per tensor, reading in blocks far smaller than a tensor, and checks
each against the in-memory conversion, and the LLaVA's bytes per device against `plan_core.param_bytes`; a mesh the
params do not divide is a one-line error naming them.
Prints OK on success.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import llama as llama_convert
from vlm_jax.convert import llava as llava_convert
from vlm_jax.convert import loader, stream
from vlm_jax.errors import UserError
from vlm_jax.programs import plan_core
from vlm_jax.runtime import mesh as mesh_lib


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reference(ckpt, family, model, dtype=None):
    """The in-memory conversion of `ckpt` (host numpy), laid out like `model`'s params."""
    tensors = loader.load_tensors(ckpt)
    if family is llama_convert:
        flat = model.clone(scan_layers=False)
        params = loader.apply_table(llama_convert.table_for(flat), tensors, llama_convert.param_shapes(flat),
                                    ignore=llama_convert.IGNORE, dtype=dtype)
        return llama_convert.stack_layers(params, model.cfg.num_layers) if model.scan_layers else params
    layout = llava_convert.detect_layout(tensors)
    return loader.apply_table(llava_convert.llava_table(model.cfg, layout), tensors,
                              llava_convert.param_shapes(model), ignore=llava_convert.IGNORE, dtype=dtype)


def assert_equal(params, ref):
    flat, flat_ref = loader._flat(params), loader._flat(ref)
    assert flat.keys() == flat_ref.keys(), set(flat) ^ set(flat_ref)
    for k, v in flat.items():
        assert v.dtype == flat_ref[k].dtype, (k, v.dtype, flat_ref[k].dtype)
        np.testing.assert_array_equal(np.asarray(v), flat_ref[k], err_msg="/".join(k))


def device_bytes(params):
    """(bytes per device over all params, the same over the sharded params only, total sharded bytes)."""
    per, sharded_per, sharded_total = {}, {}, 0
    for x in jax.tree.leaves(params):
        sharded = not x.sharding.is_fully_replicated
        sharded_total += x.nbytes if sharded else 0
        for s in x.addressable_shards:
            per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
            if sharded:
                sharded_per[s.device.id] = sharded_per.get(s.device.id, 0) + s.data.nbytes
    return per, sharded_per, sharded_total


def scale(big, tiny):
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8})
    jax.block_until_ready(llama_convert.from_pretrained(tiny, scan_layers=True, mesh=mesh)[1])  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    model, params = llama_convert.from_pretrained(big, scan_layers=True, mesh=mesh)
    jax.block_until_ready(params)
    peak = _status("VmHWM") - before
    per, sharded_per, sharded_total = device_bytes(params)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    file_bytes = sum(f.stat().st_size for f in loader.safetensors_files(big))
    emb = params["model"]["embed_tokens"]["embedding"]
    up = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    specs = {"embed_tokens": str(emb.sharding.spec), "layers/mlp/up_proj": str(up.sharding.spec)}
    assert_equal(params, reference(big, llama_convert, model))
    print(json.dumps(dict(peak_rss=peak, file_bytes=file_bytes, total_bytes=total, per_device=per,
                          sharded_per_device=sharded_per, sharded_total=sharded_total, specs=specs)))


def layouts(llava_ckpt, llama_ckpt):
    stream._BLOCK_BYTES = 200  # many blocks per tensor, and blocks that end inside a device's slice
    # The second mesh also replicates every param over 'data'.
    for shape in ({"data": 1, "fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = mesh_lib.make_mesh(shape)
        for dtype in (jnp.float32, jnp.bfloat16):
            model, params = llava_convert.from_pretrained(llava_ckpt, param_dtype=dtype, mesh=mesh)
            assert_equal(params, reference(llava_ckpt, llava_convert, model, dtype=np.dtype(dtype)))
            q = params["language_model"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
            assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None), q.sharding.spec
            assert q.addressable_shards[0].data.size * shape["fsdp"] * shape["tensor"] == q.size
            # `vlm-jax plan` predicts, from shapes alone, the bytes each device now holds.
            planned = plan_core.param_bytes(stream.abstract_params(model), shape)
            assert set(device_bytes(params)[0].values()) == {planned}, (device_bytes(params)[0], planned)
            model, params = llama_convert.from_pretrained(llama_ckpt, param_dtype=dtype, scan_layers=True,
                                                          mesh=mesh)
            assert_equal(params, reference(llama_ckpt, llama_convert, model, dtype=np.dtype(dtype)))
            print(shape, np.dtype(dtype), "equal", flush=True)
    # Without a mesh: the default device, the same values.
    model, params = llava_convert.from_pretrained(llava_ckpt)
    assert {x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(params)} == {True}
    assert_equal(params, reference(llava_ckpt, llava_convert, model))
    # kv_heads (2) over tensor=8: named, before anything is read.
    try:
        llama_convert.from_pretrained(llama_ckpt, mesh=mesh_lib.make_mesh({"data": 1, "tensor": 8}))
        raise AssertionError("an indivisible mesh loaded")
    except UserError as e:
        assert "cannot be split evenly" in str(e) and "k_proj/kernel" in str(e) and "\n" not in str(e), e
    # A rule that shards the stacked layer axis (2 layers over fsdp=2) fills each device's layers only.
    # (First, so that it takes 'fsdp' before 'embed' does.)
    rules = [["layers", "fsdp"]] + [list(r) for r in mesh_lib.DEFAULT_RULES if r[0] != "layers"]
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model, params = llama_convert.from_pretrained(llama_ckpt, scan_layers=True, mesh=mesh, rules=rules)
    assert params["model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec[0] == "fsdp"
    assert_equal(params, reference(llama_ckpt, llama_convert, model))
    print("OK")


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    {"scale": scale, "layouts": layouts}[sys.argv[1]](*sys.argv[2:])
