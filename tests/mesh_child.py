"""Child process for tests/test_mesh_equivalence.py (needs 8 fake CPU devices; run by the test).

  python tests/mesh_child.py [CASE ...]      (all of CASES when none is named)

Each case builds a method's real loss function on a tiny random model, trains 2 steps with `trainer.fit` on 1
device and under one 8-device mesh (the model's parameters laid out by their logical axes, `mesh.shard_params`),
and checks the per-step losses and the updated trainable parameters against the 1-device run. Prints one line
per case that passed and one `FAIL <case>: ...` line per case that did not (then exits 1); OK when all passed.
All cases run in this one process: each child costs ~8 s of imports, and each mesh a step compile of 5-20 s.

Which meshes, and why (mesh.DEFAULT_RULES: batch -> data x fsdp, embed -> fsdp, mlp / heads / vocab /
kv_heads -> tensor):
  - data x fsdp x tensor (2 x 2 x 2) for every method: every rule of the table is active at once (the batch split
    over two axes, weights split along embed and along mlp / heads), so a wrong rule, a lost all-reduce or a
    re-laid-out optimizer state shows. The pure data (8) and pure fsdp (8) meshes that ran before for DualAdapter
    and TSM only switch on subsets of these rules, so they are not repeated.
  - fsdp (8) for VladVA and VITask on LLaVA: the mesh a large LVLM needs (weights split, not replicated), at its
    widest: each weight's embed dimension split 8 ways (4 of 32 per device) and one batch row per device.
  - VladVA and VITask on InternVL and on Qwen2-VL ('families') under the mixed mesh: their own vision towers,
    tile / M-RoPE inputs and projector layouts meet the sharding rules.
"""

import functools
import re
import sys
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from vlm_jax.methods import vladva as disc
from vlm_jax.methods import dualadapter, tsm, vitask
from vlm_jax.models import clip as clip_lib
from vlm_jax.models import llava as llava_lib
from vlm_jax.models import peft
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.train import trainer

jax.config.update("jax_default_matmul_precision", "highest")
FSDP = {"fsdp": 8, "data": 1}
MIXED = {"data": 2, "fsdp": 2, "tensor": 2}
# name -> (setup function name, model family or None, mesh); see the module docstring for why these meshes.
CASES = {
    "dualadapter": ("setup_dualadapter", None, MIXED),
    "tsm": ("setup_tsm", None, MIXED),
    "vladva/llava": ("setup_vladva", "llava", FSDP),
    "vitask/llava": ("setup_vitask", "llava", FSDP),
    "vladva/internvl": ("setup_vladva", "internvl", MIXED),
    "vladva/qwen2_vl": ("setup_vladva", "qwen2_vl", MIXED),
    "vitask/internvl": ("setup_vitask", "internvl", MIXED),
    "vitask/qwen2_vl": ("setup_vitask", "qwen2_vl", MIXED),
}
B, STEPS = 8, 2
# float32 with different reduction orders (sharded matmuls, all-reduced gradients): equal up to rounding.
# ATOL is 1e-3 of one lr-1e-2 step.
RTOL, ATOL = 2e-4, 1e-5

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=8, hidden_act="quick_gelu")
IMAGE_TOKEN = 120


def _llava():
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **{**VISION, "num_hidden_layers": 1}),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128),
        image_token_id=IMAGE_TOKEN)
    model = llava_lib.Llava.from_hf_config(config)
    params = mesh_lib.sharded_init(model, model.init_inputs(), jax.random.key(0), mesh_lib.make_mesh(
        {"data": 1}, devices=jax.devices()[:1]))
    return model, jax.device_get(params)


