"""ONNX files in the forms exporters write them, built once their symbolic input dims are fixed.

A ``transformers`` BertModel exported by the TorchScript exporter with ``dynamic_axes`` on
batch and sequence computes its attention-mask and view shapes at run time (Shape ->
Gather -> Range / Expand / GatherElements -> Concat -> Reshape).  With ``input_shapes``
those chains fold to constants and the model builds; ONNX Runtime on the same file is the
reference.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qcompile
from qcompile.frontend import onnx_shapes


class _Encoder(nn.Module):
    """A BertModel's last hidden state from (input_ids, attention_mask), random weights."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=64)
        self.bert = BertModel(config).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def dynamic_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("forms") / "bert-dynamic.onnx"
    examples = (torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.int64))
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(_Encoder(), examples, str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["out"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "out": axes})
    return path


@pytest.mark.parametrize("shape", [(1, 16), (1, 12), (3, 12)])
def test_dynamic_bert_shape_chains_fold(dynamic_bert, shape):
    """Every Reshape target folds to a constant and no Shape node is left.  At batch 1 the
    first round of shape inference leaves an unknown dim that a later round must refine."""
    shapes = {"input_ids": shape, "attention_mask": shape}
    proto, _, _ = onnx_shapes.fix_input_shapes(onnx.load(str(dynamic_bert)), shapes, "m")
    proto = onnx_shapes.fold_shape_computations(proto)
    onnx_shapes.check_reshapes_static(proto, "m")
    assert not [n.name for n in proto.graph.node if n.op_type == "Shape"]


@pytest.mark.parametrize("shape", [(1, 16), (3, 12)])
def test_dynamic_bert_builds_with_fixed_shapes(dynamic_bert, tmp_path, shape):
    shapes = {"input_ids": shape, "attention_mask": shape}
    artifact = qcompile.compile(qcompile.import_model(dynamic_bert, shapes), "native", out_dir=tmp_path,
                                name="bert", tuning_logs=False)
    ours = qcompile.load(artifact.library)
    ref = ort.InferenceSession(str(dynamic_bert), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for _ in range(3):
        mask = np.ones(shape, np.int64)
        mask[:, -3:] = 0  # padding tokens: the mask reaches the attention scores
        feeds = {"input_ids": rng.integers(0, 100, shape).astype(np.int64), "attention_mask": mask}
        a, b = ours.run(feeds)[ours.outputs[0].name], ref.run(None, feeds)[0]
        assert a.shape == b.shape == (*shape, 64)
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 1e-4, f"max relative difference {rel:.2e}"
