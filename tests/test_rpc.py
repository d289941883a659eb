"""TVM RPC: a local x86 server and tracker give the same outputs as a local run, and
faults (nothing listening, server killed mid-session, wrong key) are clear errors that
leave no processes behind."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from qcompile.build import build
from qcompile.errors import RpcError
from qcompile.frontend import import_model
from qcompile.runtime import CompiledModel
from qcompile.runtime.rpc import RpcEndpoint, free_port, start_server, start_tracker
from qcompile.target import resolve_target


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_pt2):
    return build(import_model(str(tiny_pt2)), resolve_target("native"), tmp_path_factory.mktemp("rpc"))


@pytest.fixture
def server(tmp_path):
    service = start_server("127.0.0.1", free_port(), log=tmp_path / "server.log")
    yield service
    service.stop()


def _group_gone(pgid: int) -> bool:
    """True once no process of group ``pgid`` is left (zombies reaped by their parent)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_remote_run_matches_local_and_pytorch(artifact, server, tiny_net, tiny_input):
    local = CompiledModel.load(artifact.library).run(tiny_input)
    remote_model = CompiledModel.load(artifact.library, rpc=RpcEndpoint(server.address))
    assert remote_model.remote == f"RPC server 127.0.0.1:{server.address[1]}"
    remote = remote_model.run(tiny_input)
    assert remote.keys() == local.keys() == {"output0"}
    np.testing.assert_array_equal(remote["output0"], local["output0"])  # same library, same CPU
    with torch.no_grad():
        expected = tiny_net(torch.from_numpy(tiny_input)).numpy()
    np.testing.assert_allclose(remote["output0"], expected, atol=1e-4, rtol=0)
    result = remote_model.benchmark(tiny_input, repeat=3, warmup=1)
    stats = result.to_json()
    assert len(result.times_ms) == 3 and stats["repeat"] == 3 and stats["warmup"] == 1
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]


def test_cli_bench_and_run_over_rpc(cli, artifact, server, tmp_path, tiny_input):
    inputs = tmp_path / "x.npy"
    np.save(inputs, tiny_input)
    port = server.address[1]
    bench = cli("bench", artifact.library, "--rpc", f"127.0.0.1:{port}", "--inputs", inputs, "--repeat", "3")
    assert bench.code == 0, bench.err
    assert f"on RPC server 127.0.0.1:{port}" in bench.out
    out_remote, out_local = tmp_path / "remote.npz", tmp_path / "local.npz"
    assert cli("run", artifact.library, "--rpc", f"127.0.0.1:{port}", "--inputs", inputs, "--outputs", out_remote).code == 0
    assert cli("run", artifact.library, "--inputs", inputs, "--outputs", out_local).code == 0
    remote, local = np.load(out_remote), np.load(out_local)
    for name in local.files:
        np.testing.assert_array_equal(remote[name], local[name])


def test_tracker_hands_out_a_server_by_key(cli, artifact, tmp_path, tiny_input):
    tracker = start_tracker("127.0.0.1", free_port(), log=tmp_path / "tracker.log")
    try:
        with start_server("127.0.0.1", free_port(), tracker=tracker.address, key="x86-test",
                          log=tmp_path / "server.log"):
            endpoint = RpcEndpoint(tracker.address, key="x86-test")
            out = CompiledModel.load(artifact.library, rpc=endpoint).run(tiny_input)
            local = CompiledModel.load(artifact.library).run(tiny_input)
            for name in local:
                np.testing.assert_array_equal(out[name], local[name])
            host, port = tracker.address
            bench = cli("bench", artifact.library, "--rpc-tracker", f"{host}:{port}", "--rpc-key", "x86-test",
                        "--repeat", "2")
            assert bench.code == 0, bench.err
            wrong = cli("bench", artifact.library, "--rpc-tracker", f"{host}:{port}", "--rpc-key", "rpi4")
            assert wrong.code == RpcError.exit_code
            assert "no device registered with key 'rpi4'" in wrong.err and "x86-test" in wrong.err
    finally:
        tracker.stop()
    assert _group_gone(tracker.process.pid)


def test_nothing_listening_is_a_clear_error(cli, artifact):
    port = free_port()
    started = time.monotonic()
    result = cli("bench", artifact.library, "--rpc", f"127.0.0.1:{port}")
    assert result.code == RpcError.exit_code
    assert f"cannot reach RPC server at 127.0.0.1:{port}" in result.err and "qcompile rpc-server" in result.err
    assert time.monotonic() - started < 15  # no 60 s retry loop
    tracker = cli("run", artifact.library, "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "rpi4")
    assert tracker.code == RpcError.exit_code and "cannot reach RPC tracker" in tracker.err


def test_server_killed_mid_session(artifact, server, tiny_input):
    model = CompiledModel.load(artifact.library, rpc=RpcEndpoint(server.address))
    model.run(tiny_input)
    server.stop()  # the device dies between calls of one session
    assert _group_gone(server.process.pid)  # forked session workers included
    with pytest.raises(RpcError, match=r"RPC server 127\.0\.0\.1:\d+: run failed .*server may have died"):
        model.run(tiny_input)


def test_bad_options(cli, artifact):
    assert cli("bench", artifact.library, "--rpc", "nohostport:x").code == 2
    result = cli("bench", artifact.library, "--rpc-tracker", "127.0.0.1:9190")
    assert result.code == 2 and "--rpc-key" in result.err


def test_port_in_use_is_refused(server, tmp_path):
    with pytest.raises(RpcError, match="port is in use"):
        start_server("127.0.0.1", server.address[1], log=tmp_path / "again.log")


def test_rpc_server_command_stops_its_whole_group(artifact, tiny_input):
    """`qcompile rpc-server` in the foreground; SIGTERM stops it and its session workers."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import psutil

    port = free_port()
    exe = Path(sys.executable).with_name("qcompile")
    proc = subprocess.Popen([str(exe), "rpc-server", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert "RPC server listening on 127.0.0.1:" in proc.stdout.readline()
        CompiledModel.load(artifact.library, rpc=RpcEndpoint(("127.0.0.1", port))).run(tiny_input)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "the server runs as a child process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    finally:
        proc.kill()
