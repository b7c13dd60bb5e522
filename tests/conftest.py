"""Shared pytest setup: CPU only, float32 matmuls at full precision for parity tests."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite's models are tiny, so its time goes to XLA compiling on 2 cores, not to running: skipping the CPU
# backend's expensive LLVM passes cuts that by about a third. Results are the same up to float rounding, which
# every tolerance here allows. Child processes inherit it (tests append their device-count flag).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [_USER_XLA_FLAGS, *FAST_COMPILE_FLAGS]))

# One persistent XLA compilation cache for the whole run, shared by the xdist workers (they inherit this
# environment) and every child process the tests start: the suite launches the same programs many times (each
# :runlocal variant, each kill / resume pair of the fault tests), and each would otherwise compile its steps again.
# Results are unaffected: a cached executable is the one the same compile would produce.
_OWN_CACHE = None   # the directory this process created (the xdist controller), removed when the session ends
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlm_jax-test-xla-cache-")
# Cache every executable, not only those that took >= 1 s to compile (JAX's default): with the fast-compile flags
# most of the suite's compiles take less, and the child processes repeat them (test_fault_tolerance.py +
# test_faults.py: 127 -> 104 s of CPU).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # the PyTorch oracle runs tiny models: one thread avoids oversubscribing the CPU (HF generate is ~100x
    import torch  # slower without on a loaded 2-core machine). torch is a test-only dependency.

    torch.set_num_threads(1)
except ImportError:
    pass


# ----------------------------------------------------------------------------- tiny HF CLIP fixtures
import pytest  # noqa: E402


@pytest.fixture
def optimized_env():
    """The environment for a child process that *computes* more than it compiles (the LVLM programs on the
    LLaVA / InternVL / Qwen2-VL replicas): XLA's optimising backend, which runs their steps about 2x faster than the
    suite's fast-compile flags do."""
    return dict(os.environ, XLA_FLAGS=_USER_XLA_FLAGS, JAX_PLATFORMS="cpu")

# A tiny HF CLIP config (both towers 2 layers); tests override fields per case.
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=99, max_position_embeddings=12, bos_token_id=97, eos_token_id=98,
                      pad_token_id=1, hidden_act="quick_gelu")
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, hidden_act="quick_gelu")


@pytest.fixture(scope="session")
def hf_clip(tmp_path_factory):
    """Factory (name, text=, vision=, projection_dim=, **save_kwargs) -> (torch CLIPModel, dir).

    Builds an HF `CLIPModel` from TINY_CLIP_* plus overrides, perturbs every parameter (HF
    initialises biases to 0 and LayerNorms to 1, which would hide conversion bugs), and saves it
    with `save_pretrained`. The model is the parity oracle and the directory the checkpoint.
    Cached per name for the session.
    """
    cache = {}

    def make(name, text=None, vision=None, projection_dim=16, **save_kwargs):
        if name not in cache:
            import torch
            import transformers

            cfg = transformers.CLIPConfig(text_config={**TINY_CLIP_TEXT, **(text or {})},
                                          vision_config={**TINY_CLIP_VISION, **(vision or {})},
                                          projection_dim=projection_dim)
            torch.manual_seed(0)
            model = transformers.CLIPModel(cfg).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, **save_kwargs)
            cache[name] = (model, path)
        return cache[name]

    return make


# The suite's longest tests (child processes running whole programs) go first, so that with `-n 2` the two
# workers share them instead of one worker finishing alone on the last of them.
_FIRST = ("test_vitask_runlocal.py::test_vitask_runlocal", "test_lvlm_replica_runs.py", "test_pairs.py::test_runlocal",
          "test_mesh_equivalence.py", "test_runlocal.py", "test_sharded_load.py", "test_faults.py")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None and not hasattr(session.config, "workerinput"):   # not in an xdist worker
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, key in enumerate(_FIRST) if key in item.nodeid), len(_FIRST))
    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def llava15_replica(tmp_path_factory):
    """The llava-1.5 replica's directory (real structure, tiny widths; written once per session, ~10 s): the
    export and plan tests' checkpoint."""
    from vlm_jax.testing import replicas

    return replicas.write_replica("llava-1.5", tmp_path_factory.mktemp("replica") / "llava-1.5")