@functools.cache   # VladVA and VITask train the same base model: built (and its init compiled) once per family
def _family(kind):
    """The tiny LLaVA of `_llava`, or a tiny random InternVL (InternViT 56 px tiles of 14 px patches -> 4 tokens,
    Llama LM) or Qwen2-VL (56 px images -> 16 patches -> 4 merged tokens, Qwen2 LM with M-RoPE), built in-process,
    1 layer each.

    Returns:
      (model, params, the image token run of one image, vision(rng) -> one batch's vision arrays by HF name).
    """
    from vlm_jax.models import internvl as internvl_lib
    from vlm_jax.models import qwen2_vl as qwen2_vl_lib

    if kind == "llava":
        model, params = _llava()
        vision = lambda rng: {"pixel_values": rng.normal(size=(B, 16, 16, 3)).astype(np.float32)}
        return model, params, [IMAGE_TOKEN] * model.cfg.tokens_per_image, vision

    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=128)
    if kind == "internvl":
        config = transformers.InternVLConfig(
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=56, patch_size=14, attention_bias=True),
            text_config=dict(model_type="llama", **text), image_token_id=IMAGE_TOKEN)
        model = internvl_lib.InternVL.from_hf_config(config)
        run = [121] + [IMAGE_TOKEN] * model.cfg.tokens_per_tile + [122]   # <img> contexts </img>
        vision = lambda rng: {"pixel_values": rng.normal(size=(B, 1, 56, 56, 3)).astype(np.float32)}
    else:
        config = transformers.Qwen2VLConfig(
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            text_config=dict(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                             **text), image_token_id=IMAGE_TOKEN, vision_start_token_id=121, vision_end_token_id=122)
        model = qwen2_vl_lib.Qwen2VL.from_hf_config(config)
        run = [121] + [IMAGE_TOKEN] * 4 + [122]   # <|vision_start|> 4 x <|image_pad|> <|vision_end|>
        vision = lambda rng: {"pixel_values": rng.normal(size=(B, 16, model.cfg.vision.patch_dim)).astype(np.float32),
                              "image_grid_thw": np.tile(np.array([[1, 4, 4]], np.int32), (B, 1))}
    params = mesh_lib.sharded_init(model, model.init_inputs(), jax.random.key(0), mesh_lib.make_mesh(
        {"data": 1}, devices=jax.devices()[:1]))
    return model, jax.device_get(params), run, vision


def setup_dualadapter(rng):
    config = transformers.CLIPConfig(
        vision_config=VISION, projection_dim=16,
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16))
    model = clip_lib.CLIP.from_hf_config(config)
    clip_params = jax.device_get(nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *model.init_inputs())["params"]))
    c, d, shots = 8, 16, 2
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    keys = unit(rng.normal(size=(c * shots, d))).astype(np.float32)
    caches = dualadapter.build_caches(keys, np.repeat(np.arange(c), shots), c)
    consts = {"w_template": unit(rng.normal(size=(c, d))).astype(np.float32), "w_cupl": None,
              "w_neg": unit(rng.normal(size=(c, d))).astype(np.float32), "caches": caches}

    def loss_fn(params, batch, rng):   # as programs/fewshot_clip.finetune builds it
        del rng
        f = model.apply({"params": params["clip"]}, batch["images"], method=model.encode_image)
        f = jax.lax.stop_gradient(f / jnp.linalg.norm(f, axis=-1, keepdims=True))
        return dualadapter.finetune_loss(params["adapter"], f, batch["labels"], alpha=5.0, beta=1.0, lam=0.75,
                                         **params["consts"])

    params = {"clip": clip_params, "adapter": dualadapter.init_residuals(c, d), "consts": consts}
    batches = [{"images": rng.normal(size=(B, 16, 16, 3)).astype(np.float32),
                "labels": rng.integers(0, c, size=B).astype(np.int32)} for _ in range(STEPS)]
    place = lambda p, mesh: {**p, "clip": mesh_lib.shard_params(p["clip"], model, model.init_inputs(), mesh)}
    return loss_fn, params, [("adapter/.*", 1.0)], batches, place, "clip/vision_model/.*/fc1/kernel"


