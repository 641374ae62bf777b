"""Test-wide settings (nothing may reach a model hub; trained models go to a model cache of this test
session, never to the user's) and shared fixtures."""

import atexit
import os
import shutil
import tempfile

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["MEDCERT_CACHE"] = tempfile.mkdtemp(prefix="medcert-test-cache-")  # inherited by subprocesses
atexit.register(shutil.rmtree, os.environ["MEDCERT_CACHE"], ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures(...)``):
    more threads only add overhead on 2 shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def crash_on_second_save(monkeypatch):
    """Patch ``module.save_torch_atomically`` to save once, then raise KeyboardInterrupt (a crash).

    Returns a function ``arm(module)``; ``disarm(module)`` puts the real function back.
    """
    from medcert_core.io import save_torch_atomically

    def arm(module) -> None:
        saves = []

        def save_once(payload, path):
            if saves:
                raise KeyboardInterrupt("simulated crash")
            saves.append(path)
            return save_torch_atomically(payload, path)

        monkeypatch.setattr(module, "save_torch_atomically", save_once)

    def disarm(module) -> None:
        monkeypatch.setattr(module, "save_torch_atomically", save_torch_atomically)

    return arm, disarm
