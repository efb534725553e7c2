"""Counting what one fused call launches: the extension's `litefpn::_*` ops (kernels, or passes
that run one) and the other ATen ops run around them (the [C]-sized glue), from torch.profiler's
CPU events. On a GPU each of them is a launch; on a CPU each costs a dispatch."""
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile


def top_level_calls(fn):
    """-> Counter of op names that `fn()` dispatched at the top level: an aten:: or litefpn::
    event with no such event above it (what an op runs inside itself is its own business)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    calls = Counter()
    for e in prof.events():
        if not _is_op(e.name):
            continue
        parent = e.cpu_parent
        while parent is not None and not _is_op(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            calls[e.name] += 1
    return calls


def _is_op(name):
    return name.startswith(("aten::", "litefpn::"))


def split(calls):
    """-> (extension op calls, other ATen calls) of a `top_level_calls` Counter."""
    kernels = sum(n for name, n in calls.items() if name.startswith("litefpn::_"))
    return kernels, sum(calls.values()) - kernels
