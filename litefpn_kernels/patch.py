"""Patch an existing eager LiteFPN (the `LiteFPN` of TomokotoKiyoshi/Sider_CAPTCHA_Solver,
`src/models/stage5_lite_fpn.py`, the one public eager implementation of this spec) with this
library's fused module, in place, and back.

    from litefpn_kernels.patch import apply_litefpn_kernels
    handle = apply_litefpn_kernels(model, backend="auto")   # every such neck inside `model`
    ...                                                     # train / serve as before
    handle.revert()                                         # the original modules again

The client's neck is found by structure and names (never by importing that project): children
`lateral_1_32/1_16/1_8/1_4`, `smooth_p5`, `fuse_1_16/1_8/1_4` (each with `.smooth` and, per
`fusion_type`, `weight_a`/`weight_b` or the SE `fc1`/`fc2`), each a Conv-BN-Act with
`.conv`/`.bn`/`.act`. Its replacement, a `PatchedLiteFPN` (a `LiteFPN`), **shares** the client's
`nn.Conv2d`, `nn.BatchNorm2d` and fusion-weight `nn.Parameter` objects instead of copying them:
an optimizer built before patching keeps training the same tensors, BatchNorm running statistics
land in the client's buffers, and `revert()` needs no copy back. It returns the client's format
(`hf`, or `(hf, [p3_td, p4_td, p5])` with `return_pyramid=True`) and its state_dict uses the
client's keys, so checkpoints stay interchangeable.

To load such a checkpoint into a plain `LiteFPN` instead: `client_state_dict_to_litefpn`
(key table `CLIENT_KEY_PREFIXES`, also in the README).
"""
import dataclasses
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .nn.lite_fpn import LiteFPN

#: (client key prefix, LiteFPN key prefix): the whole key mapping; a state_dict key maps by its
#: first matching prefix (the more specific ones come first).
CLIENT_KEY_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("lateral_1_32.", "l5."), ("lateral_1_16.", "l4."), ("lateral_1_8.", "l3."),
    ("lateral_1_4.", "l2."), ("smooth_p5.", "s5."),
    ("fuse_1_16.smooth.", "s4."), ("fuse_1_8.smooth.", "s3."), ("fuse_1_4.smooth.", "s2."),
    ("fuse_1_16.fc1.", "fuse4.gate.fc1."), ("fuse_1_16.fc2.", "fuse4.gate.fc2."),
    ("fuse_1_8.fc1.", "fuse3.gate.fc1."), ("fuse_1_8.fc2.", "fuse3.gate.fc2."),
    ("fuse_1_4.fc1.", "fuse2.gate.fc1."), ("fuse_1_4.fc2.", "fuse2.gate.fc2."),
    ("fuse_1_16.weight_", "fuse4.weight_"), ("fuse_1_8.weight_", "fuse3.weight_"),
    ("fuse_1_4.weight_", "fuse2.weight_"),
)

#: client fusion_type -> LiteFPN (fuse, gate). "attention" is the SE gate on both inputs
#: followed by a plain add (the client has no weights in that mode).
FUSION_TYPES = {"add": ("add", None), "weighted": ("weighted", None), "attention": ("add", "se")}

#: (client ConvBNAct, LiteFPN ConvBN, kernel size, SiLU?)
_CONVS = (("lateral_1_32", "l5", 1, False), ("lateral_1_16", "l4", 1, False),
          ("lateral_1_8", "l3", 1, False), ("lateral_1_4", "l2", 1, False),
          ("smooth_p5", "s5", 3, True), ("fuse_1_16.smooth", "s4", 3, True),
          ("fuse_1_8.smooth", "s3", 3, True), ("fuse_1_4.smooth", "s2", 3, True))
#: (client FusionModule, LiteFPN Fuse); the argument order (A, B) is the same in both.
_FUSES = (("fuse_1_16", "fuse4"), ("fuse_1_8", "fuse3"), ("fuse_1_4", "fuse2"))


