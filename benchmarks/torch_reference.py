"""The PyTorch side of benchmarks/train_steps.py: each method's training loss written in plain torch + HF models.

Every function mirrors one vlm_jax function (named in its docstring) operation for operation, in float32, so
the first-step losses of the two frameworks can be compared. Only the loss lives here; the step (zero_grad,
backward, AdamW, LR schedule) is `make_step`.

LoRA is a minimal wrapper (peft is not installed): `LoRALinear` keeps the frozen nn.Linear and adds
(alpha / r) * (x @ A^T) @ B^T, HF PEFT's unmerged form. vlm_jax's loss merges W + (alpha / r) * A @ B into the
kernel instead (`peft.lora_merge`); both give the same function of (W, A, B), the merged one costs one extra
[in, out] matmul per adapted kernel and step instead of two thin ones per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

_NEG = -1e9  # the finite "-inf" of vlm_jax.methods.vladva / tsm


def tensor(x, device="cpu", dtype=None) -> torch.Tensor:
    t = torch.from_numpy(np.array(x))  # a writable copy
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def make_step(loss_fn: Callable[[], torch.Tensor], param_groups: list[dict], *, lr_total_steps: int,
              autocast_dtype=None, device_type: str = "cpu") -> Callable[[], float]:
    """One training step of torch: zero_grad, loss, backward, AdamW, cosine LR schedule; returns the loss.

    param_groups: torch.optim.AdamW groups ({'params', 'lr', 'eps', 'weight_decay', 'betas'}).
    The cosine schedule is CosineAnnealingLR(T_max=lr_total_steps), which vlm_jax's 'cosine' decay equals.
    """
    opt = torch.optim.AdamW(param_groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, lr_total_steps)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if autocast_dtype is not None:
            with torch.autocast(device_type=device_type, dtype=autocast_dtype):
                loss = loss_fn()
        else:
            loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    return step


# ----------------------------------------------------------------------------------------------------------
# DualAdapter-F (vlm_jax.methods.dualadapter.finetune_loss).

def dualadapter_loss(res: dict[str, torch.Tensor], f, y, w_template, w_cupl, w_neg, keys, neg_keys, soft_values,
                     values, shots: int, *, alpha: float, beta: float, lam: float,
                     consistency_weight: float = 8.0, scale: float = 4.0, knn: int = 3) -> torch.Tensor:
    """`dualadapter.finetune_loss` with consistency='reference' (residuals f32[C, D]; f f32[B, D])."""
    w_t = F.normalize(w_template + res["res_template"], dim=-1)
    w_u = F.normalize(w_cupl + res["res_cupl"], dim=-1)
    w_n = F.normalize(F.normalize(w_neg, dim=-1) + res["res_neg"], dim=-1)
    k = F.normalize(keys + res["res_keys"].repeat_interleave(shots, 0), dim=-1)
    nk = F.normalize(F.normalize(neg_keys, dim=-1) + res["res_neg_keys"].repeat_interleave(shots, 0), dim=-1)
    w_pos = 0.45 * w_t + 0.55 * w_u
    pos = 100.0 * f @ w_pos.T + alpha * (torch.exp(-beta * (1.0 - f @ k.T)) @ soft_values)
    neg = (100.0 * 0.15 * (1.0 - f @ w_n.T)
           + alpha * (torch.exp(-beta * (1.0 - (1.0 - f @ nk.T))) @ values))
    out = lam * pos + (1.0 - lam) * neg
    ce = F.cross_entropy(out, y)
    # The reference's adaptive_reranking_loss (torch.cdist + sort), knn nearest prototypes.
    knn = min(knn, w_pos.shape[0])
    dist = torch.cdist(f, w_pos, p=2)
    near, idx = torch.topk(dist, knn, dim=1, largest=False)
    p_y = w_pos[y]
    anchor = ((f - p_y) ** 2).sum(-1).sqrt().unsqueeze(1)
    margins = (1.0 - (w_pos[idx] * p_y.unsqueeze(1)).sum(-1)) / scale
    rerank = torch.clamp(anchor + margins - near, min=0.0).mean()
    # 'reference' consistency: nn.CosineSimilarity(dim=1) on [D, C] matrices = a cosine across classes.
    cos_t = F.cosine_similarity(w_pos, w_template, dim=0, eps=1e-7)
    cos_u = F.cosine_similarity(w_pos, w_cupl, dim=0, eps=1e-7)
    cons = (0.45 * (1.0 - cos_t) + 0.55 * (1.0 - cos_u)).mean()
    return ce + rerank + consistency_weight * cons


# ----------------------------------------------------------------------------------------------------------
# TSM (vlm_jax.methods.tsm.make_loss_fn).

def tsm_loss(tower, head, pixel_values, labels, class_mask) -> torch.Tensor:
    """CLIPVisionModel pooled output -> linear head -> logits masked to the sample's dataset -> CE."""
    logits = head(tower(pixel_values=pixel_values).pooler_output)
    logits = logits.masked_fill(~class_mask, _NEG)
    return F.cross_entropy(logits.float(), labels)


