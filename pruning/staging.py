"""Split points of any model: cut a module into stages where exactly one tensor crosses.

API::

    stages, names = stages_by_tracing(module, example)      # a Python nn.Module (torch.fx)
    stages, names = stages_by_children(script, example)     # a TorchScript module
    check_stages(module, stages, names, example)            # tail(head(x)) == module(x)

A peer runs a model as a sequence of stages, one tensor handed from each to the
next (:class:`ccied.pruning.models.StagedModel`), so a split point is a place in
the computation where exactly one tensor is alive: everything before it
produced that tensor, everything after needs only it.

- A Python module is traced with ``torch.fx`` (symbolic: no data flows). Walking
  the graph in order, a cut after a node is a split point when that node's
  tensor is the only value computed from the input that a later node still
  uses. Inside a residual block the block's input is still alive, so no cut is
  offered there; after the addition it is. Values that do not depend on the
  input (parameters, constants) are copied into every stage that uses them.
- A TorchScript file cannot be traced again. Its top-level children (the
  children of an ``nn.Sequential`` child counted one by one) are tried as a
  chain, with ``torch.flatten(x, 1)`` before a child that takes only a flat
  tensor (the usual pool, flatten, linear ending); the chain is kept only when
  it gives the module's own answer.

Either way :func:`check_stages` checks ``tail(head(x)) == module(x)`` at every
split point on random inputs, to 1e-4 (relative to the largest logit when that
is over 1). Nothing here reads files; :mod:`ccied.pruning.custom` does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import torch
from ccied.pruning.errors import ModelError
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

log = logging.getLogger(__name__)

# tail(head(x)) must equal module(x) to this, relative to the largest logit when over 1.
SPLIT_TOLERANCE = 1e-4
# Random inputs each split point is checked on (a batch: a model that mixes the
# frames of a batch fails too).
CHECK_BATCH = 2
CHECK_SEED = 0


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``: one line for a user's error.

    TorchScript's errors start with a fixed sentence and a traceback of the
    scripted code, and end with the error itself: that last line is kept.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"


# -- torch.fx ------------------------------------------------------------------------


def stages_by_tracing(
    module: nn.Module, example: torch.Tensor
) -> tuple[list[nn.Module], list[str]]:
    """Trace ``module`` and cut it at every node after which one tensor crosses.

    Returns the stages (``fx.GraphModule`` sharing the module's parameters) and
    a name per stage: the outermost submodule that ends at the cut
    (``layer1.0``), else the graph node's name. ModelError when the module
    cannot be traced, takes more than one input, returns anything but one
    tensor, or has no split point.
    """
    try:
        graph_module = fx.symbolic_trace(module)
    except Exception as exc:  # user code: tracing can fail with any exception
        raise ModelError(
            f"the model cannot be traced by torch.fx ({describe(exc)}); make its forward "
            "free of control flow that depends on tensor values, or save it as TorchScript"
        ) from exc
    graph = graph_module.graph
    graph.eliminate_dead_code()
    nodes = list(graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        raise ModelError(f"the model's forward must take one tensor; it takes {len(inputs)}")
    (output,) = (node for node in nodes if node.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise ModelError("the model must return one tensor of logits, not a tuple or a dict")
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    except Exception as exc:  # user code: the traced graph may fail where forward ran
        raise ModelError(f"the traced model fails on an example input ({describe(exc)})") from exc

    # Nodes computed from the input; the rest (parameters, constants) are copied
    # into whichever stage needs them.
    dependent: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    position = {node: i for i, node in enumerate(nodes)}
    last_use = {
        node: max((position[user] for user in node.users), default=position[node]) for node in nodes
    }
    cuts: list[fx.Node] = []
    live: set[fx.Node] = set()
    for i, node in enumerate(nodes):
        if node in dependent and node.users:
            live.add(node)
        live = {n for n in live if last_use[n] > i}
        if (
            node.op not in ("placeholder", "output")
            and position[node] < position[result]
            and live == {node}
            and _is_batch_tensor(node, example.shape[0])
        ):
            cuts.append(node)
    if not cuts:
        raise ModelError(
            "no split point: nowhere in the model does a single tensor cross from one part "
            "to the rest"
        )
    boundaries = [inputs[0], *cuts, result]
    stages: list[nn.Module] = [
        _stage(graph_module, nodes, dependent, boundaries[k], boundaries[k + 1], position)
        for k in range(len(boundaries) - 1)
    ]
    # Where each submodule's last node lies: a cut after it names the module.
    module_end: dict[str, int] = {}
    for node in nodes:
        for path in _module_paths(node):
            module_end[path] = position[node]
    names = _unique([_cut_name(node, position[node], module_end) for node in boundaries[1:]])
    return stages, names


def _is_batch_tensor(node: fx.Node, batch: int) -> bool:
    """The node's value is one tensor whose first dimension is the batch."""
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and len(meta.shape) >= 1 and meta.shape[0] == batch


def _stage(
    root: fx.GraphModule,
    nodes: list[fx.Node],
    dependent: set[fx.Node],
    start: fx.Node,
    end: fx.Node,
    position: dict[fx.Node, int],
) -> fx.GraphModule:
    """The nodes after ``start`` up to ``end`` as a module from start's tensor to end's."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("x")}

    def value(node: fx.Node) -> fx.Node:
        if node not in env:  # independent of the input: computed again here
            env[node] = graph.node_copy(node, value)
        return env[node]

    for node in nodes[position[start] + 1 : position[end] + 1]:
        if node in dependent:
            env[node] = graph.node_copy(node, value)
    graph.output(env[end])
    graph.lint()
    return fx.GraphModule(root, graph, class_name="Stage")


def _cut_name(node: fx.Node, at: int, module_end: dict[str, int]) -> str:
    """The outermost submodule whose every node lies before the cut, else the node's name."""
    paths = _module_paths(node)
    for path in paths:
        if path and module_end[path] <= at:
            return path
    # Inside a module that goes on after the cut (the addition of a residual
    # block, before its activation): the node within that module.
    return f"{paths[-1]}.{node.name}" if paths else node.name


def _module_paths(node: fx.Node) -> list[str]:
    """The qualified names of the modules ``node`` runs inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [
        str(value[0]) if isinstance(value, tuple) else str(key) for key, value in stack.items()
    ]
    if node.op == "call_module" and str(node.target) not in paths:
        paths.append(str(node.target))
    return paths


def _unique(names: list[str]) -> list[str]:
    """Names kept to ``[A-Za-z0-9._-]`` (they name cache folders and travel on the wire),
    never ``input`` (the split of an image variant), each once."""
    seen: dict[str, int] = {}
    out = []
    for raw in names:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", raw) or "stage"
        if name == "input":
            name = "input_"
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


# -- TorchScript ---------------------------------------------------------------------


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def stages_by_children(
    module: nn.Module, example: torch.Tensor
) -> tuple[list[nn.Module], list[str]]:
    """The module's top-level children as a chain of stages, when they give its answer.

    A child that is an ``nn.Sequential`` counts as its own children. ModelError
    when there are fewer than two, or when the chain does not compute what the
    module computes.
    """
    children = list(_leaf_children(module, ""))
    advice = "give the model as FILE.py:FACTORY instead, so that it can be traced"
    if len(children) < 2:
        raise ModelError(
            f"the TorchScript model has no top-level children to cut between; {advice}"
        )
    stages: list[nn.Module] = []
    x = example
    with torch.inference_mode():
        for name, child in children:
            stage: nn.Module = child
            try:
                y = child(x)
            except Exception as exc:  # user code; a flat-only child (Linear) after a 4-d tensor
                if x.ndim <= 2:
                    raise _no_chain(name, exc, advice) from exc
                stage = nn.Sequential(_Flatten(), child)
                try:
                    y = stage(x)
                except Exception as again:  # user code again: any exception
                    raise _no_chain(name, again, advice) from again
            if not isinstance(y, torch.Tensor):
                raise ModelError(
                    f"child {name} of the TorchScript model returns no tensor; {advice}"
                )
            stages.append(stage)
            x = y
        expected = module(example)
    if not isinstance(expected, torch.Tensor) or expected.shape != x.shape:
        raise ModelError(
            "the top-level children of the TorchScript model do not compute its answer "
            f"(shape {tuple(x.shape)} against {_shape(expected)}); {advice}"
        )
    difference = _difference(x, expected)
    if difference is not None:
        raise ModelError(
            "the top-level children of the TorchScript model do not compute its answer "
            f"(they differ by {difference:.3g}); {advice}"
        )
    return stages, _unique([name for name, _ in children])


def _leaf_children(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if getattr(child, "original_name", type(child).__name__) == "Sequential":
            yield from _leaf_children(child, f"{path}.")
        else:
            yield path, child


def _no_chain(name: str, exc: BaseException, advice: str) -> ModelError:
    return ModelError(
        f"the top-level children of the TorchScript model cannot run one after another "
        f"(child {name}: {describe(exc)}); {advice}"
    )


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


# -- the check -----------------------------------------------------------------------


def _difference(actual: torch.Tensor, expected: torch.Tensor) -> float | None:
    """The largest difference when over the tolerance, else None."""
    scale = max(1.0, float(expected.abs().max()))
    difference = float((actual - expected).abs().max())
    if difference <= SPLIT_TOLERANCE * scale:  # NaN fails this too
        return None
    return difference


def check_stages(
    module: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    stages: list[nn.Module],
    names: list[str],
    input_size: int,
) -> None:
    """Check ``tail(head(x)) == module(x)`` at every split point (ModelError if not).

    ``x`` is a batch of random inputs; each split's head output is computed
    once and the tail run from it, so a model of n stages costs about n/2
    forward passes.
    """
    generator = torch.Generator().manual_seed(CHECK_SEED)
    x = torch.randn(CHECK_BATCH, 3, input_size, input_size, generator=generator)
    with torch.inference_mode():
        expected = module(x)
        middle = x
        for index, name in enumerate(names[:-1]):
            middle = stages[index](middle)
            y = middle
            for stage in stages[index + 1 :]:
                y = stage(y)
            difference = _difference(y, expected)
            if difference is not None:
                raise ModelError(
                    f"split point {name}: tail(head(x)) differs from the model by "
                    f"{difference:.3g} (more than {SPLIT_TOLERANCE:g}); the model may depend on "
                    "more than one tensor at that point"
                )
    log.debug("checked %d split points", len(names) - 1)
