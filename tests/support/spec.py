"""The spec, written out independently of the package, for the tests to compare against.

Everything here is spelled from DESIGN.md section 1 with primitive ops: Up2 from its per-axis
formula (not F.interpolate), BatchNorm from its formula (batch statistics with the biased
variance, running statistics with the unbiased one), softplus as log1p(exp(x)) below the
threshold, SiLU as x*sigmoid(x). It reads the parameters by their state_dict names, so a test
also proves the module's naming.
"""
import torch
import torch.nn.functional as F

BN_EPS, BN_MOMENTUM, FUSE_EPS = 1e-5, 0.1, 1e-4


def up2_axis(x, dim):
    """One axis of Up2: out[2i] = .25 x[max(i-1,0)] + .75 x[i]; out[2i+1] = .75 x[i] + .25 x[min(i+1,n-1)]."""
    n = x.shape[dim]
    i = torch.arange(n, device=x.device)
    prev = x.index_select(dim, (i - 1).clamp(min=0))
    nxt = x.index_select(dim, (i + 1).clamp(max=n - 1))
    even = 0.25 * prev + 0.75 * x
    odd = 0.75 * x + 0.25 * nxt
    out = torch.stack([even, odd], dim=dim + 1)
    shape = list(x.shape)
    shape[dim] = 2 * n
    return out.reshape(shape)


def up2(x):
    return up2_axis(up2_axis(x, 2), 3)


def softplus(x):
    return torch.where(x > 20, x, torch.log1p(torch.exp(torch.clamp(x, max=20))))


def batch_norm(x, sd, prefix, training, new_sd):
    """BN with the spec's semantics; in training, writes the updated running stats to new_sd."""
    w, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
    if training:
        n = x.numel() // x.shape[1]
        mean = x.mean((0, 2, 3))
        var_biased = ((x - mean[None, :, None, None]) ** 2).mean((0, 2, 3))
        var_unbiased = var_biased * n / (n - 1)
        new_sd[prefix + ".running_mean"] = ((1 - BN_MOMENTUM) * sd[prefix + ".running_mean"]
                                            + BN_MOMENTUM * mean.detach())
        new_sd[prefix + ".running_var"] = ((1 - BN_MOMENTUM) * sd[prefix + ".running_var"]
                                           + BN_MOMENTUM * var_unbiased.detach())
        new_sd[prefix + ".num_batches_tracked"] = sd[prefix + ".num_batches_tracked"] + 1
    else:
        mean, var_biased = sd[prefix + ".running_mean"], sd[prefix + ".running_var"]
    inv = 1.0 / torch.sqrt(var_biased + BN_EPS)
    return (x - mean[None, :, None, None]) * (w * inv)[None, :, None, None] + b[None, :, None, None]


def conv_bn(x, sd, prefix, training, new_sd, act=False, stride=1, groups=1):
    w = sd[prefix + ".conv.weight"]
    y = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)
    y = batch_norm(y, sd, prefix + ".bn", training, new_sd)
    return y * torch.sigmoid(y) if act else y


def se_gate(a, b, sd, prefix):
    pooled = torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1)[:, :, None, None]
    h = F.conv2d(pooled, sd[prefix + ".fc1.weight"], sd[prefix + ".fc1.bias"]).clamp(min=0)
    g = torch.sigmoid(F.conv2d(h, sd[prefix + ".fc2.weight"], sd[prefix + ".fc2.bias"]))
    c = a.shape[1]
    return a * g[:, :c], b * g[:, c:]


def coord_att(x, sd, prefix, training, new_sd):
    h, w = x.shape[2:]
    y = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], 2)
    y = F.conv2d(y, sd[prefix + ".conv1.weight"], sd[prefix + ".conv1.bias"])
    y = batch_norm(y, sd, prefix + ".bn1", training, new_sd)
    y = y * (y + 3).clamp(0, 6) / 6  # h-swish
    y_h, y_w = y[:, :, :h], y[:, :, h:].transpose(2, 3)
    a_h = torch.sigmoid(F.conv2d(y_h, sd[prefix + ".conv_h.weight"], sd[prefix + ".conv_h.bias"]))
    a_w = torch.sigmoid(F.conv2d(y_w, sd[prefix + ".conv_w.weight"], sd[prefix + ".conv_w.bias"]))
    return x * a_h * a_w


def fuse(a, b, sd, prefix, opts, training, new_sd):
    if opts["gate"] == "se":
        a, b = se_gate(a, b, sd, prefix + ".gate")
    elif opts["gate"] == "coord":
        a = coord_att(a, sd, prefix + ".gate.a", training, new_sd)
        b = coord_att(b, sd, prefix + ".gate.b", training, new_sd)
    if opts["fuse"] == "weighted":
        sa, sb = softplus(sd[prefix + ".weight_a"]), softplus(sd[prefix + ".weight_b"])
        return sa / (sa + sb + FUSE_EPS) * a + sb / (sa + sb + FUSE_EPS) * b
    return a + b


def down(x, sd, prefix, opts, training, new_sd):
    if opts["anti_alias"]:
        k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
        blur = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=x.shape[1])
    if opts["down"] == "dwconv":
        return conv_bn(x, sd, prefix + ".sample", training, new_sd, stride=2, groups=x.shape[1])
    return F.avg_pool2d(x, 2)


def litefpn(feats, sd, opts, training):
    """The whole neck from a state_dict. Returns (outputs, state_dict after the step)."""
    new_sd = dict(sd)
    b1, b2, b3, b4 = feats
    cb = lambda x, p, act=False: conv_bn(x, sd, p, training, new_sd, act=act)  # noqa: E731
    fz = lambda a, b, p: fuse(a, b, sd, p, opts, training, new_sd)  # noqa: E731
    p5 = cb(b4, "l5")
    p5s = cb(p5, "s5", act=True)
    p4_td = cb(fz(up2(p5s), cb(b3, "l4"), "fuse4"), "s4", act=True)
    p3_td = cb(fz(up2(p4_td), cb(b2, "l3"), "fuse3"), "s3", act=True)
    hr, u3 = cb(b1, "l2"), up2(p3_td)
    if opts["hr_fusion"] == "add":
        hf = cb(fz(hr, u3, "fuse2"), "s2", act=True)
    else:
        hf = cb(torch.cat([hr, u3], 1), "s2", act=True)
    outs = [hf, p3_td, p4_td, p5]
    if opts["pan"]:
        n3 = cb(fz(down(hf, sd, "down3", opts, training, new_sd), p3_td, "pan_fuse3"), "pan_s3", True)
        n4 = cb(fz(down(n3, sd, "down4", opts, training, new_sd), p4_td, "pan_fuse4"), "pan_s4", True)
        n5 = cb(fz(down(n4, sd, "down5", opts, training, new_sd), p5, "pan_fuse5"), "pan_s5", True)
        outs += [n3, n4, n5]
    return outs, new_sd


DEFAULT_OPTS = dict(fuse="add", gate=None, hr_fusion="add", pan=False, down="dwconv",
                    anti_alias=False)
