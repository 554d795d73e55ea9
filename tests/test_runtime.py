"""`Runtime` for real over 2 CPU processes: float64 reductions, and the reference-cache fingerprint (built from
parameter sums over ranks) identical under 1 and 2 processes, replicated (DDP) or sharded (ZeRO-3)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import accelerate_cmd, run

pytestmark = pytest.mark.distributed

SCRIPT = """
import json, sys
import torch
from rlalign.config.schema import DistributedConfig
from rlalign.models.builder import ReferenceModel, build_policy
from rlalign.objectives.ref_cache import reference_fingerprint
from rlalign.recipe import load_recipe
from rlalign.runtime import Runtime

recipe = load_recipe("recipes/test/tiny-xe.yaml")
runtime = Runtime.create(DistributedConfig())
with runtime.model_init():
    policy, _ = build_policy(recipe.model, recipe.data)
reference = ReferenceModel.build("copy", policy, runtime)
x = torch.tensor([1.0 + 2.0**-40, 3.0], dtype=torch.float64) * (runtime.rank + 1)
total = runtime.all_reduce(x)
out = {"fingerprint": reference_fingerprint(reference), "engine": runtime.engine,
       "world": runtime.world_size, "sum": total.tolist(), "dtype": str(total.dtype)}
if runtime.is_main:
    open(sys.argv[1], "w").write(json.dumps(out))
"""


def fingerprint(tmp_path, name: str, launch: str | None) -> dict:
    script, out = tmp_path / "fingerprint.py", tmp_path / f"{name}.json"
    script.write_text(SCRIPT)
    cmd = (
        accelerate_cmd(launch, 2, str(script), str(out))
        if launch
        else [sys.executable, str(script), str(out)]
    )
    run(cmd, timeout=300)
    return json.loads(out.read_text())


@pytest.mark.parametrize("launch", ["ddp-8gpu.yaml", pytest.param("zero3-8gpu.yaml", marks=pytest.mark.slow)])
def test_fingerprint_same_under_one_and_two_processes(tmp_path, launch):
    one = fingerprint(tmp_path, "one", None)
    two = fingerprint(tmp_path, "two", launch)
    assert (one["world"], two["world"]) == (1, 2)
    assert two["engine"] == {"ddp-8gpu.yaml": "ddp", "zero3-8gpu.yaml": "zero3"}[launch]
    assert two["fingerprint"] == one["fingerprint"]
    # float64 all the way: 2**-40 survives (float32 would round 1 + 2**-40 to 1)
    assert two["dtype"] == "torch.float64"
    assert two["sum"] == [3.0 * (1.0 + 2.0**-40), 9.0]
