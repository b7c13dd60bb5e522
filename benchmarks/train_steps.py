"""Training-step speed of each method, vlm_jax (jit step) vs a PyTorch reference of the same step, same machine.

For each method this builds a random model, one fixed batch, and the *real* vlm_jax step: the method's loss_fn
(the one its program builds), `trainer.param_labels` / `partition` / `make_optimizer` and
`trainer.make_train_step` (jit, donated state, AdamW + cosine schedule). The torch side computes the same loss
with HF transformers models (CLIPVisionModel, LlavaForConditionalGeneration) and plain torch
(benchmarks/torch_reference.py), with the same weights (converted with vlm_jax's tables), then backward +
torch.optim.AdamW + CosineAnnealingLR. Steps of the two frameworks alternate; the medians are reported.

  method          what one step trains                        full size (default) / --small
  dualadapter     DualAdapter-F residuals on cached CLIP         1000 classes x 16 shots, features 1024, batch 256
                  features (methods.dualadapter.finetune_loss)   / 10 x 4, features 64, batch 32
  tsm             VITask's TSM: CLIP ViT + linear head, full     ViT-B/16 at 112 px (50 tokens), 35 joint classes,
                  fine-tune (methods.tsm.make_loss_fn)           batch 4 / 1 layer x 128 wide at 64 px, batch 4
  discriminative  VladVA: soft prompts + LoRA r16 on a frozen    LLaVA 70.8M: CLIP ViT 384 x 6 layers at 224 px,
                  LLaVA, InfoNCE (short captions) + NTP (long)   patch 32 (49 image tokens), Llama 512 x 8 layers,
                  (methods.discriminative.make_loss_fn)          vocab 32k; batch 2 / a 1-layer toy LLaVA (r4)
  vitask          VITask stage 2: L_van + L_ep + RDA + CRT,       the same LLaVA, TSM feature 768 wide, batch 2 x
                  LoRA trained, connector frozen                  85 tokens, 3 passes / the toy LLaVA
                  (programs.vitask.make_loss_fn)

(The full sizes keep the whole run near 5 minutes on the 2-core machine of RESULTS.md; --batch, --iters scale up.)

Printed per method: s/step (median, min-max), steps/s, examples/s (and tokens/s: LM tokens over all passes of
the step) of both frameworks, the ratio JAX/torch, the step's FLOPs and MFU = FLOPs / (s/step) / peak FLOP/s:
  * XLA: the cost analysis of the compiled JAX step (what JAX executes: merged LoRA's kernel gradients,
    remat recomputation included; cuDNN attention counted as 0);
  * 6N: 6 * N * tokens, N the weights each token meets (embedding tables excluded), no attention scores;
  * model: the FLOPs the step needs, used for the MFU(model) of both frameworks: 6N for the full fine-tune
    (TSM), 2N (frozen tower) / 4N (frozen LM, input gradients only) per token for the LoRA steps (what
    unmerged LoRA computes; 6N overstates these by ~1.6x), and XLA's count for DualAdapter.
The peak (benchmarks/flops.py) is a table for GPUs/TPUs and, for a CPU, the best matmul rate measured in this
run (before the first method and after each one, as the shared machine's load moves): read the final summary
table, whose MFUs all use the final peak. The first- and second-step losses of both frameworks are printed:
the computations are equal, so they agree to float32 rounding (the second step also checks AdamW).

  python benchmarks/train_steps.py                          # all four, full size, CPU vs CPU
  python benchmarks/train_steps.py --small                  # smoke run (about a minute)
  python benchmarks/train_steps.py --only tsm,vitask --iters 5
  python benchmarks/train_steps.py --only discriminative,vitask --lora merged
  # On a GPU (JAX with CUDA; torch on CUDA too if it has it, else add --no-torch):
  JAX_PLATFORMS=cuda python benchmarks/train_steps.py --only discriminative,vitask --dtype bfloat16 \
      --attention cudnn --remat full --batch 8 --iters 10

How the torch computation differs (none of this changes the loss value):
  * LoRA: torch adds (alpha/r) (x A^T) B^T beside each frozen nn.Linear (HF PEFT's unmerged form, a minimal
    wrapper since peft is not installed); vlm_jax does the same by default (peft.lora_interceptor); with
    --lora merged it differentiates through W + (alpha/r) A B instead, whose backward also forms the full
    weight gradient of every adapted kernel.
  * LLaVA: the HF vision tower also runs its last layer, whose output LLaVA (feature layer -2) never uses; XLA
    removes it as dead code. vlm_jax also runs the vision tower once per pass, as torch does here.
  * DualAdapter: the reference (zhangce01/DualAdapter main.py) runs the frozen CLIP image encoder on the
    augmented batch inside every step, under no_grad, as vlm_jax's fewshot_clip program does; this benchmark
    times the adapter step alone on cached features (the encoder's speed is benchmarks/clip_encode.py). The
    reference keeps the adapters in float16 on a GPU; both sides here run float32.
  * --dtype bfloat16: JAX computes in bfloat16 with float32 parameters; torch runs under
    torch.autocast(bfloat16) (--torch-dtype). torch's CPU bfloat16 matmuls are very slow on CPUs without
    AVX512-BF16 (this one), so keep --torch-dtype float32 there.
  * --remat: JAX rematerialises each LM layer (models.llama REMAT_POLICIES); torch gets
    gradient_checkpointing_enable(use_reentrant=False) on its LM for any policy other than 'none'.
  * --attention cudnn: JAX's fused cuDNN attention (GPU only); torch always uses its default SDPA attention.
    XLA's cost analysis counts a cuDNN attention call as 0 FLOPs: read MFU(model) then.
  * OMP_WAIT_POLICY=PASSIVE is set for torch's OpenMP threads unless the environment sets it (see below).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU-vs-CPU comparison unless told otherwise
# libgomp's default spin-waiting, with XLA's thread pool in the same process and other jobs on the cores, made
# torch's CPU steps up to 100x slower on the 2-core machine of benchmarks/RESULTS.md; sleeping waits avoid it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops as flops_lib  # noqa: E402
import torch_reference as ref  # noqa: E402

from vlm_jax.convert import clip as clip_convert  # noqa: E402
from vlm_jax.convert import llava as llava_convert  # noqa: E402
from vlm_jax.convert import loader  # noqa: E402
from vlm_jax.methods import vladva as disc  # noqa: E402
from vlm_jax.methods import dualadapter  # noqa: E402
from vlm_jax.methods import tsm as tsm_lib  # noqa: E402
from vlm_jax.methods import vitask  # noqa: E402
from vlm_jax.models import clip as clip_models  # noqa: E402
from vlm_jax.models import peft  # noqa: E402
from vlm_jax.programs import vitask as vitask_program  # noqa: E402
from vlm_jax.train import trainer  # noqa: E402

METHODS = ("dualadapter", "tsm", "discriminative", "vitask")
TOTAL_STEPS = 1000  # length of both cosine schedules (only the first few steps run)
IMAGE_TOKEN, BOS, EOS, PAD = 3, 1, 2, 0

DUAL = dict(full=dict(classes=1000, shots=16, dim=1024, batch=256, preset="imagenet"),
            small=dict(classes=10, shots=4, dim=64, batch=32, preset="default"))
# ViT-B/16 at 112 px: at 224 px one step took ~18 s here (426 GFLOP at batch 4).
VIT_B16 = dict(image_size=112, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu")
VIT_SMALL = dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=512, num_hidden_layers=1,
                 num_attention_heads=4, hidden_act="quick_gelu")
TSM_DATASETS = (7, 9, 11, 8)  # a joint label space over 4 datasets, softmax masked to each sample's own
LLAVA = dict(
    full=dict(vision=dict(model_type="clip_vision_model", hidden_size=384, intermediate_size=1536,
                          num_hidden_layers=6, num_attention_heads=6, image_size=224, patch_size=32,
                          hidden_act="quick_gelu"),
              text=dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=1024),
              lora_rank=16, caption=(8, 20), long=(24, 40), prompt=10, instruction=24, tsm_dim=768),
    small=dict(vision=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16,
                           hidden_act="quick_gelu"),
               text=dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256),
               lora_rank=4, caption=(4, 8), long=(10, 16), prompt=6, instruction=6, tsm_dim=64))
DEFAULT_BATCH = dict(dualadapter=None, tsm=4, discriminative=2, vitask=2)


@dataclasses.dataclass
class Case:
    """One method's pair of steps plus what the report needs."""

    title: str
    jax_step: Callable[[], float]            # runs one step, waits for it, returns the loss before the update
    torch_step: Callable[[], float] | None
    flops_xla: float | None
    compile_s: float
    examples: int
    tokens: int | None = None                # LM tokens per step (all passes), for tokens/s
    flops_6n: float | None = None
    flops_model: float | None = None         # analytic FLOPs the step needs (see `lvlm_flops`), for MFU
    trainable: int = 0