# ----------------------------------------------------------------------------------------------------------
# LoRA and the LLaVA passes (vlm_jax.models.peft, vlm_jax.models.llava).

class LoRALinear(torch.nn.Module):
    """y = base(x) + (alpha / r) * (x @ A^T) @ B^T with `base` frozen (HF PEFT's Linear, no dropout)."""

    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray, alpha: float, rank: int):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        dev = base.weight.device
        # vlm_jax stores A f32[in, r], B f32[r, out]: PEFT's lora_A.weight.T / lora_B.weight.T.
        self.lora_a = torch.nn.Parameter(tensor(np.asarray(a).T, dev, torch.float32))
        self.lora_b = torch.nn.Parameter(tensor(np.asarray(b).T, dev, torch.float32))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


LM_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def add_lora(hf_llava, lora_tree, *, alpha: float, rank: int) -> list[torch.nn.Parameter]:
    """Wraps every LM linear layer that has a pair in vlm_jax's `lora_tree` (same A, B); returns the new params.

    lora_tree: `peft.lora_init(...)` over Llava params: language_model/model/layers_{i}/<block>/<proj>/kernel.
    """
    lm = hf_llava.model.language_model
    layers = lora_tree["language_model"]["model"]
    params = []
    for i, layer in enumerate(lm.layers):
        jl = layers.get(f"layers_{i}", {})
        for block, names in LM_LINEARS:
            for name in names:
                pair = jl.get(block, {}).get(name, {}).get("kernel")
                if pair is None:
                    continue
                module = getattr(getattr(layer, block), name)
                wrapped = LoRALinear(module, pair["a"], pair["b"], alpha, rank)
                setattr(getattr(layer, block), name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    if not params:
        raise ValueError("no LoRA pair matched an LM linear layer")
    return params


def embed_multimodal(hf_llava, ids, pixel_values, image_token_id: int):
    """`Llava.embed_multimodal`: token embeddings with the projected image features at the image tokens.

    vision_feature_layer -2, 'default' strategy (class token dropped), as the benchmark's LLaVA config.
    """
    m = hf_llava.model
    emb = m.language_model.embed_tokens(ids)
    states = m.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = m.multi_modal_projector(states)
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(mask, feats.to(emb.dtype))


def hidden_states(hf_llava, embeds, mask):
    """`Llava.hidden_states`: final-norm hidden states, positions cumsum(mask) - 1 (vlm_jax's default)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return hf_llava.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state


def replace_span(embeds, start, prompt):
    """`peft.replace_span`: rows' positions [start, start + P) take the soft prompt f32[P, D]."""
    b, length, _ = embeds.shape
    p = prompt.shape[0]
    offset = torch.arange(length, device=embeds.device)[None] - start[:, None]
    inside = (offset >= 0) & (offset < p) & (start[:, None] >= 0)
    values = prompt[offset.clamp(0, p - 1)]
    return torch.where(inside[..., None], values.to(embeds.dtype), embeds)


def last_token(hidden, mask):
    """`vladva.last_token_embedding`."""
    length = mask.shape[1]
    last = length - 1 - torch.argmax(torch.flip(mask, [1]).gt(0).int(), dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def next_token_loss(logits, ids, loss_mask):
    """`vladva.next_token_loss` (mean -log p over the target tokens of the batch)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -torch.gather(logp, -1, ids[:, 1:, None])[..., 0]
    mask = loss_mask[:, 1:] > 0
    return torch.where(mask, nll, 0.0).sum() / mask.sum().clamp(min=1)


def info_nce(img, txt, temperature: float, valid):
    """`vladva.info_nce` (symmetric InfoNCE on cosine similarities, padded pairs masked out)."""
    img = F.normalize(img.float(), dim=-1, eps=1e-6)
    txt = F.normalize(txt.float(), dim=-1, eps=1e-6)
    logits = img @ txt.T / temperature
    logits = torch.where(valid[:, None] & valid[None, :], logits, _NEG)
    diag = torch.arange(logits.shape[0], device=logits.device)
    ce = lambda lg: torch.logsumexp(lg, dim=1) - lg[diag, diag]  # noqa: E731
    per_row = 0.5 * (ce(logits) + ce(logits.T))
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)


def discriminative_loss(hf, b: dict, image_prompt, text_prompt, *, image_token_id: int, temperature: float,
                        ntp_weight: float = 1.0):
    """`vladva.make_loss_fn`'s loss: InfoNCE(image, short-caption embeddings) + NTP(long captions)."""
    emb = replace_span(embed_multimodal(hf, b["image_ids"], b["pixel_values"], image_token_id),
                       b["image_prompt_start"], image_prompt)
    img = last_token(hidden_states(hf, emb, b["image_mask"]), b["image_mask"])
    temb = replace_span(hf.model.language_model.embed_tokens(b["text_ids"]), b["text_prompt_start"], text_prompt)
    txt = last_token(hidden_states(hf, temb, b["text_mask"]), b["text_mask"])
    loss = info_nce(img, txt, temperature, b["has_short"])
    lemb = replace_span(embed_multimodal(hf, b["long_ids"], b["pixel_values"], image_token_id),
                        b["long_prompt_start"], image_prompt)
    logits = hf.lm_head(hidden_states(hf, lemb, b["long_mask"]))
    mask = b["long_loss_mask"] * b["has_long"].to(b["long_loss_mask"].dtype)[:, None]
    return loss + ntp_weight * next_token_loss(logits, b["long_ids"], mask)


# ----------------------------------------------------------------------------------------------------------
# VITask (vlm_jax.methods.vitask, vlm_jax.programs.vitask.make_loss_fn).

def exemplar_connector(dt: int, d: int, hidden: int, params: dict, device) -> torch.nn.Module:
    """`vitask.ExemplarConnector` (LayerNorm -> Linear -> exact GELU -> Linear) with vlm_jax's weights, frozen."""
    net = torch.nn.Sequential(torch.nn.LayerNorm(dt, eps=1e-5), torch.nn.Linear(dt, hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, d)).to(device)
    with torch.no_grad():
        net[0].weight.copy_(tensor(params["norm"]["scale"], device))
        net[0].bias.copy_(tensor(params["norm"]["bias"], device))
        for i, name in ((1, "linear_1"), (3, "linear_2")):
            net[i].weight.copy_(tensor(np.asarray(params[name]["kernel"]).T, device))
            net[i].bias.copy_(tensor(params[name]["bias"], device))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def exemplar_position(ids, image_token_id: int):
    is_img = ids == image_token_id
    length = ids.shape[1]
    last = length - 1 - torch.argmax(torch.flip(is_img, [1]).int(), dim=1)
    return torch.where(is_img.any(1), last + 1, 0)


def insert_token(x, value, position):
    """`vitask.insert_token`: [B, L, ...] -> [B, L + 1, ...] with `value` at `position`."""
    b, length = x.shape[:2]
    idx = torch.arange(length + 1, device=x.device)[None]
    pos = position[:, None]
    src = (idx - (idx > pos).long()).clamp(0, length - 1)
    extra = (1,) * (x.ndim - 2)
    gathered = torch.gather(x, 1, src.reshape(src.shape + extra).expand((b, length + 1) + x.shape[2:]))
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device).expand((b,) + x.shape[2:])
    return torch.where((idx == pos).reshape((b, length + 1) + extra), value[:, None], gathered)


def remove_token(x, index):
    """`vitask.remove_token`: [B, L + 1, ...] -> [B, L, ...] without row b's element index[b]."""
    b, length = x.shape[0], x.shape[1] - 1
    idx = torch.arange(length, device=x.device)[None]
    src = idx + (idx >= index[:, None]).long()
    return torch.gather(x, 1, src.reshape(src.shape + (1,) * (x.ndim - 2)).expand((b, length) + x.shape[2:]))


def vitask_forward(hf, ids, mask, pixels, image_token_id: int, connector=None, feature=None):
    """`programs.vitask.make_forward`: plain pass logits, or (exemplar pass logits, position)."""
    emb = embed_multimodal(hf, ids, pixels, image_token_id)
    pos = None
    if connector is not None:
        pos = exemplar_position(ids, image_token_id)
        ex = connector(feature).to(emb.dtype)
        emb, mask = insert_token(emb, ex, pos), insert_token(mask, 1, pos)
    logits = hf.lm_head(hidden_states(hf, emb, mask)).float()
    return logits if connector is None else (logits, pos)


def vitask_stage2_loss(hf, connector, b: dict, *, image_token_id: int, pad_id: int, alpha: float = 1.0,
                       beta: float = 1.0):
    """VITask stage 2: L_van + L_ep + alpha KL(student || sg teacher) + beta CRT (`vitask.total_loss`)."""
    ids, mask, amask = b["input_ids"], b["attention_mask"], b["answer_mask"]
    plain = vitask_forward(hf, ids, mask, b["pixel_values"], image_token_id)
    l_van = next_token_loss(plain, ids, amask)
    ep, pos = vitask_forward(hf, ids, mask, b["pixel_values"], image_token_id, connector, b["feature"])
    l_ep = next_token_loss(ep, insert_token(ids, pad_id, pos), insert_token(amask, 0, pos))
    teacher = remove_token(ep, (pos - 1).clamp(min=0)).detach()
    log_s = torch.log_softmax(plain[:, :-1], dim=-1)
    log_t = torch.log_softmax(teacher[:, :-1], dim=-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    m = amask[:, 1:] > 0
    n = m.sum().clamp(min=1)
    rda = torch.where(m, kl, 0.0).sum() / n
    neg = vitask_forward(hf, ids, mask, b["neg_pixel_values"], image_token_id)
    z = torch.log_softmax(plain[:, :-1] - neg[:, :-1], dim=-1)
    crt = torch.where(m, -torch.gather(z, -1, ids[:, 1:, None])[..., 0], 0.0).sum() / n
    return l_van + l_ep + alpha * rda + beta * crt


def count(params) -> int:
    return sum(math.prod(p.shape) for p in params)
