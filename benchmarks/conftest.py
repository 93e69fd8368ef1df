"""After pytest-benchmark's tables: per group, each peer's speed relative to torch native
(Opacus for per-sample gradients) and its achieved bandwidth (bytes from ``gnnumba.peers.TRAFFIC``)."""

import pytest

from gnnumba.peers import baseline_of


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    bs = getattr(config, "_benchmarksession", None)
    groups = getattr(bs, "groups", None) if bs is not None and not bs.disabled else None
    if not groups:
        return
    tr = terminalreporter
    tr.section("speed vs torch native / Opacus (median; > 1 = faster)")
    for group, benches in groups:
        now = [b for b in benches if not b.get("source") or b.get("source") == "NOW"]
        by_peer = {b["extra_info"]["peer"]: b for b in now if "peer" in b["extra_info"]}
        if not by_peer:  # a benchmark that is not from the peers table
            continue
        base = by_peer.get(baseline_of(by_peer))
        parts = []
        for name, b in sorted(by_peer.items(), key=lambda kv: kv[1]["median"]):
            gbps = b["extra_info"].get("bytes_moved", 0) / b["median"] / 1e9
            ratio = f"{base['median'] / b['median']:.2f}x, " if base else ""
            parts.append(f"{name} {ratio}{gbps:.1f} GB/s")
        tr.write_line(f"{group}: " + "; ".join(parts))
