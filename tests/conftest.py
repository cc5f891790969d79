"""Build the C++ kernels (host AdamW, CPU int8) once before any test runs: otherwise the first test to use
them builds them inside its own (timed, perhaps multi-rank) run. Cached on disk; a no-op when already built
or when no toolchain exists (the kernels' own tests then say why)."""


def pytest_sessionstart(session):
    from sysopt.kernels import cpu
    from sysopt.offload import cpu_kernel

    cpu.load()
    cpu_kernel.load()


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_collectives_default_to_gloo(monkeypatch):
    """The tests' ranks hold CPU tensors: launch() without a backend picks gloo here even where CUDA is
    visible (its default there is NCCL), so that the suite runs unchanged on a GPU host. Tests of the NCCL
    path pass backend='nccl' explicitly."""
    import importlib

    launch_module = importlib.import_module("sysopt.dist.launch")  # (sysopt.dist.launch is also the function)
    monkeypatch.setattr(launch_module, "default_backend", lambda: "gloo")
