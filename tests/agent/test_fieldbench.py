"""Field benchmark: measured numbers from the device, reported as the command result."""

from __future__ import annotations

import hashlib

import pytest

from agent.fieldbench import FieldBench, cpu_info, find_installed, run_benchmark
from protocol import BundleError
from protocol.messages import BenchmarkPayload
from protocol.transport import MemoryBroker
from tests.agent.agent_env import make_device
from tests.agent.fleet_sim import FleetSim, command
from tests.agent.test_link import DEV, make_node
from tests.support.bundles import make_bundle


def test_cpu_info_reads_flags_from_proc_cpuinfo(tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor : 0\nmodel name : Test CPU 9000\nflags : sse2 avx2 fma avx2\n")
    info = cpu_info(fake)
    assert info["flags"] == ["avx2", "fma", "sse2"]
    assert info["model"] and info["cores"] >= 1
    assert cpu_info(tmp_path / "absent")["flags"] == []


def test_benchmark_reports_percentiles_memory_runtimes_and_budget(signing_key):
    bundle, manifest = make_bundle(signing_key)
    from protocol import read_bundle

    result = run_benchmark(
        manifest, read_bundle(bundle).model_bytes(), 30, profile="host", device_id=DEV
    )
    assert result["runs"] == 30
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["peak_memory_mb"] > 0 and "onnxruntime" in result["runtimes"]
    assert result["latency_budget_ms"] == 10.0 and isinstance(result["fits_budget"], bool)
    assert result["estimated"] is False and result["measured_on"] == DEV


def test_benchmark_finds_an_installed_bundle_by_sha256_and_refuses_an_unknown_one(
    tmp_path, signing_key
):
    device = make_device(tmp_path, signing_key, device_id=DEV)
    b1, _ = make_bundle(signing_key, version="1.0.0", release=1)
    b2, _ = make_bundle(signing_key, version="2.0.0", release=2)
    device.installer.install_bytes(b1)
    device.installer.install_bytes(b2)
    assert find_installed(device.slots, None)[0].version == "2.0.0"
    assert find_installed(device.slots, hashlib.sha256(b1).hexdigest())[0].version == "1.0.0"
    with pytest.raises(BundleError, match="not installed"):
        find_installed(device.slots, "f" * 64)


def test_benchmark_command_returns_the_measurements_as_the_status_result(tmp_path, signing_key):
    broker = MemoryBroker()
    server = broker.client("server")
    server.connect()
    sim = FleetSim(server, DEV)
    node = make_node(tmp_path, signing_key, broker)
    node.device.installer.install_bytes(make_bundle(signing_key)[0])
    node.processor.benchmark = FieldBench(
        node.device.slots, threads=1, profile="host", device_id=DEV
    )
    node.link.start()
    sim.send(command(DEV, "benchmark", command_id="b-1", benchmark=BenchmarkPayload(runs=20)))
    sim.send(
        command(
            DEV,
            "benchmark",
            command_id="b-2",
            benchmark=BenchmarkPayload(runs=20, bundle_sha256="e" * 64),
        )
    )
    node.link.flush(timeout=0.1)
    done = sim.last("b-1")
    assert sim.states_of("b-1") == ["accepted", "done"]
    assert done.result["runs"] == 20 and done.result["p99_ms"] > 0
    assert done.result["model"]["version"] == "1.0.0"
    assert (sim.last("b-2").state, sim.last("b-2").reason) == ("failed", "command_invalid")
