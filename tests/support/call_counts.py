"""Counting what one fused call launches: the extension's `litefpn::_*` ops (kernels, or passes
that run one) and the other ATen ops run around them (the [C]-sized glue), from torch.profiler's
CPU events. On a GPU each of them is a launch; on a CPU each costs a dispatch."""
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile


#: profiler events that count as ops: ATen's, the extension's, and Triton launches recorded as
#: "triton::<kernel>" (tests wrap the launches in torch.profiler.record_function)
OP_PREFIXES = ("aten::", "litefpn::", "triton::")

#: ATen ops that launch nothing on a GPU: allocations and views
NO_LAUNCH = frozenset(f"aten::{n}" for n in (
    "empty", "empty_like", "empty_strided", "new_empty", "view", "reshape", "_reshape_alias",
    "as_strided", "t", "transpose", "permute", "slice", "select", "unsqueeze", "expand",
    "detach", "alias"))


def top_level_calls(fn):
    """-> Counter of op names that `fn()` dispatched at the top level: an aten::, litefpn:: or
    triton:: event with no such event above it (what an op runs inside itself is its own
    business)."""
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
    return name.startswith(OP_PREFIXES)


def split(calls):
    """-> (extension op calls, other ATen calls) of a `top_level_calls` Counter."""
    kernels = sum(n for name, n in calls.items() if name.startswith("litefpn::_"))
    return kernels, sum(calls.values()) - kernels


def gpu_launches(calls):
    """The kernel launches a GPU would make for a `top_level_calls` Counter."""
    return sum(n for name, n in calls.items() if name not in NO_LAUNCH)
