"""kvbm/forward_timer.py: forward passes timed on the device's clock. The CPU branch runs in CI;
the CUDA branch (events, reported only once the pass has completed) needs a GPU and is run on
the device machine (benchmarks/RESULTS.md notes the run)."""

from __future__ import annotations

import pytest
import torch

from kvbm.forward_timer import ForwardTimer


def work(device: str) -> None:
    a = torch.randn(256, 256, device=device)
    for _ in range(8):
        a = a @ a
        a = a / a.norm()


def test_cpu_passes_are_reported_once_with_their_tokens() -> None:
    timer = ForwardTimer(torch.device("cpu"))
    timer.stop()  # nothing started: nothing to report
    assert timer.take() == []
    timer.start(128)
    work("cpu")
    timer.stop()
    timer.start(64)
    timer.stop()
    taken = timer.take()
    assert [tokens for tokens, _ in taken] == [128, 64]
    assert all(seconds >= 0 for _, seconds in taken)
    assert timer.take() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_passes_are_reported_after_the_device_ran_them() -> None:
    timer = ForwardTimer(torch.device("cuda"))
    # Warm first, as an engine's passes are: a first matmul loads cuBLAS's kernels, which
    # waited for the device on an H100 (the pass below then completed before take()).
    work("cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # the stream is busy: the pass below cannot have completed
    timer.start(256)
    work("cuda")
    timer.stop()
    assert timer.take() == []  # launched, not run: never waits for the device
    torch.cuda.synchronize()
    taken = timer.take()
    assert len(taken) == 1 and taken[0][0] == 256 and taken[0][1] > 0
    assert timer.take() == []
