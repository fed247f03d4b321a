"""load_model puts a CPU model's weights in 2 MiB pages (hugepages.py): the same values, each tensor with a storage of
its own, in huge pages where the kernel gives them."""
import os

import pytest
import torch

from conftest import PROMPT, make_converted_llama

import hugepages
from generate import load_model


def mapping_holding(address: int) -> dict:
    """The /proc/self/smaps fields (kB) and VmFlags of the mapping that holds address; {} without that file."""
    if not os.path.exists("/proc/self/smaps"):
        return {}
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            start, end = (int(a, 16) for a in head[0].split("-"))
            inside = start <= address < end
            if inside:
                fields = {"start": start, "end": end}
        elif inside and head[0] == "VmFlags:":
            fields["VmFlags"] = head[1:]
        elif inside and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            fields[head[0][:-1]] = int(head[1])
    return fields


@pytest.mark.parametrize("tied", [False, True])
def test_weights_move_into_one_huge_page_area_and_compute_as_before(tmp_path, monkeypatch, tied):
    path = make_converted_llama(tmp_path / "m", tie_word_embeddings=tied, num_key_value_heads=2)
    monkeypatch.setenv("FLEXFAST_HUGE_PAGES", "0")
    before = load_model(path, "cpu", torch.bfloat16)
    monkeypatch.delenv("FLEXFAST_HUGE_PAGES")
    moved = load_model(path, "cpu", torch.bfloat16)
    weights = list(moved.parameters())  # a tied weight once
    assert len(weights) == len(list(before.parameters()))
    assert (moved.output.weight is moved.tok_embeddings.weight) == tied
    for (name, a), b in zip(before.named_parameters(), moved.parameters()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        before.setup_caches(1, 16)
        moved.setup_caches(1, 16)
        positions = torch.arange(len(PROMPT))
        assert torch.equal(before(PROMPT[None], positions), moved(PROMPT[None], positions))
    if not hugepages.available():  # off Linux, or the kernel's policy is "never": nothing moved
        assert not any(mapping_holding(w.data_ptr()).get("AnonHugePages") for w in weights)
        return
    area = mapping_holding(weights[0].data_ptr())
    assert "hg" in area["VmFlags"] and area["AnonHugePages"] > 0  # advised MADV_HUGEPAGE, and given huge pages
    assert all(mapping_holding(w.data_ptr())["start"] == area["start"] for w in weights)
    assert all(w.data_ptr() % hugepages.ALIGN == 0 for w in weights)
    # a storage each: safetensors refuses tensors that share one, and a saved state dict holds each tensor alone
    assert len({w.untyped_storage().data_ptr() for w in weights}) == len(weights)
    assert all(w.untyped_storage().nbytes() == w.numel() * w.element_size() for w in weights)


def test_off_when_the_kernel_gives_no_huge_pages(monkeypatch, tmp_path):
    policy = tmp_path / "enabled"
    monkeypatch.setattr(hugepages, "POLICY", policy)
    policy.write_text("always madvise [never]\n")
    assert not hugepages.available()
    policy.write_text("always [madvise] never\n")
    status = tmp_path / "status"
    monkeypatch.setattr(hugepages, "PROCESS_STATUS", status)
    status.write_text("Name:\tpython\nTHP_enabled:\t1\n")
    assert hugepages.available()
    status.write_text("Name:\tpython\nTHP_enabled:\t0\n")  # prctl(PR_SET_THP_DISABLE), as some containers set
    assert not hugepages.available()
    status.write_text("Name:\tpython\nTHP_enabled:\t1\n")
    monkeypatch.setenv("FLEXFAST_HUGE_PAGES", "0")
    assert not hugepages.available()
    module = torch.nn.Linear(4, 4)
    assert hugepages.move_weights(module) == 0 and module.weight.untyped_storage().nbytes() == 64


def test_each_old_weight_is_let_go_once_copied(monkeypatch):
    """An 8B model's 16 GB of bf16 weights fit a 24 GB machine only if the move does not hold every old weight
    until it ends: when the last weight is copied, the others' old tensors are gone."""
    import weakref
    monkeypatch.setattr(hugepages, "available", lambda: True)  # the move itself, whatever this kernel's policy
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(5)])
    old = [weakref.ref(p) for p in model.parameters()]
    alive_at_each_copy = []
    frombuffer = torch.frombuffer

    def counting(*args, **kwargs):
        alive_at_each_copy.append(sum(ref() is not None for ref in old))
        return frombuffer(*args, **kwargs)
    monkeypatch.setattr(torch, "frombuffer", counting)
    hugepages.move_weights(model)
    assert alive_at_each_copy[-1] <= 1 and all(ref() is None for ref in old)
