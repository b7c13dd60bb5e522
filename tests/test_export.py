"""Export of trained tensors (convert/adapters.py): a PEFT adapter that `peft` loads onto the HF base with the
logits of our LoRA forward, a merged HF checkpoint with the same logits, and the non-LoRA trained trees as
safetensors + JSON. The oracle is HF PyTorch + the peft library on the llava-1.5 replica (real structure)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.convert import adapters
from vlm_jax.convert import llava as llava_convert
from vlm_jax.errors import UserError
from vlm_jax.methods import vladva as disc
from vlm_jax.models import peft as lora_lib
from vlm_jax.testing import common

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def trained(llava15_replica):
    """The llava-1.5 replica with random (non-zero) LoRA on VladVA's targets, one batch of inputs."""
    path = llava15_replica
    model, base = llava_convert.from_pretrained(path)
    lora = common.random_lora(base, disc.LORA_TARGETS, RANK, seed=1)  # B != 0: a mapping bug shows
    t = model.cfg.tokens_per_image
    ids = np.array([[1, 5] + [model.cfg.image_token_id] * t + [7, 8, 9]], np.int64)
    mask = np.ones_like(ids)
    pixels = np.random.default_rng(0).normal(size=(1, 336, 336, 3)).astype(np.float32)
    ours = jax.jit(lora_lib.LoraModel(model, alpha=ALPHA, rank=RANK).apply)(
        {"params": {"base": base, "lora": lora}}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
        jnp.asarray(pixels))
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    return path, model, base, lora, np.asarray(ours)[0], inputs


def test_peft_adapter_loads_with_equal_logits(trained, tmp_path):
    path, model, _, lora, ours, inputs = trained
    out = adapters.write_peft_adapter(tmp_path / "adapter", model, lora, rank=RANK, alpha=ALPHA, base_model=str(path))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        plain = hf(**inputs).logits.numpy()[0]
        adapted = hf_peft.PeftModel.from_pretrained(hf, out).eval()
        ref = adapted(**inputs).logits.numpy()[0]
    # Every targeted layer was found by peft (7 per LM layer), and the adapter changes the output.
    n_layers = model.cfg.text.num_layers
    assert sum(isinstance(m, hf_peft.tuners.lora.Linear) for m in adapted.modules()) == 7 * n_layers
    assert np.abs(plain - ref).max() > 1e-2
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_merged_checkpoint_loads_with_equal_logits(trained, tmp_path):
    path, model, base, lora, ours, inputs = trained
    out = adapters.write_merged(tmp_path / "merged", model, base, lora, rank=RANK, alpha=ALPHA)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(**inputs).logits.numpy()[0], ours, atol=1e-4, rtol=0)


def test_arrays_roundtrip_and_describe(tmp_path):
    trees = {"image_prompt": np.arange(6, dtype=np.float32).reshape(2, 3),
             "connector": {"dense": {"kernel": np.ones((3, 4), np.float32), "bias": np.zeros(4, np.float32)}}}
    what = {"image_prompt": "soft prompt f32[P, D]", "connector": "TSM -> LLM connector"}
    out = adapters.write_arrays(tmp_path / "a", trees, what, source={"method": "vladva"})
    index = json.loads((out / adapters.ARRAYS_INDEX).read_text())
    assert index["tensors"]["connector/dense/kernel"] == {"shape": [3, 4], "dtype": "float32",
                                                          "what": "TSM -> LLM connector"}
    assert index["source"] == {"method": "vladva"}
    back = adapters.read_arrays(out)
    jax.tree.map(np.testing.assert_array_equal, back, trees)


def test_non_linear_lora_is_refused(trained):
    _, model, base, _, _, _ = trained
    emb = lora_lib.lora_init(base, jax.random.key(0), targets=[r"language_model/model/embed_tokens/embedding"],
                             rank=RANK)
    with pytest.raises(UserError, match="no nn.Linear counterpart"):
        adapters.peft_tensors(emb, adapters.hf_table(model), rank=RANK)


