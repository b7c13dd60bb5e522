"""Each method's train step on 8 fake CPU devices, under data / fsdp / data x fsdp x tensor meshes, gives the same
losses and updated parameters as on 1 device (the LVLM methods on LLaVA under fsdp; 'families': on InternVL and
Qwen2-VL under data x fsdp x tensor) (tests/mesh_child.py does the work in a child process, since the
device count is fixed when JAX starts)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("method", ["dualadapter", "tsm", "vladva", "vitask", "families"])
def test_train_step_equal_on_1_and_8_devices_under_each_mesh(method):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_child.py"), method], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), (proc.stdout[-2000:], proc.stderr[-4000:])
    if method == "families":  # VladVA and VITask on InternVL and Qwen2-VL, each on the data x fsdp x tensor mesh
        for name in ("vladva/internvl", "vladva/qwen2_vl", "vitask/internvl", "vitask/qwen2_vl"):
            assert proc.stdout.count(f"{name} {{") == 1, name
        return
    assert proc.stdout.count(f"{method} {{") == (1 if method in ("vladva", "vitask") else 3)  # every mesh ran
