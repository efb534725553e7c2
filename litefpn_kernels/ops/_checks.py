"""Argument validation of the operators, one copy, with errors that name the argument.

Each operator validates once per call: inside its custom op (the fused backends; so a direct
`torch.ops.litefpn.<op>` call is checked too) or, for backend="eager", in the public function.
The forward ops' fakes run the same checks (torch.compile and the Meta device then raise the same
errors as a real call); the backward ops' fakes, which only the ops' own autograd calls, check
their shapes with `torch._check` (`fake_*` below).
"""
import torch
from torch import Tensor

#: activation dtypes the fused kernels take (float64 is for gradcheck: CPU and the interpreter).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def device_of(name, t):
    """t.device, after checking that t is a tensor (the backend is resolved from it)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t.device


def four_d(name, t):
    device_of(name, t)
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [N, C, H, W] tensor, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}")


def same_device_dtype(name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def up2_pair(coarse_name, coarse, fine_name, fine, same_channels=True):
    """`fine` must be exactly twice `coarse` spatially, with the same batch (and channels)."""
    four_d(coarse_name, coarse)
    four_d(fine_name, fine)
    same_device_dtype(fine_name, fine, coarse_name, coarse)
    n, c, h, w = coarse.shape
    if fine.shape[0] != n:
        raise ValueError(f"{fine_name} has batch {fine.shape[0]} but {coarse_name} has batch {n}")
    if same_channels and fine.shape[1] != c:
        raise ValueError(f"{fine_name} has {fine.shape[1]} channels but {coarse_name} has {c}")
    if tuple(fine.shape[2:]) != (2 * h, 2 * w):
        raise ValueError(f"{fine_name} must be exactly 2x {coarse_name} spatially: expected "
                         f"{(2 * h, 2 * w)} for {coarse_name} {(h, w)}, got {tuple(fine.shape[2:])}")


def small_param(name, t, shape, expected, ref_name, ref):
    """A small floating-point operand (fusion weight, gate, BN vector) of `shape`, on ref's
    device; `expected` says the shape in the error message."""
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must {expected}, got {got}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def non_negative(name, value):
    if not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def fusion_params(ref_name, ref, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    if (w_coarse is None) != (w_fine is None):
        raise ValueError("w_coarse and w_fine must be given together (weighted fusion) or both "
                         "be None (plain add)")
    for name, w in (("w_coarse", w_coarse), ("w_fine", w_fine)):
        if w is not None:
            small_param(name, w, (1,), "be a tensor of shape [1]", ref_name, ref)
    expected = (ref.shape[0], ref.shape[1])
    for name, g in (("gate_coarse", gate_coarse), ("gate_fine", gate_fine)):
        if g is not None:
            small_param(name, g, expected, f"have shape [N, C] = {list(expected)}", ref_name, ref)
    non_negative("eps", eps)


def training_flag(training):
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")


def momentum_value(momentum):
    if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


def batch_norm_args(c, ref_name, ref, bn_weight, bn_bias, running_mean, running_var, training,
                    bn_eps):
    """F.batch_norm's tensor arguments (and training, bn_eps) for a map `ref` whose BatchNorm
    has `c` channels; momentum is checked apart (`momentum_value`): not every op receives it."""
    per_channel = f"have shape [{c}] (one value per channel)"
    small_param("bn_weight", bn_weight, (c,), per_channel, ref_name, ref)
    small_param("bn_bias", bn_bias, (c,), per_channel, ref_name, ref)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None: "
                         "no running statistics)")
    if running_mean is not None:
        small_param("running_mean", running_mean, (c,), per_channel, ref_name, ref)
        small_param("running_var", running_var, (c,), per_channel, ref_name, ref)
    training_flag(training)
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var (eval BatchNorm "
                         "normalises with the running statistics)")
    bn_eps_value(bn_eps, training)


def bn_eps_value(bn_eps, training):
    """F.batch_norm's own checks and messages: eps > 0 in training (1/sqrt(var + eps) of a
    constant channel would be Inf), eps >= 0 in eval."""
    if not isinstance(bn_eps, (int, float)):
        raise TypeError(f"bn_eps must be a number, got {type(bn_eps).__name__}")
    if training and not bn_eps > 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn_eps}")
    if not bn_eps >= 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {bn_eps}")


# ----------------------------------------------------------------------------- per operator
def up2_fuse(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    up2_pair("coarse", coarse, "fine", fine)
    fusion_params("coarse", coarse, w_coarse, w_fine, gate_coarse, gate_fine, eps)


def lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                     training, momentum, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    up2_pair("coarse", coarse, "z", z, same_channels=False)
    c, c_in = coarse.shape[1], z.shape[1]
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4 or \
            tuple(conv_weight.shape[2:]) != (1, 1):
        got = tuple(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight)
        raise ValueError(f"conv_weight must be a 1x1 convolution weight [C, Cin, 1, 1], got {got}")
    if conv_weight.shape[0] != c:
        raise ValueError(f"conv_weight has {conv_weight.shape[0]} output channels but coarse has "
                         f"{c} channels")
    if conv_weight.shape[1] != c_in:
        raise ValueError(f"conv_weight has Cin={conv_weight.shape[1]} but z has {c_in} channels")
    if not conv_weight.is_floating_point() or conv_weight.device != z.device:
        raise ValueError(f"conv_weight must be a floating point tensor on {z.device}, got "
                         f"{conv_weight.dtype} on {conv_weight.device}")
    batch_norm_args(c, "z", z, bn_weight, bn_bias, running_mean, running_var, training, bn_eps)
    if momentum is not None:  # None: the op that normalises does not take it
        momentum_value(momentum)
    fusion_params("coarse", coarse, w_coarse, w_fine, gate_coarse, gate_fine, eps)
    # (z is 2x coarse spatially, so a non-empty batch has >= 4 values per channel: F.batch_norm's
    # "more than 1 value per channel when training" cannot arise.)


def bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps, synced=False):
    """`synced`: the batch statistics are the global batch's (a process group), so one value
    per channel on this rank is fine, as in nn.SyncBatchNorm."""
    four_d("x", x)
    batch_norm_args(x.shape[1], "x", x, bn_weight, bn_bias, running_mean, running_var, training,
                    bn_eps)
    if training and not synced and x.numel() > 0 and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(x.shape)}")  # F.batch_norm's own check


# ----------------------------------------------------------------------------- fakes
def fake_up2_pair(coarse, fine, same_channels=True):
    """torch._check form of `up2_pair` for the fake kernels (shapes may be symbolic)."""
    torch._check(coarse.dim() == 4 and fine.dim() == 4,
                 lambda: f"expected 4-D tensors, got {coarse.dim()}-D and {fine.dim()}-D")
    torch._check(fine.dtype == coarse.dtype, lambda: f"dtype {fine.dtype} != {coarse.dtype}")
    torch._check(fine.shape[0] == coarse.shape[0], lambda: "batch sizes differ")
    if same_channels:
        torch._check(fine.shape[1] == coarse.shape[1], lambda: "channel counts differ")
    torch._check(fine.shape[2] == 2 * coarse.shape[2] and fine.shape[3] == 2 * coarse.shape[3],
                 lambda: f"fine {tuple(fine.shape[2:])} must be exactly 2x coarse "
                         f"{tuple(coarse.shape[2:])} spatially")


def fake_vector(name, t, length):
    if t is not None:
        torch._check(t.dim() == 1 and t.shape[0] == length,
                     lambda: f"{name} must have shape [{length}], got {tuple(t.shape)}")
