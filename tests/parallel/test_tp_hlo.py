"""Compiled-HLO proof of the ladder's communication structure.

The HLO readers of ``benchmarks/ladder_hlo.py`` on hand-written snippets (dependency chains, async
all-reduces and the matmuls they overlap), and the CPU structural check on 8 fake devices in a subprocess
(it needs its own XLA_FLAGS to keep the all-reduce combiner off): the longest chain of dependent
all-reduces is L for the ladder and 2L for the standard model.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("ladder_hlo", REPO / "benchmarks" / "ladder_hlo.py")
ladder_hlo = sys.modules.setdefault("ladder_hlo", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(ladder_hlo)

SCHEDULED_HLO = """HloModule blocks, is_scheduled=true, entry_computation_layout={(bf16[1,64]{1,0})->bf16[1,64]{1,0}}

%fused_gemm (p0: bf16[1,64], p1: bf16[64,64]) -> bf16[1,64] {
  %p0 = bf16[1,64]{1,0} parameter(0)
  %p1 = bf16[64,64]{1,0} parameter(1)
  ROOT %dot.1 = bf16[1,64]{1,0} dot(bf16[1,64]{1,0} %p0, bf16[64,64]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%sum (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %add.0 = bf16[] add(bf16[] %a, bf16[] %b)
}

ENTRY %main (x: bf16[1,64], w: bf16[64,64]) -> bf16[1,64] {
  %x = bf16[1,64]{1,0} parameter(0)
  %w = bf16[64,64]{1,0} parameter(1)
  %start.1 = bf16[1,64]{1,0} all-reduce-start(bf16[1,64]{1,0} %x), channel_id=1, replica_groups={{0,1}}, to_apply=%sum, backend_config={"operation_queue_id":"0","is_sync":false}
  %fusion.1 = bf16[1,64]{1,0} fusion(bf16[1,64]{1,0} %x, bf16[64,64]{1,0} %w), kind=kCustom, calls=%fused_gemm
  %gemm.2 = (bf16[1,64]{1,0}, s8[16]{0}) custom-call(bf16[1,64]{1,0} %x, bf16[64,64]{1,0} %w), custom_call_target="__cublas$gemm"
  %done.1 = bf16[1,64]{1,0} all-reduce-done(bf16[1,64]{1,0} %start.1)
  %start.2 = bf16[1,64]{1,0} all-reduce-start(bf16[1,64]{1,0} %fusion.1), channel_id=2, replica_groups={{0,1}}, to_apply=%sum, backend_config={"is_sync":true}
  %done.2 = bf16[1,64]{1,0} all-reduce-done(bf16[1,64]{1,0} %start.2)
  %next = bf16[1,64]{1,0} add(bf16[1,64]{1,0} %done.1, bf16[1,64]{1,0} %done.2)
  %ar.3 = bf16[1,64]{1,0} all-reduce(bf16[1,64]{1,0} %next), channel_id=3, replica_groups={{0,1}}, to_apply=%sum
  ROOT %out = bf16[1,64]{1,0} add(bf16[1,64]{1,0} %ar.3, bf16[1,64]{1,0} %x)
}
"""


def test_parses_computations_and_operands():
    computations = ladder_hlo.parse_computations(SCHEDULED_HLO)
    assert set(computations) == {"fused_gemm", "sum", "main", "ENTRY"}
    entry = {instruction.name: instruction for instruction in computations["ENTRY"]}
    assert entry["fusion.1"].opcode == "fusion" and entry["fusion.1"].operands == ("x", "w")
    assert entry["gemm.2"].opcode == "custom-call"
    assert entry["next"].operands == ("done.1", "done.2")


def test_all_reduce_chain_counts_dependent_all_reduces_only():
    entry = ladder_hlo.parse_computations(SCHEDULED_HLO)["ENTRY"]
    # start.1 and start.2 are independent (depth 1 each); ar.3 consumes both: chain 2, three all-reduces.
    assert ladder_hlo.longest_all_reduce_chain(entry) == 2
    assert ladder_hlo.count_all_reduces(entry) == 3


def test_async_all_reduces_and_overlapped_matmuls():
    starts = {start.name: start for start in ladder_hlo.async_all_reduces(ladder_hlo.parse_computations(SCHEDULED_HLO))}
    assert starts["start.1"].is_async and starts["start.1"].overlapped_matmuls == 2  # fusion with a dot + gemm
    assert not starts["start.2"].is_async and starts["start.2"].overlapped_matmuls == 0
    summary = ladder_hlo.overlap_summary(SCHEDULED_HLO)
    assert summary == {"all_reduces": 3, "async": 1, "async_overlapped": 1}
    assert not ladder_hlo.passes_overlap_check(summary)  # 3 all-reduces need >= 2 overlapped
    assert ladder_hlo.passes_overlap_check({"all_reduces": 3, "async": 2, "async_overlapped": 2})


def test_cpu_structural_check_ladder_chain_is_half_of_standard():
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ladder_hlo_check.py"), "--platform", "cpu",
                             "--layers", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in result.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in ("standard", "parallel", "ladder")}
    assert rows[("ladder", "forward")][:2] == ["4", "2"]  # 2L all-reduces, chain L
    assert rows[("ladder", "decode")][:2] == ["4", "2"]
    assert rows[("standard", "forward")][:2] == ["4", "4"]  # chain 2L
    assert "PASS" in result.stdout


@pytest.mark.parametrize("text", ["", "HloModule empty\n"])
def test_empty_modules_have_no_all_reduces(text):
    assert ladder_hlo.overlap_summary(text) == {"all_reduces": 0, "async": 0, "async_overlapped": 0}
    assert not ladder_hlo.passes_overlap_check(ladder_hlo.overlap_summary(text))
