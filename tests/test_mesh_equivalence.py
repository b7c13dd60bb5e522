"""Each method's train step on 8 fake CPU devices gives the same losses and updated parameters as on 1 device:
DualAdapter and TSM under the data x fsdp x tensor mesh, VladVA and VITask on LLaVA under fsdp and on InternVL and
Qwen2-VL under data x fsdp x tensor (tests/mesh_child.py says why these meshes, and does the work in a child
process, since the device count is fixed when JAX starts)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import mesh_child  # noqa: E402  (only its CASES table: the child imports jax with 8 devices itself)


def test_train_step_equal_on_1_and_8_devices_under_each_mesh():
    """One child for all cases (one import of jax + transformers instead of one per method); its output names
    the cases that failed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_child.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    failed = [report[:2000] for report in ("\n" + proc.stdout).split("\nFAIL ")[1:]]   # each with its traceback
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), (proc.stdout[-2000:], proc.stderr[-4000:])
    for name in mesh_child.CASES:   # every case ran, on its one mesh
        assert proc.stdout.count(f"{name} {{") == 1, (name, proc.stdout[-2000:])
