"""benchmarks/standalone.py: contenders measured in their own processes, rounds interleaved."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import standalone


class _FakeServer:
    def __init__(self, name: str, log: list[str], fails: bool = False) -> None:
        self.name, self.log, self.fails = name, log, fails

    def measure(self, path, feeds, seconds):
        self.log.append(self.name)
        if self.fails:
            raise standalone.MeasureError("no such file")
        return {"ms": float(len(self.log)), "waited_s": 0.5, "idle": self.name != "b"}


def test_each_round_starts_one_contender_later_and_a_failure_drops_its_row():
    log: list[str] = []
    servers = {"a": _FakeServer("a", log), "b": _FakeServer("b", log), "c": _FakeServer("c", log, fails=True)}
    per_round, errors, waits = standalone.interleaved_rounds(dict.fromkeys("abc", "f"), servers, "x.npz", 3, 0.1)
    assert log == ["a", "b", "c", "b", "a", "a", "b"]  # round 2: b, (c asked once only), a; round 3: a, b
    assert errors == {"c": "no such file"} and set(per_round) == {"a", "b"}
    assert per_round == {"a": [1.0, 5.0, 6.0], "b": [2.0, 4.0, 7.0]}
    assert waits == {"idle_wait_s": 3.0, "busy_starts": 3}


def test_servers_measure_onnx_runtime_and_pytorch_in_their_own_processes(tmp_path):
    """Real processes: an ONNX file on ONNX Runtime and a saved module on PyTorch answer a
    positive median; a file that does not load is a MeasureError naming the problem, and the
    same server still measures afterwards."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    torch.save(torch.nn.ReLU(), tmp_path / "relu.pt")
    np.savez(tmp_path / "feeds.npz", x=np.ones((1, 8), np.float32))
    feeds = str(tmp_path / "feeds.npz")
    ort = standalone.Server("ONNX Runtime fp32", 1, tmp_path / "ort.log")
    pt = standalone.Server("PyTorch fp32 eager", 1, tmp_path / "pt.log")
    try:
        for server, path in ((ort, "relu.onnx"), (pt, "relu.pt")):
            reply = server.measure(str(tmp_path / path), feeds, 0.05)
            assert reply["ms"] > 0 and reply["runs"] >= 5
        with pytest.raises(standalone.MeasureError, match="missing.onnx"):
            ort.measure(str(tmp_path / "missing.onnx"), feeds, 0.05)
        assert ort.measure(str(tmp_path / "relu.onnx"), feeds, 0.05)["ms"] > 0
    finally:
        ort.close()
        pt.close()
