"""A CPU model's weights in 2 MiB pages (Linux transparent huge pages).

A one-token step reads every weight once. In 4 KiB pages that read misses the TLB every 4 KiB (65k page walks a bf16
token of SmolLM2-135M), and no weight gets huge pages by itself where the kernel's policy is "madvise", the usual
default: torch's allocator does not ask, and most weights are under 2 MiB anyway. So load_model moves the weights into
one anonymous mapping advised MADV_HUGEPAGE, each tensor 64-byte aligned within it (BENCHMARKS.md has the figures).
Every tensor keeps a storage of its own over its part of the mapping (torch.frombuffer), so a saved state dict
(torch.save, safetensors) holds each tensor alone, as before. FLEXFAST_HUGE_PAGES=0 turns it off; off Linux, or where
the kernel's policy is "never", nothing moves.
"""
import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64
POLICY = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROCESS_STATUS = Path("/proc/self/status")


def available() -> bool:
    """Linux with THP, not "never" system-wide, not turned off for this process (prctl PR_SET_THP_DISABLE, which
    some containers set: /proc/self/status says THP_enabled: 0), nor by FLEXFAST_HUGE_PAGES=0."""
    if os.environ.get("FLEXFAST_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        if not hasattr(mmap, "MADV_HUGEPAGE") or "[never]" in POLICY.read_text():
            return False
        return not any(line.split() == ["THP_enabled:", "0"] for line in PROCESS_STATUS.read_text().splitlines())
    except OSError:
        return False


def huge_page_area(nbytes: int) -> tuple:
    """(an anonymous mapping advised MADV_HUGEPAGE, the offset of its first 2 MiB boundary), with nbytes of room from
    that offset, rounded up to whole huge pages. No page is touched yet: the first write into each 2 MiB of it takes
    a huge page."""
    # private: a shared anonymous mapping is shmem, which takes huge pages only under another policy (shmem_enabled)
    area = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    address = torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr()
    return area, -address % HUGE_PAGE


def empty(numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialized 1-D tensor of numel elements in huge pages where available(), else torch.empty's."""
    if numel == 0 or not available():
        return torch.empty(numel, dtype=dtype)
    area, start = huge_page_area(numel * dtype.itemsize)
    return torch.frombuffer(area, dtype=dtype, count=numel, offset=start)


def move_weights(model: nn.Module) -> int:
    """Moves every CPU parameter and buffer of model into one huge-page area (a tensor that several modules share,
    as tied embeddings do, stays shared; two tensors that are views of one storage would become two copies). Each
    old tensor is let go once its copy is in place, so the move needs
    the model's memory and one tensor more, not twice the model's. Returns the bytes moved; 0 where not
    available()."""
    owners = {}  # id(tensor) -> (tensor, [(module, name, is_parameter)])
    for module in model.modules():
        for is_parameter, tensors in ((True, module._parameters), (False, module._buffers)):
            for name, t in tensors.items():
                if t is not None and t.device.type == "cpu" and t.numel() > 0:
                    owners.setdefault(id(t), (t, []))[1].append((module, name, is_parameter))
    if not owners or not available():
        return 0
    moves = list(owners.values())
    del owners
    sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t, _ in moves]
    area, offset = huge_page_area(sum(sizes))
    for i, size in enumerate(sizes):
        t, places = moves[i]
        moves[i] = None
        moved = torch.frombuffer(area, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
        moved.copy_(t)
        if isinstance(t, nn.Parameter):
            moved = nn.Parameter(moved, requires_grad=t.requires_grad)  # one object, as the modules shared one
        for module, name, is_parameter in places:
            (module._parameters if is_parameter else module._buffers)[name] = moved
        del t
        offset += size
    return sum(sizes)
