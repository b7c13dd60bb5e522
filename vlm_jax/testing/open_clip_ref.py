"""Imports open_clip (open-clip-torch, the PyTorch reference of `vlm_jax.models.open_clip`) for tests and benchmarks.

open-clip-torch requires torchvision, but only for its image transforms (`open_clip.transform`) and for
`FrozenBatchNorm2d` (`open_clip.utils`, used when an image tower is locked with frozen BN statistics); its
model code (`model`, `modified_resnet`, `transformer`, `create_model`) is plain torch. torchvision from PyPI does
not import beside the project's torch 2.13.0 CPU wheel, and a resolver that pulls it may pull a multi-GB CUDA
torch, so the test extra installs open-clip-torch with --no-deps (see .ci/run). When torchvision is missing, a
stub is registered *before* open_clip is imported: every torchvision name open_clip imports exists, and any use
of one raises. Nothing the parity tests run touches it (they build models with `create_model(...,
pretrained=None)` and feed tensors; no transform, no locking). With a working torchvision the stub is not used.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

STUB_MARK = "_vlm_jax_torchvision_stub"


class _Unavailable:
    """A placeholder class for any torchvision name; constructing or calling it raises."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not installed (vlm_jax registered a stub so that open_clip's model code "
                           "imports): open_clip's image transforms and FrozenBatchNorm2d are unavailable")

    def __class_getitem__(cls, item):
        return cls


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":  # open_clip reads InterpolationMode.BICUBIC in default arguments
            return types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
        return type(name, (_Unavailable,), {})


_STUB_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
               "torchvision.ops.misc")


def _import_with_stub():
    """Imports open_clip with the stub in sys.modules, then takes the stub out again.

    Only open_clip's module-level names keep pointing at it: a later `import torchvision` anywhere else fails
    as it would without the stub, and transformers' (cached) torchvision check is made before, so it still
    answers False and keeps its PIL image processors.
    """
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # lru_cached: the honest answer is cached before the stub exists
    for name in _STUB_NAMES:
        module = _StubModule(name)
        setattr(module, STUB_MARK, True)
        module.__path__ = []  # a package, so that submodule imports resolve to the stubs
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    try:
        return importlib.import_module("open_clip")
    finally:
        for name in _STUB_NAMES:
            sys.modules.pop(name, None)


def import_open_clip():
    """The `open_clip` package, imported with a torchvision stub if torchvision cannot be imported.

    Returns:
      (open_clip module, whether the stub was used).

    Raises:
      ImportError: open-clip-torch is not installed (`pip install --no-deps open-clip-torch ftfy`).
    """
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"], _STATE["stubbed"]
    if importlib.util.find_spec("open_clip") is None:
        raise ImportError("open-clip-torch is not installed: pip install --no-deps open-clip-torch ftfy "
                          "(--no-deps: its torchvision requirement would replace the CPU torch)")
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - not installed, or PyPI's build that fails beside the CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _STATE["stubbed"] = True
        return _import_with_stub(), True
    return importlib.import_module("open_clip"), False


_STATE = {"stubbed": False}
