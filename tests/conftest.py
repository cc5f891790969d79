"""Build the C++ kernels (host AdamW, CPU int8) once before any test runs: otherwise the first test to use
them builds them inside its own (timed, perhaps multi-rank) run. Cached on disk; a no-op when already built
or when no toolchain exists (the kernels' own tests then say why)."""


def pytest_sessionstart(session):
    from sysopt.kernels import cpu
    from sysopt.offload import cpu_kernel

    cpu.load()
    cpu_kernel.load()
