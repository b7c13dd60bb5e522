"""Both LVLM programs end to end on the llava-interleave-qwen replica (SigLIP 384 px -> 729 image tokens,
Qwen2 with ChatML), with their default configs and only size overrides, as a user would run them; the
llava-1.5 replica (CLIP 336 px -> 576 tokens, SentencePiece Llama) is what both `:runlocal` runs use
(test_pairs.py, test_vitask_runlocal.py). The replica is written once, by the README's command, into a directory
that `--config.model.checkpoint` names."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def qwen_replica(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicas") / "llava-interleave-qwen"
    proc = subprocess.run([sys.executable, "-m", "vlm_jax.testing.replicas", "llava-interleave-qwen", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _run(tmp_path, env, *args):
    env = dict(env, VLM_JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"), *args,
                           f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.load(open(tmp_path / "run" / "results.json"))


def test_vladva_on_the_qwen_replica(tmp_path, qwen_replica, optimized_env):
    out = _run(tmp_path, optimized_env, "--config=configs/vladva.py",
               f"--config.model.checkpoint={qwen_replica}",
               "--config.data.name=builtin", "--config.clip_checkpoint=", "--config.data.train_limit=16",
               "--config.train.batch_size=8", "--config.data.eval_batch_size=10")
    assert out["train_pairs"] == 16 and len(out["history"]) == 1
    # The long rows were derived from the checkpoint: 729 image tokens + the prompt + a caption.
    assert out["long_len"] > 729 + 10
    assert set(out["results"]) == {"LVLM + handcrafted prompts (E5-V style)", "VladVA (soft prompts + LoRA)"}
    for row in out["results"].values():
        assert 0.0 <= row["t2i_R@1"] <= 100.0


def test_vitask_on_the_qwen_replica(tmp_path, qwen_replica, optimized_env):
    out = _run(tmp_path, optimized_env, "--config=configs/vitask.py", f"--config.model.checkpoint={qwen_replica}",
               "--config.tsm.checkpoint=builtin:tiny-clip", "--config.data.name=builtin_a,builtin_b",
               "--config.data.train_limit=8", "--config.data.test_limit=4", "--config.tsm.epochs=1",
               "--config.tsm.batch_size=8", "--config.train.batch_size=8", "--config.data.val_limit=4",
               # Greedy decoding runs in both :runlocal tests (llava-1.5 replica); here likelihood ranking only,
               # to keep the suite's time.
               "--config.method.eval_mode=likelihood")
    assert out["train_examples"] == 16 and out["test_examples"] == 8
    rows = out["results"]
    assert {"TSM", "vanilla (L_van)", "VITask w/o EP", "VITask w/ EP"} <= set(rows)
    for r in rows.values():
        assert 0.0 <= r["mean"]["accuracy"] <= 100.0
