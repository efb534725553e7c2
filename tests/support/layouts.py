"""Test tensors in every memory layout the kernels must take: one copy for all tests, importing
only torch (the CUDA-emulation sanitizer runs import it without the package)."""
import torch


def layout(t, kind):
    """t's values (on t's device) in layout `kind`, the one copy every test uses:
    "contiguous", "channels_last"; "strided": every other column of a wider buffer with the
    channels permuted (no unit stride at all); "cl_sliced": every other column of a
    channels_last buffer (unit channel stride, pixels two apart); "offset" /
    "channels_last_offset": that dense format at storage offset 1 (misaligned for every vector
    width)."""
    n, c, h, w = t.shape
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.zeros(n, h, c, 2 * w, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t.permute(0, 2, 1, 3)
        view = wide.permute(0, 2, 1, 3)[..., ::2]
    elif kind == "cl_sliced":
        wide = torch.zeros(n, c, h, 2 * w, dtype=t.dtype, device=t.device).contiguous(
            memory_format=torch.channels_last)
        wide[..., ::2] = t
        view = wide[..., ::2]
    elif kind in ("offset", "channels_last_offset"):
        dense = layout(t, "channels_last" if kind == "channels_last_offset" else "contiguous")
        buf = torch.empty(dense.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].as_strided(dense.shape, dense.stride())
        view.copy_(dense)
        assert view.storage_offset() == 1
        return view
    elif kind == "contiguous":
        return t.contiguous()
    else:
        raise ValueError(f"unknown layout kind {kind!r}")
    # (a one-column tensor may still count as contiguous: its column stride is ignored)
    assert torch.equal(view, t) and (w == 1 or not view.is_contiguous())
    return view
