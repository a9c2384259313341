"""Reading compiled (optimised, scheduled) HLO text: all-reduce dependency chains and communication overlap.

Used by ``ladder_hlo_check.py`` (the GPU compile-only check) and the CPU structural tests. Only the text
of ``compiled.as_text()`` is read, so every function here is testable on a hand-written snippet.

- ``longest_all_reduce_chain``: in one computation, the largest number of all-reduces on one path of
  data dependencies (``depth(i) = max(depth(operands)) + [i starts an all-reduce]``). A standard
  tensor-parallel stack of L layers has 2L; a ladder stack L (section 4 of REFERENCE.md). With
  sequence parallelism the same holds for reduce-scatters (``longest_collective_chain``).
- ``async_all_reduces``: every ``all-reduce-start`` with its backend config's ``"is_sync"`` flag and the
  matmuls (dots, GEMM custom calls, matrix-to-vector reduces — XLA's form of a one-row matmul — and fusions
  that contain one) scheduled between it and its ``all-reduce-done`` (compiled HLO lists instructions in
  schedule order).
"""

from __future__ import annotations

import dataclasses
import re

ALL_REDUCE_STARTS = ("all-reduce", "all-reduce-start")
REDUCE_SCATTER_STARTS = ("reduce-scatter", "reduce-scatter-start")
_COMPUTATION_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|called_computations)=\{?%?([\w.\-]+)")
_ARRAY_RESULT = re.compile(r"=\s*[a-z]+[0-9]*\[([\d,]*)\]")
MIN_MATRIX_SIDE = 128  # a reduce over a matrix this large on both sides is a matrix-vector product
_GEMM_TARGET = re.compile(r"custom_call_target=\"[^\"]*(gemm|matmul|cublas)[^\"]*\"", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    operands: tuple[str, ...]
    line: str


@dataclasses.dataclass(frozen=True)
class AsyncAllReduce:
    """One ``all-reduce-start``: whether XLA made it asynchronous, and the matmuls it overlaps."""

    name: str
    computation: str
    is_async: bool
    overlapped_matmuls: int


def parse_computations(hlo_text: str) -> dict[str, list[Instruction]]:
    """Computation name -> its instructions in text (= schedule) order; ``"ENTRY"`` names the entry too."""
    computations: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION_HEADER.match(line)
        if header and "=" not in line.split("(")[0]:
            current = computations.setdefault(header.group(2), [])
            if header.group(1):
                computations["ENTRY"] = current
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if current is not None and match:
            current.append(_parse_instruction(match.group(2), match.group(3), line))
    return computations


def _parse_instruction(name: str, rest: str, line: str) -> Instruction:
    """``type opcode(operands), attributes`` -> Instruction (operand names without ``%``)."""
    rest = rest.strip()
    if rest.startswith("("):  # tuple result type
        rest = rest[_matching_paren(rest, 0) + 1:].strip()
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else rest
    opcode = rest.split("(", 1)[0].strip()
    start = rest.find("(")
    operand_text = rest[start + 1:_matching_paren(rest, start)] if start >= 0 else ""
    operands = tuple(piece.strip().split()[-1].lstrip("%") for piece in _split_top_level(operand_text)
                     if piece.strip())
    return Instruction(name=name, opcode=opcode, operands=operands, line=line)


def _matching_paren(text: str, open_index: int) -> int:
    depth = 0
    for index in range(open_index, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return len(text)


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets (shapes such as ``f32[2,3]{1,0}`` contain commas)."""
    pieces, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            pieces.append(text[start:index])
            start = index + 1
    pieces.append(text[start:])
    return pieces


def longest_collective_chain(instructions: list[Instruction], opcodes: tuple[str, ...]) -> int:
    """The most collectives of ``opcodes`` on one dependency path:
    ``depth(i) = max_operands depth + [i's opcode is in opcodes]`` (a ``*-done`` inherits its start's depth)."""
    depth: dict[str, int] = {}
    for instruction in instructions:
        inherited = max((depth.get(operand, 0) for operand in instruction.operands), default=0)
        depth[instruction.name] = inherited + int(instruction.opcode in opcodes)
    return max(depth.values(), default=0)


def longest_all_reduce_chain(instructions: list[Instruction]) -> int:
    """The most all-reduces on one dependency path (``longest_collective_chain`` of all-reduces)."""
    return longest_collective_chain(instructions, ALL_REDUCE_STARTS)


def count_collectives(instructions: list[Instruction], opcodes: tuple[str, ...]) -> int:
    """Number of instructions whose opcode is in ``opcodes`` (synchronous collectives and async starts)."""
    return sum(instruction.opcode in opcodes for instruction in instructions)


def count_all_reduces(instructions: list[Instruction]) -> int:
    """Number of all-reduces (synchronous ones and async starts)."""
    return count_collectives(instructions, ALL_REDUCE_STARTS)


def computations_with_matmul(computations: dict[str, list[Instruction]]) -> set[str]:
    """Names of computations that contain a matmul, directly or through the computations they call."""
    direct = {name for name, body in computations.items() if any(_is_direct_matmul(i, _result_dims(body))
                                                                 for i in body)}
    changed = True
    while changed:
        changed = False
        for name, body in computations.items():
            if name not in direct and any(called in direct for i in body for called in _CALLED.findall(i.line)):
                direct.add(name)
                changed = True
    return direct


def _is_direct_matmul(instruction: Instruction, dims: dict[str, tuple[int, ...] | None]) -> bool:
    return instruction.opcode in ("dot", "convolution") or (
        instruction.opcode == "custom-call" and bool(_GEMM_TARGET.search(instruction.line))) or (
        _is_matrix_vector_reduce(instruction, dims))


def _is_matrix_vector_reduce(instruction: Instruction, dims: dict[str, tuple[int, ...] | None]) -> bool:
    """A ``reduce`` of a matrix with both sides ≥ ``MIN_MATRIX_SIDE`` to a vector: how XLA's GPU compiler
    emits a one-row matmul ``[1, K] @ [K, N]`` (a multiply fusion over the weights, then this reduce), as at
    batch-1 decode shapes. Norms (reductions of rank-3 activations) and softmax sums (short rows) are not."""
    if instruction.opcode != "reduce" or not instruction.operands:
        return False
    operand, result = dims.get(instruction.operands[0]), dims.get(instruction.name)
    return (operand is not None and result is not None and len(operand) == 2 and len(result) == 1
            and min(operand) >= MIN_MATRIX_SIDE)


def _result_dims(body: list[Instruction]) -> dict[str, tuple[int, ...] | None]:
    """Instruction name -> dimensions of its array result (None for tuples and tokens)."""
    found = {}
    for instruction in body:
        match = _ARRAY_RESULT.search(instruction.line)
        found[instruction.name] = (tuple(int(d) for d in match.group(1).split(",") if d) if match else None)
    return found


def is_matmul(instruction: Instruction, matmul_computations: set[str]) -> bool:
    """A dot, a GEMM custom call, a matrix-vector reduce, or a fusion / call whose computation contains one."""
    return _is_direct_matmul(instruction, {}) or any(
        called in matmul_computations for called in _CALLED.findall(instruction.line))


def async_all_reduces(computations: dict[str, list[Instruction]]) -> list[AsyncAllReduce]:
    """Every ``all-reduce-start`` with ``is_async`` (``"is_sync":false`` in its backend config) and the
    number of matmuls scheduled between it and the ``all-reduce-done`` that consumes it."""
    matmul_computations = computations_with_matmul(computations)
    found = []
    for computation, body in computations.items():
        if computation == "ENTRY":
            continue
        for index, instruction in enumerate(body):
            if instruction.opcode != "all-reduce-start":
                continue
            overlapped = 0
            for later in body[index + 1:]:
                if later.opcode == "all-reduce-done" and instruction.name in later.operands:
                    break
                overlapped += is_matmul(later, matmul_computations)
            is_async = re.search(r'"is_sync"\s*:\s*false', instruction.line) is not None
            found.append(AsyncAllReduce(instruction.name, computation, is_async, overlapped))
    return found


def overlap_summary(hlo_text: str) -> dict[str, int]:
    """Counts over the whole module: ``all_reduces`` (sync + async starts), ``async`` starts, and
    ``async_overlapped`` (async starts with at least one matmul before their done)."""
    computations = parse_computations(hlo_text)
    named = {name: body for name, body in computations.items() if name != "ENTRY"}
    starts = async_all_reduces(computations)
    return {
        "all_reduces": sum(count_all_reduces(body) for body in named.values()),
        "async": sum(start.is_async for start in starts),
        "async_overlapped": sum(start.is_async and start.overlapped_matmuls > 0 for start in starts),
    }


def passes_overlap_check(summary: dict[str, int]) -> bool:
    """The ladder target: all but (at most) the last all-reduce are asynchronous and overlap a matmul."""
    return summary["all_reduces"] >= 2 and summary["async_overlapped"] >= summary["all_reduces"] - 1
