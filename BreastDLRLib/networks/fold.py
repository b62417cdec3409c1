"""Fold batch normalisation into the convolution before it, for inference.

In eval mode a ``BatchNorm2d`` is an affine map per channel, so it can be merged into the weights and bias of the
convolution that feeds it (and only it).  The result computes the same function up to float rounding, with one
pass over memory less per folded pair.  On the shipped segmenter (58 batch norms folded; a 59th, after the
encoder's unused head, is never called and is dropped) 16 slices of 128×128 took 0.26 s instead of 0.30 s on
2 CPU threads (measured 2026-12-03, see README Benchmarks).  Training never uses this: the folded network has
no batch statistics left to learn.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn

log = logging.getLogger(__name__)


class _ConvLeafTracer(torch.fx.Tracer):
    """Keeps every convolution (subclasses too, such as EfficientNet's "same"-padding convolution) as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` (in eval mode) with every ``BatchNorm2d`` that reads only the output of a
    ``Conv2d`` merged into that convolution; ``model`` itself is not changed.

    Networks that ``torch.fx`` cannot trace (control flow on tensor values) and networks without such a pair
    come back unchanged (the same object); the function never changes what a network computes beyond rounding.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm is for inference: call model.eval() first")
    work = copy.deepcopy(model)
    try:
        graph = _ConvLeafTracer().trace(work)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: keep the network as it is
        log.debug("batch norm not folded, %s cannot be traced: %s", type(model).__name__, exc)
        return model
    gm = torch.fx.GraphModule(work, graph)
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        if (len(node.args) != 1 or node.kwargs or not isinstance(src, torch.fx.Node) or src.op != "call_module"
                or not isinstance(modules.get(src.target), nn.Conv2d) or len(src.users) != 1
                or not bn.track_running_stats or bn.running_mean is None):
            continue
        conv = modules[src.target]
        parent, _, name = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if not folded:
        return model
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
