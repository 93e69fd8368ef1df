import pytest


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the CPU blocking so small test shapes still span several chunks and blocks."""
    from gnnumba import config

    monkeypatch.setattr(config, "CPU_CHUNK", 16)
    monkeypatch.setattr(config, "CPU_CL_BLOCK", 32)
    return config


@pytest.fixture(params=["fused", "split"])
def nchw_path(request, monkeypatch):
    """Force one of the two NCHW code paths."""
    from gnnumba import config

    if request.param == "fused":
        monkeypatch.setattr(config, "CPU_FUSED_MIN_TASKS_PER_THREAD", 0)
        monkeypatch.setattr(config, "CPU_FUSED_MAX_BYTES", 1 << 62)
    else:
        monkeypatch.setattr(config, "CPU_FUSED_MAX_BYTES", -1)
    return request.param
