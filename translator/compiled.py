"""``torch.compile`` of the training step: the modes, and a graph pass that joins the linear layers reading one input.

T5's attention projects one input three times (query, key and value; key and value of the encoder's states in every
decoder layer's cross-attention): :class:`JoinSharedInputLinears` makes each such group one matrix product over the
stacked weights, split afterwards, in forward and backward alike. The weights stay separate parameters, so the state
dict is unchanged, and each output is the same dot product as before.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # on a GPU these replay the compiled step as CUDA graphs
LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


def _weight_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The weight node of a bias-free linear call on a node, else None."""
    if node.op != "call_function" or node.target not in LINEAR_TARGETS or len(node.args) < 2:
        return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None or set(node.kwargs) - {"bias"} or not isinstance(node.args[1], torch.fx.Node):
        return None
    return node.args[1]


def _out_features(weight: torch.fx.Node) -> int | None:
    value = weight.meta.get("example_value", weight.meta.get("val"))
    return int(value.shape[0]) if value is not None and value.dim() == 2 else None


class JoinSharedInputLinears(CustomGraphPass):
    """Pre-autograd pass: bias-free ``linear(x, w_i)`` calls on the same ``x`` become ``linear(x, cat(w_i))`` and a split.

    Calls that repeat one ``(x, w)`` pair share one slice. Groups are joined only when every weight's shape is known.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for node in graph.nodes:
            if _weight_of(node) is not None:
                groups.setdefault(node.args[0], []).append(node)
        for x, calls in groups.items():
            weights = list(dict.fromkeys(_weight_of(n) for n in calls))
            sizes = [_out_features(w) for w in weights]
            if len(weights) < 2 or None in sizes:
                continue
            with graph.inserting_before(calls[0]):
                joined = graph.call_function(torch.cat, (weights, 0))
                product = graph.call_function(torch._C._nn.linear, (x, joined))
                parts = graph.call_function(torch.split, (product, sizes, -1))
                slices = {w: graph.call_function(operator.getitem, (parts, i)) for i, w in enumerate(weights)}
            for node in calls:
                node.replace_all_uses_with(slices[_weight_of(node)])
                graph.erase_node(node)
        graph.lint()

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


def compile_options(mode: str) -> dict[str, Any]:
    """Inductor's options of ``torch.compile``'s ``mode`` with :class:`JoinSharedInputLinears` added."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"torch.compile mode {mode!r} is unknown; choose one of {', '.join(COMPILE_MODES)}")
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode), "pre_grad_custom_pass": JoinSharedInputLinears()}
