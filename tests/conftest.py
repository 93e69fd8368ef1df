import pytest


PATHS = {
    # config overrides that force one path, NCHW and channels-last (all three must give
    # bit-identical results)
    "serial": dict(CPU_SERIAL_MAX_ELEMENTS=1 << 62),
    "fused": dict(CPU_SERIAL_MAX_ELEMENTS=0, CPU_FUSED_MIN_TASKS_PER_THREAD=0,
                  CPU_FUSED_MAX_BYTES=1 << 62, CPU_CL_FUSED_MAX_BYTES=1 << 62),
    "split": dict(CPU_SERIAL_MAX_ELEMENTS=0, CPU_FUSED_MAX_BYTES=-1, CPU_CL_FUSED_MAX_BYTES=-1),
}


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the CPU blocking so small test shapes still span several chunks and blocks, and
    let them take the parallel paths (not the serial one meant for tiny inputs)."""
    from gnnumba import config

    monkeypatch.setattr(config, "CPU_CHUNK", 16)
    monkeypatch.setattr(config, "CPU_CL_BLOCK", 32)
    monkeypatch.setattr(config, "CPU_SERIAL_MAX_ELEMENTS", 0)
    return config


@pytest.fixture
def force_path(monkeypatch):
    """force_path("split") makes the following calls take that NCHW path."""
    from gnnumba import config

    def force(path):
        for name, value in PATHS[path].items():
            monkeypatch.setattr(config, name, value)

    return force