def _map_key(key: str, table) -> Optional[str]:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def client_state_dict_to_litefpn(state_dict: Dict[str, torch.Tensor], prefix: str = ""
                                 ) -> Dict[str, torch.Tensor]:
    """The client's neck state_dict with LiteFPN keys (`CLIENT_KEY_PREFIXES`), for
    `LiteFPN(...).load_state_dict(...)`. `prefix`: the neck's prefix in a whole-model checkpoint
    (e.g. "neck."); only keys under it are taken. Raises KeyError on a key the table lacks."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        mapped = _map_key(key[len(prefix):], CLIENT_KEY_PREFIXES)
        if mapped is None:
            raise KeyError(f"{key!r} is not a key of the client's LiteFPN")
        out[mapped] = value
    return out


def litefpn_state_dict_to_client(state_dict: Dict[str, torch.Tensor], prefix: str = ""
                                 ) -> Dict[str, torch.Tensor]:
    """The inverse of `client_state_dict_to_litefpn` (keys get `prefix` prepended)."""
    table = tuple((dst, src) for src, dst in CLIENT_KEY_PREFIXES)
    out = {}
    for key, value in state_dict.items():
        mapped = _map_key(key, table)
        if mapped is None:
            raise KeyError(f"{key!r} has no counterpart in the client's LiteFPN")
        out[prefix + mapped] = value
    return out


def client_config(client: nn.Module) -> dict:
    """LiteFPN constructor arguments equivalent to a client neck (raises ValueError if it is
    not one this library computes exactly; see `incompatibility`)."""
    reason = incompatibility(client)
    if reason is not None:
        raise ValueError(reason)
    fuse, gate = FUSION_TYPES[client.fusion_type]
    in_channels = tuple(client.get_submodule(name).conv.in_channels
                        for name in ("lateral_1_4", "lateral_1_8", "lateral_1_16", "lateral_1_32"))
    return dict(in_channels=in_channels, channels=client.smooth_p5.conv.out_channels, fuse=fuse,
                gate=gate)


def looks_like_client_litefpn(m: nn.Module) -> bool:
    """The client's structure: its child names, each Conv-BN-Act with .conv/.bn/.act."""
    try:
        return (all(isinstance(getattr(m.get_submodule(name), "conv", None), nn.Conv2d)
                    and hasattr(m.get_submodule(name), "bn") and hasattr(m.get_submodule(name), "act")
                    for name, *_ in _CONVS)
                and isinstance(getattr(m, "fusion_type", None), str))
    except AttributeError:
        return False