def setup_tsm(rng):
    model = tsm.TSMClassifier(clip_lib.vision_config_from_hf(transformers.CLIPVisionConfig(**VISION)),
                              num_classes=8)
    params = jax.device_get(tsm.init_params(model, jax.random.key(0)))
    mask = np.zeros((B, 8), bool)
    mask[:, :5] = True                     # two "datasets" of 5 and 3 classes, masked softmax
    mask[B // 2:] = ~mask[B // 2:]
    batches = [{"pixel_values": rng.normal(size=(B, 16, 16, 3)).astype(np.float32),
                "labels": np.where(np.arange(B) < B // 2, rng.integers(0, 5, size=B),
                                   rng.integers(5, 8, size=B)).astype(np.int32),
                "class_mask": mask} for _ in range(STEPS)]
    place = lambda p, mesh: mesh_lib.shard_params(p, model, model.init_inputs(), mesh)
    return tsm.make_loss_fn(model), params, list(tsm.PARAM_GROUPS), batches, place, "tower/.*/fc1/kernel"


def setup_vladva(rng, family="llava"):
    model, base, run, vision = _family(family)
    t = len(run)
    table = base["language_model"]["model"]["embed_tokens"]["embedding"]
    img_prompt, txt_prompt = [30, 31, 32], [40, 41]
    params = {"base": base, "lora": peft.lora_init(base, jax.random.key(1), targets=disc.LORA_TARGETS, rank=4),
              "image_prompt": peft.soft_prompt_init(table, img_prompt),
              "text_prompt": peft.soft_prompt_init(table, txt_prompt)}

    def batch():
        image = np.array([[1] + run + img_prompt] * B, np.int32)
        text = np.array([[1] + list(rng.integers(50, 100, size=5)) + txt_prompt for _ in range(B)], np.int32)
        cap = rng.integers(50, 100, size=(B, 6))
        long = np.concatenate([image, cap], 1).astype(np.int32)
        loss_mask = np.zeros_like(long)
        loss_mask[:, image.shape[1]:] = 1
        return dict(image_ids=image, image_mask=np.ones_like(image), text_ids=text, text_mask=np.ones_like(text),
                    **vision(rng), long_ids=long,
                    long_mask=np.ones_like(long), long_loss_mask=loss_mask, has_short=np.ones(B, bool),
                    has_long=np.arange(B) % 3 != 0,
                    image_prompt_start=np.full(B, 1 + t, np.int32), long_prompt_start=np.full(B, 1 + t, np.int32),
                    text_prompt_start=np.full(B, 6, np.int32))
    loss_fn = disc.make_loss_fn(model, lora_alpha=8, lora_rank=4, temperature=0.05, ntp_weight=1.0)
    place = lambda p, mesh: {**p, "base": mesh_lib.shard_params(p["base"], model, model.init_inputs(), mesh)}
    return (loss_fn, params, [("lora/.*", 1.0), ("(image|text)_prompt", 1.0)], [batch() for _ in range(STEPS)],
            place, "base/language_model/.*/up_proj/kernel")


def setup_vitask(rng, family="llava"):
    model, base, run, vision = _family(family)
    connector = vitask.ExemplarConnector(out_dim=32)
    conn = jax.device_get(connector.init(jax.random.key(2), jnp.zeros((1, 24)))["params"])
    params = {"base": base, "lora": peft.lora_init(base, jax.random.key(1), targets=disc.LORA_TARGETS, rank=4),
              "connector": conn}
    forward = vitask.make_forward(model, connector, IMAGE_TOKEN)
    loss_fn = vitask.make_loss_fn(forward, stage=2, pad_id=0, lora_alpha=8, lora_rank=4, alpha=1.0,
                                          beta=1.0, rda_direction="student_teacher")

    def batch():
        ids = np.array([[1] + run + list(rng.integers(5, 100, size=8)) for _ in range(B)], np.int32)
        amask = np.zeros_like(ids)
        amask[:, -3:] = 1
        neg = vision(rng)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "answer_mask": amask, **vision(rng),
                "neg_pixel_values": neg["pixel_values"], "feature": rng.normal(size=(B, 24)).astype(np.float32)}
    place = lambda p, mesh: {**p, "base": mesh_lib.shard_params(p["base"], model, model.init_inputs(), mesh)}
    return (loss_fn, params, [("lora/.*", 1.0), ("connector/.*", 1.0)], [batch() for _ in range(STEPS)], place,
            "base/language_model/.*/up_proj/kernel")