def test_main_writes_adapter_and_arrays_and_errors_are_one_line(trained, tmp_path, monkeypatch, capsys):
    from vlm_jax.programs import export

    path, model, base, lora, _, _ = trained
    prompt = np.ones((3, model.cfg.text.hidden_size), np.float32)
    source = export.Source(method="vladva", checkpoint=str(path), trained={"lora": lora, "image_prompt": prompt},
                           model=model, base=base, lora_rank=RANK, lora_alpha=ALPHA)
    monkeypatch.setattr(export, "load_source", lambda workdir, fit: source)
    out = tmp_path / "out"
    export.main(["vlm-jax export", f"--workdir={tmp_path}", f"--out={out}"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (RANK, ALPHA, str(path))
    index = json.loads((out / "arrays.json").read_text())
    assert list(index["tensors"]) == ["image_prompt"] and index["source"]["lora_rank"] == RANK
    capsys.readouterr()
    for argv, msg in [([f"--workdir={tmp_path}", f"--out={out}", "--format=onnx"], "invalid choice"),
                      ([f"--workdir={tmp_path / 'nope'}", f"--out={out}"], "not a directory"),
                      ([f"--out={out}"], "--workdir")]:
        with pytest.raises(SystemExit) as e:
            export.main(["vlm-jax export", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    arrays_only = dataclasses.replace(source, trained={"image_prompt": prompt}, model=None)
    with pytest.raises(UserError, match="needs a run that trained LoRA"):
        export.export(arrays_only, tmp_path / "x", "merged")


def test_what_each_program_exports():
    from types import SimpleNamespace as NS

    from vlm_jax.programs import export

    fit = lambda **params: NS(params=params)
    s1, s2 = fit(lora="L1", connector="C1"), fit(lora="L2")
    trees = export.trained_trees("vitask", {"tsm": fit(head="H"), "vitask_stage1": s1, "vitask_stage2": s2,
                                            "vanilla": fit(lora="LV")}, "/w")
    # The final VITask model: stage 2 trains the LoRA only, the connector stays stage 1's.
    assert trees == {"lora": "L2", "connector": "C1", "tsm": {"head": "H"}}
    assert export.trained_trees("vitask", {"tsm": fit(), "vitask_stage1": s1}, "/w")["lora"] == "L1"
    assert export.trained_trees("vitask", {"vanilla": fit(lora="LV")}, "/w", fit="vanilla") == {"lora": "LV"}
    with pytest.raises(UserError, match="no fit 'vladva'.*there: x"):
        export.trained_trees("vladva", {"x": fit()}, "/w")
    with pytest.raises(UserError, match="training-free"):
        export.trained_trees("fewshot_clip", {}, "/w")
    few = {"dualadapter_f-4shot-seed1": fit(adapter={"res_keys": 1}), "dualadapter_f-4shot-seed1-cv0": fit()}
    trees = export.trained_trees("fewshot_clip", few, "/w")
    assert list(trees) == ["dualadapter_f-4shot-seed1"]  # not the cross-validation folds
    source = export.Source(method="fewshot_clip", checkpoint="c", trained=trees)
    (what,) = export._describe(source, list(source.trained)).values()
    assert what.startswith("dualadapter_f-4shot-seed1: few-shot CLIP adapter")


def test_source_from_a_loaded_run(tmp_path):
    from types import SimpleNamespace as NS

    import ml_collections

    from vlm_jax.programs import export

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (ckpt / name).write_text("{}")
    config = ml_collections.ConfigDict({"model": {"checkpoint": "llava-hf/llava-1.5-7b-hf"},
                                        "method": {"lora_rank": 4, "lora_alpha": 8.0}})
    loaded = NS(run=NS(program="vladva", workdir="/w", config=config), checkpoints={"model": str(ckpt)},
                model="M", base="B", fits={"vladva": NS(params={"lora": {"x": 1}, "image_prompt": 2})})
    source = export.source_from_run(loaded)
    # The hub id, not the cache path, names the base; the merged export gets the tokenizer, not the weights.
    assert (source.checkpoint, source.lora_rank, source.lora_alpha) == ("llava-hf/llava-1.5-7b-hf", 4, 8.0)
    assert list(source.extra_files) == ["tokenizer.json"] and source.model == "M"
    config.model.checkpoint = "replica:llava-1.5"
    assert export.source_from_run(loaded).checkpoint == str(ckpt)