def incompatibility(m: nn.Module) -> Optional[str]:
    """None if the client neck `m` maps exactly onto LiteFPN, else why not (a variant this
    library's module does not compute: other activations, a conv with bias, ...)."""
    if not looks_like_client_litefpn(m):
        return "not a LiteFPN of the client's structure"
    if m.fusion_type not in FUSION_TYPES:
        return f"fusion_type {m.fusion_type!r} is not one of {sorted(FUSION_TYPES)}"
    channels = m.smooth_p5.conv.out_channels
    for name, _, k, silu in _CONVS:
        cba = m.get_submodule(name)
        conv, bn = cba.conv, cba.bn
        in_ok = name.startswith("lateral") or conv.in_channels == channels
        if (conv.kernel_size != (k, k) or conv.stride != (1, 1) or conv.dilation != (1, 1)
                or conv.padding != (k // 2, k // 2) or conv.groups != 1
                or conv.padding_mode != "zeros" or conv.out_channels != channels or not in_ok):
            return f"{name}.conv is not a {k}x{k}, stride-1, ungrouped {channels}-channel conv"
        if conv.bias is not None:
            return f"{name}.conv has a bias (LiteFPN's convs have none)"
        # exactly nn.BatchNorm2d: SyncBatchNorm and other norms are other computations
        if type(bn) is not nn.BatchNorm2d or not bn.affine or bn.num_features != channels:
            return f"{name}.bn is not an affine nn.BatchNorm2d of {channels} channels"
        if not isinstance(cba.act, nn.SiLU if silu else nn.Identity):
            want = "nn.SiLU" if silu else "nn.Identity"
            return f"{name}.act is {type(cba.act).__name__}, expected {want}"
    for name, _ in _FUSES:
        f = m.get_submodule(name)
        if m.fusion_type == "weighted":
            if not all(isinstance(getattr(f, w, None), nn.Parameter)
                       and getattr(f, w).shape == (1,) for w in ("weight_a", "weight_b")):
                return f"{name}: weight_a / weight_b are not [1] parameters"
        if m.fusion_type == "attention":
            fc1, fc2 = getattr(f, "fc1", None), getattr(f, "fc2", None)
            hidden = max(channels // 4, 1)
            if not (isinstance(fc1, nn.Conv2d) and isinstance(fc2, nn.Conv2d)
                    and fc1.kernel_size == (1, 1) and fc2.kernel_size == (1, 1)
                    and fc1.bias is not None and fc2.bias is not None
                    and (fc1.in_channels, fc1.out_channels) == (2 * channels, hidden)
                    and (fc2.in_channels, fc2.out_channels) == (hidden, 2 * channels)):
                return f"{name}: fc1 / fc2 are not the SE gate's 1x1 convs 2C->C/4->2C with bias"
    return None


class PatchedLiteFPN(LiteFPN):
    """This library's LiteFPN standing in for a client neck: it shares the client's conv, BN and
    fusion-weight objects, returns the client's output format and uses its state_dict keys."""

    def __init__(self, client: nn.Module, backend: str = "auto"):
        # built on the meta device: no allocation, no use of the global RNG (patching must not
        # change a seeded run), and every tensor is then replaced by the client's own
        with torch.device("meta"):
            super().__init__(**client_config(client), backend=backend)
        self.fpn_channels, self.fusion_type = client.fpn_channels, client.fusion_type
        self.return_pyramid = client.return_pyramid
        for theirs, name, ours, our_name in self._shared_slots(client):
            setattr(ours, our_name, getattr(theirs, name))
        if client.fusion_type == "weighted":
            for src, dst in _FUSES:
                self.get_submodule(dst).eps = float(client.get_submodule(src).epsilon)
        # the client's key order, for state_dict() (a checkpoint diff then shows no reordering)
        self._client_key_order = {k: i for i, k in enumerate(client.state_dict(keep_vars=True))}
        left = [n for n, t in self.state_dict(keep_vars=True).items() if t.is_meta]
        assert not left, f"not taken from the client: {left}"
        self.train(client.training)
        self.register_state_dict_post_hook(PatchedLiteFPN._client_keys)
        self.register_load_state_dict_pre_hook(PatchedLiteFPN._our_keys)

    def forward(self, features):
        # the client indexes features[0..3] (a longer list is accepted there too)
        out = super().forward([features[0], features[1], features[2], features[3]])
        if self.return_pyramid:
            return out.hf, [out.p3_td, out.p4_td, out.p5]
        return out.hf

    def write_back(self, client: nn.Module):
        """Put this module's current conv / BN / weight objects into `client` (the same objects
        unless something replaced them since, e.g. a SyncBatchNorm conversion), and its mode."""
        for theirs, name, ours, our_name in self._shared_slots(client):
            setattr(theirs, name, getattr(ours, our_name))
        client.train(self.training)

    def _shared_slots(self, client: nn.Module):
        """(client module, attribute, our module, attribute) of every object the two share: each
        level's conv and BN, and the fusion weights or the attention gate's layers."""
        for src, dst, _, _ in _CONVS:
            theirs, ours = client.get_submodule(src), self.get_submodule(dst)
            yield from ((theirs, "conv", ours, "conv"), (theirs, "bn", ours, "bn"))
        for src, dst in _FUSES:
            theirs, ours = client.get_submodule(src), self.get_submodule(dst)
            if self.fusion_type == "weighted":
                yield from ((theirs, "weight_a", ours, "weight_a"),
                            (theirs, "weight_b", ours, "weight_b"))
            elif self.fusion_type == "attention":
                yield from ((theirs, "fc1", ours.gate, "fc1"), (theirs, "fc2", ours.gate, "fc2"))

    @staticmethod
    def _client_keys(module, state_dict, prefix, local_metadata):
        # this module's keys are the last ones written: re-inserted in the client's order
        table = tuple((dst, src) for src, dst in CLIENT_KEY_PREFIXES)
        items = []
        for k in [k for k in state_dict if k.startswith(prefix)]:
            mapped = _map_key(k[len(prefix):], table)
            items.append((mapped or k[len(prefix):], state_dict.pop(k)))
        order = module._client_key_order
        for k, v in sorted(items, key=lambda kv: order.get(kv[0], len(order))):
            state_dict[prefix + k] = v

    @staticmethod
    def _our_keys(module, state_dict, prefix, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs):
        for k in [k for k in state_dict if k.startswith(prefix)]:
            mapped = _map_key(k[len(prefix):], CLIENT_KEY_PREFIXES)
            if mapped is not None:
                state_dict[prefix + mapped] = state_dict.pop(k)


@dataclasses.dataclass
class PatchHandle:
    """What `apply_litefpn_kernels` did. `model`: the patched model (the replacement itself when
    the model passed in was a client neck); `patched`: the qualified names replaced; `skipped`:
    (name, reason) of client-shaped necks left alone."""
    model: nn.Module
    patched: List[str]
    skipped: List[Tuple[str, str]]
    _swaps: list = dataclasses.field(default_factory=list, repr=False)

    def revert(self) -> nn.Module:
        """Put the original modules back (with the current weights, which they share) and
        return the original model."""
        model = self.model
        for parent, name, original, replacement in reversed(self._swaps):
            replacement.write_back(original)
            if parent is None:
                model = original
            else:
                setattr(parent, name, original)
        self._swaps.clear()
        self.model = model
        return model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.revert()


def apply_litefpn_kernels(model: nn.Module, backend: str = "auto") -> PatchHandle:
    """Replace, in place, every client LiteFPN inside `model` (`model` itself included) with a
    `PatchedLiteFPN` on `backend` sharing its weights and buffers. Client-shaped necks this
    library would not compute exactly are left alone, with a warning and their reason in
    `handle.skipped`. Returns a `PatchHandle`; `handle.revert()` undoes it."""
    found = [(name, m) for name, m in model.named_modules() if looks_like_client_litefpn(m)]
    swaps, patched, skipped = [], [], []
    for name, m in found:
        reason = incompatibility(m)
        if reason is not None:
            skipped.append((name, reason))
            warnings.warn(f"litefpn_kernels.patch: {name or 'the model'} left as it is: {reason}")
            continue
        new = PatchedLiteFPN(m, backend=backend)
        if name == "":
            swaps.append((None, "", m, new))
            model = new
        else:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, new)
            swaps.append((parent, child, m, new))
        patched.append(name)
    return PatchHandle(model, patched, skipped, swaps)


__all__ = ["CLIENT_KEY_PREFIXES", "FUSION_TYPES", "PatchHandle", "PatchedLiteFPN",
           "apply_litefpn_kernels", "client_config", "client_state_dict_to_litefpn",
           "incompatibility", "litefpn_state_dict_to_client", "looks_like_client_litefpn"]