def main():
    assert len(jax.devices()) == 8, jax.devices()
    names = sys.argv[1:] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    assert not unknown, f"unknown case(s) {unknown}; known: {list(CASES)}"
    failed = []
    for name in names:   # every case runs even after a failure, so one run reports all of them
        setup_name, family, mesh = CASES[name]
        try:
            setup = globals()[setup_name](np.random.default_rng(0), *([family] if family else []))
            check(name, setup, [mesh])
        except Exception:  # noqa: BLE001 -- reported below, and the exit status says it
            failed.append(name)
            print(f"FAIL {name}: {traceback.format_exc()}", flush=True)
    if failed:
        sys.exit(1)
    print("OK")


# eps 1e-4, not 1e-8: some gradients are exactly zero in exact arithmetic (a key projection's bias: softmax is
# shift-invariant), so both runs see only rounding noise (~1e-9) there, and Adam with a tiny eps would blow
# that noise up to full lr-sized steps of random sign.
def check(method, setup, meshes):
    """Trains STEPS steps on 1 device and under each mesh of `meshes`; losses and parameters must agree."""
    loss_fn, params, groups, batches, place, sharded_path = setup

    def run(mesh):
        p = place(jax.tree.map(jnp.copy, params), mesh)
        fit = trainer.fit(loss_fn=loss_fn, params=p, param_groups=groups,
                          optim={"name": "adamw", "lr": 1e-2, "weight_decay": 0.01, "eps": 1e-4}, num_epochs=1,
                          steps_per_epoch=STEPS, epoch_batches=lambda e: batches, mesh=mesh, rng=jax.random.key(3),
                          log_every_s=1e9)
        return fit, p

    ref, _ = run(mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    ref_params = jax.device_get(ref.state.params)
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(trainer.partition(
                 params, trainer.param_labels(params, groups))[0]))]
    assert max(moved) > 1e-4, "the steps did not change the parameters: nothing would be compared"
    for shape in meshes:
        mesh = mesh_lib.make_mesh(shape)
        fit, placed = run(mesh)
        # The layout really is sharded: a weight named by `sharded_path` spans several devices under fsdp/tensor.
        flat = trainer._flat(placed)
        key = next(k for k in flat if re.fullmatch(sharded_path, k))
        spec = flat[key].sharding.spec
        if shape.get("fsdp", 1) > 1 or shape.get("tensor", 1) > 1:
            assert any(s is not None for s in spec), (shape, key, spec)
        np.testing.assert_allclose(fit.history[0]["train_loss"], ref.history[0]["train_loss"], rtol=RTOL,
                                   err_msg=str(shape))
        got = jax.device_get(fit.state.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=str(shape)),
                     got, ref_params)
        # Trainable weights laid out by fsdp keep that layout, and so do their Adam moments.
        for k, v in trainer._flat(fit.state.params).items():
            before = getattr(flat[k], "sharding", None)
            if isinstance(before, jax.sharding.NamedSharding):
                assert v.sharding == before, (k, v.sharding, before)
        print(f"{method} {shape}: loss {fit.history[0]['train_loss']:.6f} (1 device "
              f"{ref.history[0]['train_loss']:.6f})", flush=True)


if __name__ == "__main__":
    main()
