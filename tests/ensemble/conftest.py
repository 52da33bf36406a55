"""One intra-op thread for the ensemble tests: their renders are tiny (10x10 pixels), and on a
shared two-core machine a second thread waiting on a busy core made each small op 30x slower
(a 16x16 render: 5 ms with one thread, 180 ms with two beside other processes)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