# ----------------------------------------------------------------------------------------------------------
# Shared pieces.

def jax_step_of(loss_fn, params, groups, optim, batch) -> tuple[Callable[[], float], float | None, float, int]:
    """The trainer's jit step on (params, batch): (run one step -> loss, XLA FLOPs, compile s, trainable count)."""
    labels = trainer.param_labels(params, groups)
    trainable, frozen = trainer.partition(params, labels)
    tx = trainer.make_optimizer(optim, labels, TOTAL_STEPS)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable))
    step = trainer.make_train_step(loss_fn, tx, jax.random.key(0))
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()  # the executable that runs below: compiled once
    compile_s = time.perf_counter() - t0
    box = [state]

    def run() -> float:
        box[0], metrics = compiled(box[0], frozen, batch)
        jax.block_until_ready(box[0])
        return float(metrics["loss"])

    return run, flops_lib.cost_flops(compiled.cost_analysis()), compile_s, count(trainable)


def torch_step_of(args, loss_fn, groups) -> Callable[[], float]:
    dt = None if args.torch_dtype == "float32" else getattr(torch, args.torch_dtype)
    return ref.make_step(loss_fn, groups, lr_total_steps=TOTAL_STEPS, autocast_dtype=dt,
                         device_type=torch.device(args.torch_device).type)


