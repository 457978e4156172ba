"""The one segment engine: its layout, the recall-query window rule, explicit state, and the import structure."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from hmt_adapter import HMTConfig
from hmt_adapter.engine import SegmentLayout, query_known, summary_window_start
from hmt_adapter.engine.layout import frame, read_after

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hmt_adapter"


def test_pack_then_unpack_gives_the_parts_back() -> None:
    b, k, l, d = 3, 2, 5, 4
    memory, sensory, x, write = torch.randn(b, d), torch.randn(b, k, d), torch.randn(b, l, d), torch.randn(b, d)
    x_len = torch.tensor([5, 3, 0])
    layout = SegmentLayout.of(sensory)
    packed = layout.pack(memory, sensory, x, x_len, write)  # (B, 1 + k + l + 1, d)
    assert packed.shape == (b, 1 + k + l + 1, d)
    torch.testing.assert_close(packed[:, 0], memory)
    torch.testing.assert_close(packed[:, 1 : 1 + k], sensory)
    for row, n in enumerate(x_len.tolist()):
        torch.testing.assert_close(packed[row, layout.token_position(0) : layout.token_position(n)], x[row, :n])
        torch.testing.assert_close(packed[row, layout.write_position(n)], write[row])
    body, slot = layout.unpack(packed, x_len, l)  # hidden states laid out like the inputs read back the parts
    torch.testing.assert_close(body[0], x[0])
    torch.testing.assert_close(slot, write)
    prefix = layout.prefix(memory, sensory, x[:, :2])
    torch.testing.assert_close(prefix[:2], packed[:2, : layout.token_position(2)])  # rows with >= 2 real tokens


def test_layout_refuses_a_sensory_of_another_length() -> None:
    with pytest.raises(ValueError, match="sensory"):
        SegmentLayout(2).pack(torch.randn(1, 4), torch.randn(1, 3, 4), torch.randn(1, 5, 4), torch.tensor([5]), torch.randn(1, 4))


def test_frame_and_read_after_are_mirrors() -> None:
    first, body, last = torch.randn(2, 3), torch.randn(2, 4, 3), torch.randn(2, 3)
    lengths = torch.tensor([4, 1])
    torch.testing.assert_close(read_after(frame(first, body, lengths, last), lengths), last)


@pytest.mark.parametrize("mode", ["segment", "previous"])
def test_window_rule_is_shared_by_forward_and_streaming(mode) -> None:
    config = HMTConfig(segment_length=8, summary_fraction=0.5, recall_query=mode)
    starts = torch.tensor([8, 16, 24])
    expected = starts - 4 if mode == "previous" else starts
    assert torch.equal(summary_window_start(config, starts), expected)  # the forward's batched form
    assert summary_window_start(config, 16) == int(expected[1])  # streaming's integer form
    assert query_known(config, 0) == (mode == "previous")
    assert query_known(config, 4)
    assert query_known(HMTConfig(segment_length=8, use_recall=False), 0)


def _imports(path: pathlib.Path, typing_only: bool = False) -> set[str]:
    """Modules of the package that ``path`` imports at run time (relative imports resolved to hmt_adapter.*);
    with ``typing_only``, those imported only under ``if TYPE_CHECKING:`` instead."""
    tree = ast.parse(path.read_text())
    package = ".".join(("hmt_adapter",) + path.relative_to(PACKAGE).parent.parts)
    typing_nodes = {
        id(inner) for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if (id(node) in typing_nodes) != typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hmt_adapter"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hmt_adapter"))
    return found


def _modules(typing_only: bool = False) -> dict[str, set[str]]:
    """{module: package modules it imports}, a package import counted as its ``__init__`` module."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("hmt_adapter",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        modules[name] = {m for m in _imports(path, typing_only) if m != name}
    for name, deps in modules.items():  # expand "from . import x" to the module x where there is one
        modules[name] = {d for d in deps if d in modules}
    return modules


#: The package's layers, lowest first: a module imports its own layer and the ones below, never one above.
LAYERS = ("hmt_adapter.engine", "hmt_adapter.inference", "hmt_adapter.tuner", "hmt_adapter.integrations")
ON_TOP = ("hmt_adapter", "hmt_adapter.evaluation", "hmt_adapter.testing")  # the package's face and its users


def _layer(module: str) -> int:
    if module in ON_TOP:
        return len(LAYERS)
    return next(i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + "."))


def test_no_import_circle_in_the_package() -> None:
    modules = _modules()
    visiting, done = [], set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, f"import circle: {' -> '.join(visiting[visiting.index(name):] + [name])}"
        visiting.append(name)
        for dep in modules[name]:
            if dep != "hmt_adapter" and not name.startswith(dep + "."):  # a module importing its own package's face
                visit(dep)
        visiting.pop()
        done.add(name)

    for name in modules:
        visit(name)


def test_folders_are_layers_and_no_import_runs_up() -> None:
    """engine < inference < tuner < integrations (< the package face, evaluation, testing): every import, typing-only
    ones included, stays in its layer or goes down; the engine is the only place the computation lives."""
    for typing_only in (False, True):
        for module, deps in _modules(typing_only).items():
            if module in ON_TOP:
                continue
            for dep in deps:
                assert _layer(dep) <= _layer(module), f"{module} imports {dep}, a layer above it"


def test_callers_use_the_engine_through_its_face() -> None:
    """Outside the engine, only ``hmt_adapter.engine`` itself is imported (its ``__init__`` names what is public)."""
    for module, deps in _modules().items():
        if module.startswith("hmt_adapter.engine"):
            continue
        inner = sorted(d for d in deps if d.startswith("hmt_adapter.engine."))
        assert not inner, f"{module} imports engine modules {inner} around hmt_adapter.engine"
