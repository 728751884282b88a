"""The chunked kernels of ``vopd.estimators.core``: row chunks run on worker threads (CPU, more
than one torch thread) give exactly what one chunk gives, for every estimator and input dtype,
and leave torch's thread count as they found it."""

from __future__ import annotations

import pytest
import torch

from vopd.estimators import ESTIMATORS


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_worker_threads_equal_one_chunk(name, dtype, two_threads):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 300, generator=g).to(dtype).requires_grad_(True)
    t = torch.randn(3, 7, 300, generator=g).to(dtype)
    y = torch.randint(0, 300, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.2
    results = []
    for rows in (1, 4, 10_000):  # 21 chunks on 2 workers, 6 chunks, one chunk (no workers)
        loss, metrics = ESTIMATORS[name](s, t, y, mask, top_k=5, chunk_rows=rows)
        (grad,) = torch.autograd.grad(loss, s)
        results.append((loss.detach(), metrics, grad))
        assert torch.get_num_threads() == 2
    loss1, metrics1, grad1 = results[-1]
    for loss, metrics, grad in results[:-1]:
        torch.testing.assert_close(loss, loss1, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad1, rtol=0, atol=0)
        assert metrics == metrics1