def adamw(lr, wd=0.0, eps=1e-8):
    return dict(name="adamw", lr=lr, weight_decay=wd, eps=eps, decay_type="cosine")


def torch_group(params, lr, wd=0.0, eps=1e-8):
    return dict(params=list(params), lr=lr, weight_decay=wd, eps=eps, betas=(0.9, 0.999))


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def to_jax(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def to_torch(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if k.endswith("pixel_values"):
            v = v.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        t = ref.tensor(v, device)
        out[k] = t.long() if v.dtype in (np.int32, np.int64) else t
    return out


# ----------------------------------------------------------------------------------------------------------
# (a) DualAdapter-F.

def dualadapter_case(args) -> Case:
    s = DUAL["small" if args.small else "full"]
    c, k, d = s["classes"], s["shots"], s["dim"]
    b = args.batch or s["batch"]
    p = dualadapter.PRESETS[s["preset"]]
    hp = dict(alpha=p["init_alpha"], beta=p["init_beta"], lam=p["init_lambda"])
    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.standard_normal((n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    w_t, w_u, w_n = unit(c), unit(c), unit(c)
    caches = dualadapter.build_caches(unit(c * k), np.repeat(np.arange(c), k), c)
    y = rng.integers(0, c, b).astype(np.int32)
    # Features near their class's text embedding, so the loss is not at chance level.
    f = 0.3 * w_t[y] + unit(b)
    f /= np.linalg.norm(f, axis=1, keepdims=True)

    def loss_fn(params, batch, rng):
        del rng
        return dualadapter.finetune_loss(params["adapter"], batch["features"], batch["labels"], **params["consts"],
                                         consistency="reference", **hp)

    params = {"adapter": dualadapter.init_residuals(c, d),
              "consts": {"w_template": jnp.asarray(w_t), "w_cupl": jnp.asarray(w_u), "w_neg": jnp.asarray(w_n),
                         "caches": caches}}
    groups = [("adapter/(res_neg|res_neg_keys)", dualadapter.NEGATIVE_LR_MULTIPLIER), ("adapter/.*", 1.0)]
    run, fl, comp, n = jax_step_of(loss_fn, params, groups, adamw(p["lr"], dualadapter.WEIGHT_DECAY, p["eps"]),
                                   to_jax({"features": f, "labels": y}))

    dev = args.torch_device
    res = {name: torch.nn.Parameter(torch.zeros(c, d, device=dev)) for name in params["adapter"]}
    consts = {name: ref.tensor(x, dev) for name, x in (("w_template", w_t), ("w_cupl", w_u), ("w_neg", w_n))}
    cache_t = {name: ref.tensor(getattr(caches, name), dev) for name in ("keys", "neg_keys", "soft_values", "values")}
    ft, yt = ref.tensor(f, dev), ref.tensor(y, dev).long()
    tstep = None if args.no_torch else torch_step_of(
        args, lambda: ref.dualadapter_loss(res, ft, yt, **consts, **cache_t, shots=k, **hp),
        [torch_group([res[x] for x in ("res_template", "res_cupl", "res_keys")], p["lr"], dualadapter.WEIGHT_DECAY,
                     p["eps"]),
         torch_group([res[x] for x in ("res_neg", "res_neg_keys")], p["lr"] * dualadapter.NEGATIVE_LR_MULTIPLIER,
                     dualadapter.WEIGHT_DECAY, p["eps"])])
    return Case(f"DualAdapter-F adapter step: {c} classes x {k} shots, features {d}, batch {b} (float32)",
                run, tstep, fl, comp, examples=b, flops_model=fl, trainable=n)


# ----------------------------------------------------------------------------------------------------------
# (b) TSM.

def tsm_case(args) -> Case:
    vision = VIT_SMALL if args.small else VIT_B16
    b = args.batch or DEFAULT_BATCH["tsm"]
    c = sum(TSM_DATASETS)
    vcfg = transformers.CLIPVisionConfig(**vision)
    torch.manual_seed(0)
    tower = transformers.CLIPVisionModel(vcfg).train().to(args.torch_device)
    model = tsm_lib.TSMClassifier(clip_models.vision_config_from_hf(vcfg), c, dtype=jnp.dtype(args.dtype),
                                  attention_impl=args.attention)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])
    # transformers 5 names CLIPVisionModel's tensors without the 'vision_model.' prefix that checkpoints carry.
    tensors = {(k if k.startswith("vision_model.") else "vision_model." + k): v.detach().cpu().numpy()
               for k, v in tower.state_dict().items()}
    table = clip_convert.clip_vision_table(vision["num_hidden_layers"], hf="vision_model", fx=("tower",))
    converted = loader.apply_table(table, tensors, {"tower": shapes["tower"]}, ignore=clip_convert.IGNORE)
    params = tsm_lib.init_from_tower(model, converted["tower"], jax.random.key(1))
    head = torch.nn.Linear(vision["hidden_size"], c).to(args.torch_device)
    with torch.no_grad():
        head.weight.copy_(ref.tensor(np.asarray(params["head"]["kernel"]).T, args.torch_device))
        head.bias.copy_(ref.tensor(params["head"]["bias"], args.torch_device))

    rng = np.random.default_rng(0)
    offsets = tsm_lib.dataset_offsets(TSM_DATASETS)
    ds = rng.integers(0, len(TSM_DATASETS), b)
    labels = (offsets[ds] + rng.integers(0, np.asarray(TSM_DATASETS)[ds])).astype(np.int32)
    mask = np.asarray(tsm_lib.dataset_class_mask(ds, offsets, TSM_DATASETS, c))
    size = vision["image_size"]
    batch = {"pixel_values": rng.standard_normal((b, size, size, 3)).astype(np.float32), "labels": labels,
             "class_mask": mask}
    optim = adamw(1e-5, 0.05)  # configs/vitask.py's tsm.optim
    run, fl, comp, n = jax_step_of(tsm_lib.make_loss_fn(model), params, list(tsm_lib.PARAM_GROUPS), optim,
                                   to_jax(batch))
    tb = to_torch(batch, args.torch_device)
    tstep = None if args.no_torch else torch_step_of(
        args, lambda: ref.tsm_loss(tower, head, tb["pixel_values"], tb["labels"], tb["class_mask"].bool()),
        [torch_group(list(tower.parameters()) + list(head.parameters()), 1e-5, 0.05)])
    # 6N: every weight trains; the tower's per-token weights see patches + class token, the head one row each.
    emb = params["tower"]["embeddings"]
    n_tower = count(params["tower"]) - count(emb["position_embedding"]) - count(emb["class_embedding"])
    tok = (size // vision["patch_size"]) ** 2 + 1
    f6 = flops_lib.transformer_flops(n_tower, b * tok) + flops_lib.transformer_flops(count(params["head"]), b)
    name = "small ViT" if args.small else "ViT-B/16"
    return Case(f"TSM step: {name} {size}px + linear head ({c} joint classes), full fine-tune, batch {b} "
                f"({args.dtype})", run, tstep, fl, comp, examples=b, flops_6n=f6, flops_model=f6, trainable=n)


# ----------------------------------------------------------------------------------------------------------
# LLaVA (c, d).

def build_llava(args, spec):
    """(hf LlavaForConditionalGeneration, Flax Llava, params) with the same random weights."""
    config = transformers.LlavaConfig(vision_config=spec["vision"], text_config=spec["text"],
                                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = llava_convert.from_pretrained(d, dtype=jnp.dtype(args.dtype), param_dtype=jnp.float32,
                                                      attention_impl=args.attention, remat=args.remat)
    hf = hf.to(args.torch_device)
    for p in hf.parameters():
        p.requires_grad_(False)
    if args.remat != "none":
        hf.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return hf, model, params


def lvlm_flops(params, passes) -> tuple[float, float]:
    """(6 N tokens, frozen-base minimum) of a LoRA step over LLaVA passes.

    passes: [(images, lm_tokens, head_tokens)] per forward pass. The minimum is 2 N per token for the vision
    tower and projector (no gradient reaches them) and 4 N for the frozen LM body and head (input gradients
    only): what unmerged LoRA computes. Merged LoRA (W + s A B inside the loss, --lora merged) also forms
    the full weight gradient of every adapted kernel, i.e. 6 N on the LM's linear layers. Neither count
    includes attention scores, the LoRA pairs themselves or elementwise work.
    """
    v = params["vision_tower"]
    n_vis = count(v) - count(v["embeddings"]["position_embedding"]) - count(v["embeddings"]["class_embedding"])
    n_proj = count(params["multi_modal_projector"])
    lm = params["language_model"]
    n_body = count(lm["model"]) - count(lm["model"]["embed_tokens"])
    n_head = count(lm["lm_head"]) if "lm_head" in lm else count(lm["model"]["embed_tokens"])
    pe = v["embeddings"]["position_embedding"]["embedding"].shape[0]  # patches + class token
    six = frozen = 0.0
    for images, tokens, head_tokens in passes:
        t_img = (pe - 1) * images
        six += 6 * (n_vis * pe * images + n_proj * t_img + n_body * tokens + n_head * head_tokens)
        frozen += 2 * (n_vis * pe * images + n_proj * t_img) + 4 * (n_body * tokens + n_head * head_tokens)
    return six, frozen




def _rows(rng, parts_per_row, pad=PAD):
    """Right-padded i32[B, L] from per-row lists of token chunks, plus i32[B, L] mask."""
    rows = [np.concatenate([np.asarray(p, np.int64) for p in parts]) for parts in parts_per_row]
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def discriminative_case(args) -> Case:
    spec = LLAVA["small" if args.small else "full"]
    b = args.batch or DEFAULT_BATCH["discriminative"]
    hf, model, base = build_llava(args, spec)
    t = model.cfg.tokens_per_image
    v = spec["text"]["vocab_size"]
    rng = np.random.default_rng(0)
    word = lambda n: rng.integers(10, v, n)  # noqa: E731  (never an image / special token)
    user, assistant = word(3), word(4)
    img_prompt, txt_prompt = word(spec["prompt"]), word(spec["prompt"])
    image_part = [[BOS], user, [IMAGE_TOKEN] * t, img_prompt, assistant]
    image_ids, image_mask = _rows(rng, [image_part] * b)
    caps = [word(rng.integers(*spec["caption"], endpoint=True)) for _ in range(b)]
    text_ids, text_mask = _rows(rng, [[[BOS], user, cap, txt_prompt, assistant] for cap in caps])
    longs = [word(rng.integers(*spec["long"], endpoint=True)) for _ in range(b)]
    long_ids, long_mask = _rows(rng, [image_part + [lc] for lc in longs])
    prefix = 1 + len(user)
    long_loss = np.zeros_like(long_mask)
    for i, lc in enumerate(longs):
        long_loss[i, image_ids.shape[1]:image_ids.shape[1] + len(lc)] = 1
    size = spec["vision"]["image_size"]
    batch = dict(image_ids=image_ids, image_mask=image_mask,
                 pixel_values=rng.standard_normal((b, size, size, 3)).astype(np.float32),
                 image_prompt_start=np.full(b, prefix + t, np.int32), text_ids=text_ids, text_mask=text_mask,
                 text_prompt_start=np.array([prefix + len(cp) for cp in caps], np.int32), long_ids=long_ids,
                 long_mask=long_mask, long_loss_mask=long_loss, long_prompt_start=np.full(b, prefix + t, np.int32),
                 has_short=np.ones(b, bool), has_long=np.ones(b, bool))

    r = spec["lora_rank"]
    table = base["language_model"]["model"]["embed_tokens"]["embedding"]
    params = {"base": base, "lora": peft.lora_init(base, jax.random.key(2), targets=disc.LORA_TARGETS, rank=r),
              "image_prompt": peft.soft_prompt_init(table, jnp.asarray(img_prompt)),
              "text_prompt": peft.soft_prompt_init(table, jnp.asarray(txt_prompt))}
    loss_fn = disc.make_loss_fn(model, lora_alpha=float(r), lora_rank=r, lora_impl=args.lora)
    groups = [("lora/.*", 1.0), ("(image|text)_prompt", 1.0)]  # configs/vladva.py
    run, fl, comp, n = jax_step_of(loss_fn, params, groups, adamw(1e-4), to_jax(batch))

    tstep = None
    if not args.no_torch:
        lora_params = ref.add_lora(hf, jax.device_get(params["lora"]), alpha=float(r), rank=r)
        ip = torch.nn.Parameter(ref.tensor(params["image_prompt"], args.torch_device))
        tp = torch.nn.Parameter(ref.tensor(params["text_prompt"], args.torch_device))
        tb = to_torch(batch, args.torch_device)
        tb["has_short"], tb["has_long"] = tb["has_short"].bool(), tb["has_long"].bool()
        tstep = torch_step_of(args, lambda: ref.discriminative_loss(
            hf, tb, ip, tp, image_token_id=IMAGE_TOKEN, temperature=disc.DEFAULT_TEMPERATURE),
            [torch_group(lora_params + [ip, tp], 1e-4)])
    lm_tokens = image_ids.size + text_ids.size + long_ids.size
    f6, ffz = lvlm_flops(base, [(b, image_ids.size, 0), (0, text_ids.size, 0), (b, long_ids.size, long_ids.size)])
    return Case(f"discriminative (VladVA) step: LLaVA {count(base) / 1e6:.1f}M, soft prompts + LoRA r{r}, batch {b} "
                f"(image {image_ids.shape[1]}, text {text_ids.shape[1]}, long {long_ids.shape[1]} tokens), "
                f"{args.dtype}, remat {args.remat}, attention {args.attention or 'xla'}, LoRA {args.lora}",
                run, tstep, fl, comp, examples=b, tokens=lm_tokens, flops_6n=f6, flops_model=ffz, trainable=n)


def vitask_case(args) -> Case:
    spec = LLAVA["small" if args.small else "full"]
    b = args.batch or DEFAULT_BATCH["vitask"]
    hf, model, base = build_llava(args, spec)
    t = model.cfg.tokens_per_image
    v = spec["text"]["vocab_size"]
    rng = np.random.default_rng(1)
    word = lambda n: rng.integers(10, v, n)  # noqa: E731
    user, instruction, assistant = word(3), word(spec["instruction"]), word(4)
    answers = [word(rng.integers(2, 4, endpoint=True)) for _ in range(b)]
    prompt = [[BOS], user, [IMAGE_TOKEN] * t, instruction, assistant]
    ids, mask = _rows(rng, [prompt + [a, [EOS]] for a in answers])
    p = sum(len(x) for x in prompt)
    amask = np.zeros_like(mask)
    for i, a in enumerate(answers):
        amask[i, p:p + len(a) + 1] = 1
    size = spec["vision"]["image_size"]
    pixels = rng.standard_normal((b, size, size, 3)).astype(np.float32)
    batch = dict(input_ids=ids, attention_mask=mask, answer_mask=amask, pixel_values=pixels,
                 feature=rng.standard_normal((b, spec["tsm_dim"])).astype(np.float32),
                 neg_pixel_values=np.roll(pixels, 1, axis=0))

    r = spec["lora_rank"]
    width = spec["text"]["hidden_size"]
    connector = vitask.ExemplarConnector(out_dim=width, dtype=jnp.dtype(args.dtype))
    conn = nn.meta.unbox(connector.init(jax.random.key(4), jnp.zeros((1, spec["tsm_dim"]), jnp.float32))["params"])
    params = {"base": base, "lora": peft.lora_init(base, jax.random.key(3), targets=disc.LORA_TARGETS, rank=r),
              "connector": conn}
    forward = vitask_program.make_forward(model, connector, IMAGE_TOKEN)
    loss_fn = vitask_program.make_loss_fn(forward, stage=2, pad_id=PAD, lora_alpha=float(r), lora_rank=r, alpha=1.0,
                                          beta=1.0, rda_direction="student_teacher", lora_impl=args.lora)
    run, fl, comp, n = jax_step_of(loss_fn, params, [("lora/.*", 1.0)], adamw(1e-4),
                                   to_jax(batch))

    tstep = None
    if not args.no_torch:
        lora_params = ref.add_lora(hf, jax.device_get(params["lora"]), alpha=float(r), rank=r)
        tconn = ref.exemplar_connector(spec["tsm_dim"], width, width, jax.device_get(conn), args.torch_device)
        tb = to_torch(batch, args.torch_device)
        tstep = torch_step_of(args, lambda: ref.vitask_stage2_loss(hf, tconn, tb, image_token_id=IMAGE_TOKEN,
                                                                   pad_id=PAD),
                              [torch_group(lora_params, 1e-4)])
    length = ids.shape[1]
    lm_tokens = b * (3 * length + 1)
    f6, ffz = lvlm_flops(base, [(b, b * length, b * length), (b, b * (length + 1), b * (length + 1)),
                                (b, b * length, b * length)])
    return Case(f"VITask stage-2 step: LLaVA {count(base) / 1e6:.1f}M + LoRA r{r}, connector frozen, batch {b} x "
                f"{length} tokens, 3 passes (plain, exemplar, negative), {args.dtype}, remat {args.remat}, "
                f"attention {args.attention or 'xla'}, LoRA {args.lora}",
                run, tstep, fl, comp, examples=b, tokens=lm_tokens, flops_6n=f6, flops_model=ffz, trainable=n)


CASES = dict(dualadapter=dualadapter_case, tsm=tsm_case, discriminative=discriminative_case, vitask=vitask_case)


# ----------------------------------------------------------------------------------------------------------
# Timing and report.

def measure(case: Case, iters: int, warmup: int) -> dict:
    fns = {"jax": case.jax_step}
    if case.torch_step is not None:
        fns["torch"] = case.torch_step
    losses = {name: [fn(), fn()] for name, fn in fns.items()}  # steps 1 and 2: loss checks (and warm-up)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):  # alternate, so load drifts on a shared machine hit both alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"losses": losses, "s": {k: float(np.median(v)) for k, v in times.items()},
            "spread": {k: (float(np.min(v)), float(np.max(v))) for k, v in times.items()}}


def _g(x):
    return "-" if x is None else f"{x / 1e9:.3g}"


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def report(name: str, case: Case, m: dict, peak: float | None) -> dict:
    print(f"\n== {name}: {case.title}")
    print(f"trainable {case.trainable / 1e6:.3f}M params; JAX compile {case.compile_s:.1f} s")
    lj = m["losses"]["jax"]
    row = {"method": name, "loss_diff": [None, None], "s": m["s"], "tokens": case.tokens, "examples": case.examples,
           "xla": case.flops_xla, "six": case.flops_6n, "model": case.flops_model}
    if "torch" in m["losses"]:
        lt = m["losses"]["torch"]
        row["loss_diff"] = [abs(lj[0] - lt[0]), abs(lj[1] - lt[1])]
        print(f"step-1 loss: jax {lj[0]:.6f}, torch {lt[0]:.6f} (|diff| {row['loss_diff'][0]:.1e}); "
              f"step-2 loss: jax {lj[1]:.6f}, torch {lt[1]:.6f} (|diff| {row['loss_diff'][1]:.1e})")
    else:
        print(f"step-1 loss: jax {lj[0]:.6f}; step-2 loss: jax {lj[1]:.6f} (torch not run)")
    print(f"{'':7s}{'s/step':>9s}{'(min-max)':>18s}{'steps/s':>9s}{'examples/s':>12s}"
          f"{'tokens/s' if case.tokens else '':>11s}{'MFU(XLA)':>10s}{'MFU(model)':>12s}")
    for k, s in m["s"].items():
        lo, hi = m["spread"][k]
        mx, mm = flops_lib.mfu(case.flops_xla, s, peak), flops_lib.mfu(case.flops_model, s, peak)
        tok = f"{case.tokens / s:11.1f}" if case.tokens else f"{'':11s}"
        print(f"{k:7s}{s:9.3f}{f'({lo:.3f}-{hi:.3f})':>18s}{1 / s:9.3f}{case.examples / s:12.2f}{tok}"
              f"{_pct(mx):>10s}{_pct(mm):>12s}")
    if "torch" in m["s"]:
        print(f"ratio jax/torch (steps/s): {m['s']['torch'] / m['s']['jax']:.2f}")
    print(f"FLOPs/step: XLA cost analysis of the JAX step {_g(case.flops_xla)} GFLOP; 6N*tokens {_g(case.flops_6n)} "
          f"GFLOP; model (the MFU(model) count) {_g(case.flops_model)} GFLOP"
          + (f"; LM tokens per step {case.tokens}" if case.tokens else ""))
    return row


def summary(rows: list[dict], peak: float | None):
    """The markdown table of benchmarks/RESULTS.md, MFUs against the final (best seen) peak."""
    print("\n| method | JAX steps/s | torch steps/s | JAX/torch | JAX examples/s | JAX tokens/s | GFLOP/step XLA "
          "/ 6N / model | MFU JAX (XLA) | MFU JAX (model) | MFU torch (model) | step-1 / step-2 loss diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sj, st = r["s"]["jax"], r["s"].get("torch")
        d = r["loss_diff"]
        cells = [r["method"], f"{1 / sj:.3g}", "-" if st is None else f"{1 / st:.3g}",
                 "-" if st is None else f"{st / sj:.2f}", f"{r['examples'] / sj:.3g}",
                 "-" if not r["tokens"] else f"{r['tokens'] / sj:.0f}",
                 f"{_g(r['xla'])} / {_g(r['six'])} / {_g(r['model'])}",
                 _pct(flops_lib.mfu(r["xla"], sj, peak)), _pct(flops_lib.mfu(r["model"], sj, peak)),
                 "-" if st is None else _pct(flops_lib.mfu(r["model"], st, peak)),
                 "-" if d[0] is None else f"{d[0]:.1e} / {d[1]:.1e}"]
        print("| " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--small", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--batch", type=int, default=0, help="override every method's batch size")
    parser.add_argument("--iters", type=int, default=0,
                        help="timed steps per framework after the 2 check steps (default 3, --small 10)")
    parser.add_argument("--warmup", type=int, default=0, help="extra untimed steps after the 2 check steps")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="JAX compute dtype")
    parser.add_argument("--torch-dtype", default=None, choices=("float32", "bfloat16"),
                        help="torch autocast dtype (default: --dtype)")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"), help="LM layer remat policy")
    parser.add_argument("--attention", default=None, choices=("xla", "cudnn"), help="JAX attention implementation")
    parser.add_argument("--lora", default="unmerged", choices=("merged", "unmerged"),
                        help="JAX LoRA form (the methods' lora_impl): beside the kernels (peft.lora_interceptor, "
                             "the default) or merged into them")
    parser.add_argument("--torch-device", default=None, help="default: cuda if JAX runs on a GPU and torch has it")
    parser.add_argument("--no-torch", action="store_true", help="time the JAX steps only")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the peak FLOP/s (in TFLOP/s)")
    args = parser.parse_args()
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(only) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    args.torch_dtype = args.torch_dtype or args.dtype
    args.iters = args.iters or (10 if args.small else 3)
    if args.torch_device is None:
        args.torch_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if args.attention == "xla":
        args.attention = None
    torch.set_num_threads(args.threads)

    dev = jax.devices()[0]

    def get_peak(remeasure: bool):
        if args.peak_tflops:
            return args.peak_tflops * 1e12, "--peak-tflops"
        return flops_lib.peak_flops(dev, args.dtype, torch_module=torch, seconds=0.5 if args.small else 1.5,
                                    remeasure=remeasure)

    peak, src = get_peak(False)
    print(f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}), torch {torch.__version__} on "
          f"{args.torch_device} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"cpu_count {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}")
    print(f"peak {_peak(peak)} ({src}); timing: median of {args.iters} alternating steps per framework after 2 check "
          f"steps + {args.warmup} warm-up")
    rows = []
    for name in only:
        t0 = time.perf_counter()
        case = CASES[name](args)
        m = measure(case, args.iters, args.warmup)
        if not args.small:  # a CPU peak is re-measured between methods (at the end with --small): best rate kept
            peak, src = get_peak(True)
        rows.append(report(name, case, m, peak))
        print(f"({name}: {time.perf_counter() - t0:.0f} s wall, load avg {os.getloadavg()[0]:.2f}; "
              f"MFU against peak {_peak(peak)})")
        del case
    if args.small:
        peak, src = get_peak(True)
    print(f"\nfinal peak {_peak(peak)} ({src})")
    summary(rows, peak)


def _peak(peak):
    return "unknown" if not peak else f"{peak / 1e12:.4g} TFLOP/s"


if __name__ == "__main__":
    main()
