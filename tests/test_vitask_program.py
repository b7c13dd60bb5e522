"""VITask program pieces on a tiny random LLaVA: joint-task token rows, CRT negatives, the cached label ranking
(equal to the uncached full passes), ranking / generation restricted to each sample's own dataset, the table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.data import chat, fewshot, medmnist, tokenize, vitask_tasks
from vlm_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from vlm_jax.eval import lvlm_classify
from vlm_jax.methods import vladva as disc
from vlm_jax.methods import vitask
from vlm_jax.models import llava as llava_lib
from vlm_jax.models import peft
from vlm_jax.programs import vitask as prog

TEMPLATE = "USER: {} ASSISTANT:"
CHEST = medmnist.MEDMNIST["chestmnist"].labels[:4]


def _task():
    """Three datasets: 3 classes, 2 classes (longer instruction), and a 4-label multi-label set."""
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    ex = lambda k, name: fewshot.Example(None, k, name, img())
    a = vitask_tasks.TaskDataset("a", "photo", ("cat", "dog", "bird"), False,
                                 [ex(k % 3, "") for k in range(6)], [ex(k % 3, "") for k in range(5)])
    b = vitask_tasks.TaskDataset("b", "chest X-ray image of a patient", ("normal lung", "sick lung"), False,
                                 [ex(k % 2, "") for k in range(4)], [ex(k % 2, "") for k in range(3)])
    hot = [np.array(h, np.int32) for h in ([0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1])]
    mk = lambda h: medmnist.MedExample(img(), -1, "", h)
    c = vitask_tasks.TaskDataset("c", "chest X-ray", CHEST, True, [mk(h) for h in hot], [mk(h) for h in hot[:3]])
    return vitask_tasks.build_task([a, b, c])


def _tiny_llava(texts, tmp):
    """A random 2-layer LLaVA (CLIP 16 px / 8 px patches: 4 image tokens) and a BPE tokenizer trained on `texts`.

    Built in memory with numpy-drawn params on the `eval_shape` tree: no init compile (the model's init and
    `llava_convert.write_random_checkpoint`'s per-leaf jits cost most of a minute on a busy 2-core machine)."""
    from transformers import LlavaConfig as HFConfig

    tok = tokenize.build_offline_tokenizer(texts, tmp)
    vision = dict(model_type="clip_vision_model", hidden_act="quick_gelu", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8)
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = HFConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = llava_lib.Llava(llava_lib.LlavaConfig.from_hf(config))
    return model, _random_params(model.init, model.init_inputs(), 1), tok


def _random_params(init, inputs, seed):
    """Random params for `init(key, *inputs)`: N(0, 1/fan_in) kernels, norm scales 1 + noise, biases noise."""
    shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        noise = rng.normal(size=x.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.05 * noise
        if "bias" in name or len(x.shape) < 2:
            return 0.05 * noise
        return noise / np.sqrt(x.shape[0])

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = _task()
    instructions = [d.instruction() for d in task.datasets]
    labels = [d.label_responses() for d in task.datasets]
    texts = [TEMPLATE.replace("{}", i) for i in instructions] + [r for rs in labels for r in rs] + ["normal."]
    model, base, tok = _tiny_llava(texts, tmp_path_factory.mktemp("tok"))
    fmt = chat.ChatFormat(tok, TEMPLATE, model.cfg.tokens_per_image, model.cfg.image_token_id)
    seqs = vitask_tasks.Seqs(fmt, instructions, task.train.responses + [r for rs in labels for r in rs])
    conn = vitask.ExemplarConnector(out_dim=64)
    conn_params = _random_params(conn.init, (jnp.zeros((1, 8)),), 2)
    targets = [tuple(t) if isinstance(t, (list, tuple)) else t for t in disc.LORA_TARGETS]
    lora = jax.eval_shape(lambda: peft.lora_init(base, jax.random.key(2), targets=targets, rank=2))
    # Random A and B (B = 0 at init would make LoRA the identity and the merge untested).
    rng = np.random.default_rng(3)
    lora = jax.tree.map(lambda x: 0.05 * rng.normal(size=x.shape).astype(np.float32), lora)
    pp = {"resize": {"shortest_edge": 16}, "crop": [16, 16], "rescale": 1 / 255, "mean": list(CLIP_MEAN),
          "std": list(CLIP_STD), "resample": 3, "convert_rgb": True}
    return dict(task=task, model=model, base=base, tok=tok, seqs=seqs, conn=conn, conn_params=conn_params,
                lora=lora, pp=pp, labels=labels)


def test_task_rows_and_prompts(setup):
    task, seqs, tok = setup["task"], setup["seqs"], setup["tok"]
    assert len(set(len(p) for p in seqs.prompts)) > 1  # the datasets' prompts differ in length
    assert task.train.responses[10:14] == ["normal.", "atelectasis, effusion.", "cardiomegaly.",
                                           "atelectasis, cardiomegaly, effusion, infiltration."]
    ds, resp = task.train.dataset, task.train.responses
    r = seqs.rows(ds, resp)
    assert r["input_ids"].shape == (len(resp), seqs.length)
    for i in range(len(resp)):
        p = seqs.prompts[ds[i]]
        n = int(r["attention_mask"][i].sum())
        np.testing.assert_array_equal(r["input_ids"][i, :len(p)], p)
        answer = r["input_ids"][i][r["answer_mask"][i] > 0].tolist()
        assert answer[-1] == tok.eos_token_id and r["answer_mask"][i, len(p)] == 1 and n == len(p) + len(answer)
        assert tok.decode(answer[:-1]).strip() == resp[i]
    ids, mask = seqs.prompt_rows(ds)
    assert mask[:, -1].all()  # left-padded
    for i in range(len(ds)):
        np.testing.assert_array_equal(ids[i][mask[i] > 0], seqs.prompts[ds[i]])
    t_ids, t_mask = seqs.answer_table(setup["labels"])
    assert t_ids.shape[:2] == (3, 4)
    assert t_mask[:, :, 0].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="longer"):
        seqs.rows([0], ["cat " * 50])


def test_cached_ranking_equals_uncached_passes(setup):
    task, model, seqs = setup["task"], setup["model"], setup["seqs"]
    conn, conn_params, base, lora = setup["conn"], setup["conn_params"], setup["base"], setup["lora"]
    test = task.test
    idx = np.array([0, 5, 6, 8, 2, 7])  # datasets 0, 1, 1, 2, 0, 1 in one batch: mixed prompt lengths
    feats = np.random.default_rng(4).normal(size=(len(test), 8)).astype(np.float32)
    px = prog._pixels(test.examples, idx, setup["pp"])
    ds = test.dataset[idx]
    t_ids, t_mask = seqs.answer_table(setup["labels"])
    # The program's evaluation: LoRA unmerged (as trained); the reference below merges it in float32.
    weights = {"base": base, "lora": lora}
    ids, mask = seqs.prompt_rows(ds)
    rank = vitask.make_ranker(peft.LoraModel(model, alpha=2.0, rank=2), conn, model.cfg.image_token_id)
    # Reference: one full right-padded sequence per (image, label), vision tower and all, in one batch.
    score = vitask.make_scorer(vitask.make_forward(model, conn, model.cfg.image_token_id), lora_alpha=2.0, lora_rank=2)
    pairs = [(i, j) for i, d in enumerate(ds) for j in range(len(setup["labels"][d]))]
    r = seqs.rows([ds[i] for i, _ in pairs], [setup["labels"][ds[i]][j] for i, j in pairs])
    rows = np.array([i for i, _ in pairs])
    got = {}
    for use_ep in (False, True):
        got[use_ep] = np.asarray(rank(weights, conn_params, ids, mask, px, feats[idx], t_ids[ds], t_mask[ds],
                                      use_ep=use_ep))
        assert got[use_ep].shape == (len(idx), 4)
        want = np.asarray(score(base, lora, conn_params, r["input_ids"], r["attention_mask"], r["answer_mask"],
                                px[rows], feats[idx][rows], use_ep=use_ep))
        np.testing.assert_allclose(got[use_ep][rows, [j for _, j in pairs]], want, rtol=1e-5, atol=1e-5)
    assert np.abs(got[True] - got[False]).max() > 1e-4  # the exemplar path is really taken


def test_rank_and_generate_stay_in_own_label_set(setup):
    task, model, seqs, tok = setup["task"], setup["model"], setup["seqs"], setup["tok"]
    conn, conn_params = setup["conn"], setup["conn_params"]
    test = task.test
    feats = np.zeros((len(test), 8), np.float32)
    weights = peft.lora_merge(setup["base"], setup["lora"], alpha=2.0, rank=2)
    rank = vitask.make_ranker(model, conn, model.cfg.image_token_id)
    rows = [i for i in range(len(test)) if not task.multi_label[test.dataset[i]]]
    pred, valid = lvlm_classify.rank_labels(rank, weights, conn_params, seqs, seqs.answer_table(setup["labels"]), task, test,
                                   rows, feats, lambda idx: prog._pixels(test.examples, idx, setup["pp"]), 3, False)
    assert valid.tolist() == [i in rows for i in range(len(test))]
    np.testing.assert_array_equal(pred.sum(1), valid.astype(int))
    mask = task.class_mask(test.dataset)
    assert not (pred & ~mask).any()  # every prediction inside the sample's own dataset
    embed = vitask.make_embedder(model, conn, model.cfg.image_token_id)
    pred, valid = lvlm_classify.generate_labels(model, embed, seqs, tok, task, test, weights, conn_params, feats,
                                       lambda idx: prog._pixels(test.examples, idx, setup["pp"]), 4, True)
    assert pred.shape == (len(test), task.num_classes) and not (pred & ~mask).any()
    assert not pred[~valid].any()


def test_split_metrics_and_table():
    task = _task()
    test = task.test
    pred = test.targets.copy()
    valid = np.ones(len(test), bool)
    # Dataset a (rows 0-4, labels 0 1 2 0 1): row 1 wrong (says 0), row 3 unmatched.
    pred[1] = False
    pred[1, 0] = True
    valid[3] = False
    # Dataset c (rows 8-10): row 9 misses one label.
    pred[9, task.offsets[2] + 2] = False
    m = vitask_tasks.split_metrics(task, test, pred, valid, unmatched=True)
    a, b, c = (m["datasets"][n] for n in "abc")
    assert a["accuracy"] == pytest.approx(60.0) and a["unmatched"] == pytest.approx(20.0)
    # class 0: TP1 FP1 FN1 -> .5; class 1: TP1 FP0 FN1 -> 2/3; class 2: TP1 -> 1
    assert a["macro_f1"] == pytest.approx(100 * (0.5 + 2 / 3 + 1) / 3)
    assert b == {"accuracy": 100.0, "macro_f1": 100.0, "unmatched": 0.0}
    # Labels (4) of c's test rows: {}, {0, 2}, {1}; predicted {}, {0}, {1} -> F1 per label 1, 1, 0, 0 (label 2 FN,
    # label 3 never occurs).
    assert c["accuracy"] == pytest.approx(100 * 2 / 3) and c["macro_f1"] == pytest.approx(50.0)
    assert m["mean"]["accuracy"] == pytest.approx((60 + 100 + 200 / 3) / 3)
    skipped = vitask_tasks.split_metrics(task, test, pred, valid, skip=[2])
    assert skipped["datasets"]["c"] is None and skipped["mean"] is None
    md = prog.format_results({"TSM": vitask_tasks.split_metrics(task, test, test.targets),
                              "x [generated]": m, "y": skipped}, task.names, "t")
    assert "| model | a acc | a F1 | b acc | b F1 | c acc | c F1 | mean acc | mean F1 |" in md
    # c F1 75: label 3 has no true and no predicted positive (0, as sklearn's zero_division=0).
    assert "| TSM | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 75.0 | 100.0 | 91.7 |" in md
    assert "| y | 60.0 | 72.2 | 100.0 | 100.0 | – | – | – | – |" in md
    assert "| x [generated] | 20.0 | 0.0 | 0.0 |" in md  # the unmatched table


def test_left_padded_mixed_batch_generates_as_each_prompt_alone(setup):
    """Evaluation pads the shorter datasets' prompts on the left: that must not change a row's greedy answer."""
    from vlm_jax.models import generate

    task, model, seqs = setup["task"], setup["model"], setup["seqs"]
    conn, conn_params = setup["conn"], setup["conn_params"]
    test = task.test
    weights = peft.lora_merge(setup["base"], setup["lora"], alpha=2.0, rank=2)
    embed = vitask.make_embedder(model, conn, model.cfg.image_token_id)
    idx = np.array([0, 5, 8])  # one row per dataset, three prompt lengths
    px = prog._pixels(test.examples, idx, setup["pp"])
    feats = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    ds = test.dataset[idx]
    ids, mask = seqs.prompt_rows(ds)
    assert (mask == 0).any()
    gen = lambda e, m, p: np.asarray(generate.greedy_generate(model, weights, None, m, 6, eos_token_id=None,
                                                              pad_token_id=seqs.pad, inputs_embeds=e, positions=p))
    mixed = gen(*embed(weights, conn_params, ids, mask, px, feats, use_ep=True))  # the exemplar goes in too
    for i, d in enumerate(ds):
        alone_ids = np.asarray([seqs.prompts[d]], np.int32)
        alone = gen(*embed(weights, conn_params, alone_ids, np.ones_like(alone_ids), px[i:i + 1], feats[i:i + 1],
                           use_ep=True))
        np.testing.assert_array_equal(mixed[i], alone[0])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_repeat_cache_repeats_rows_in_both_layer_layouts(scan_layers):
    from vlm_jax.models import llama

    cfg = llama.DecoderConfig.from_hf(dict(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=16,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    cache = llama.init_cache(cfg, 2, 5, scan_layers=scan_layers)
    fill = lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)
    cache = cache.replace(k=jax.tree.map(fill, cache.k), v=jax.tree.map(fill, cache.v), mask=fill(cache.mask),
                          index=jnp.asarray(3, jnp.int32))
    out = vitask.repeat_cache(cache, 3, scan_layers)
    axis = 1 if scan_layers else 0
    before, after = jax.tree.leaves((cache.k, cache.v)), jax.tree.leaves((out.k, out.v))
    for a, b in zip(before, after):
        assert b.shape[axis] == 6
        for row in range(6):
            np.testing.assert_array_equal(jnp.take(b, row, axis), jnp.take(a, row // 3, axis))
    np.testing.assert_array_equal(out.mask, np.repeat(np.asarray(cache.mask), 3, 0))
    assert int(out.index) == 3
