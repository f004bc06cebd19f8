"""What several test files share."""

import pytest
import torch


@pytest.fixture
def kill_at(monkeypatch):
    """kill_at(module, name, n): the n-th call of module.name raises KeyboardInterrupt, as a kill at
    that moment would; every other call goes through. Choose a function called once per step."""

    def arm(module, name, n):
        real, calls = getattr(module, name), {"n": 0}

        def dies(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt("killed")
            return real(*a, **k)

        monkeypatch.setattr(module, name, dies)

    return arm


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and does not stall when other processes share the CPU.
    A test file takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
