"""Collectives have one home: outside ``trb_nemo/parallel/`` and ``trb_nemo/ops/`` no module
imports ``torch.distributed`` or ``megatron.core.parallel_state`` (so none can call a collective
on a tensor that is on the wrong device for its backend, or fetch a global process group)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = (ROOT / "trb_nemo" / "parallel", ROOT / "trb_nemo" / "ops")
SCANNED = [ROOT / "trb_nemo", ROOT / "benchmarks", ROOT / "examples"]


def offences(source: str) -> list[str]:
    """Lines of ``source`` that reach torch.distributed or Megatron's parallel_state."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        for n in names:
            if (n == "torch.distributed" or n.startswith("torch.distributed.")
                    or n.endswith("parallel_state")):
                found.append(f"line {node.lineno}: {n}")
    return found


def test_the_guard_sees_every_form():
    for bad in ("import torch.distributed as dist", "from torch import distributed",
                "from torch.distributed import all_reduce", "import torch\ntorch.distributed.barrier()",
                "from megatron.core import parallel_state",
                "from megatron.core.parallel_state import get_data_parallel_group"):
        assert offences(bad), bad
    assert not offences("import torch\nfrom trb_nemo.parallel import comm\ncomm.barrier()")


def test_no_collective_outside_parallel_and_ops():
    bad = {}
    for top in SCANNED:
        for path in top.rglob("*.py"):
            if any(path.is_relative_to(a) for a in ALLOWED):
                continue
            hits = offences(path.read_text())
            if hits:
                bad[str(path.relative_to(ROOT))] = hits
    assert not bad, ("use trb_nemo.parallel.comm / ParallelGroups instead of torch.distributed "
                     f"or parallel_state: {bad}")
