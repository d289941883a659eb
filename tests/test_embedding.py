"""Weight-only int8 embedding tables (qcompile.quantize.embedding): the rewrite, its error, and
the int8 static and dynamic builds of a random embedding model reading an int8 table."""
from __future__ import annotations

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import qcompile
from qcompile.passes.bindings import Graph, const_value, op_name
from qcompile.quantize.embedding import quantize_embeddings, quantize_rows

RNG = np.random.default_rng(0)
TABLE = RNG.standard_normal((128, 64)).astype("float32")


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_gather_from_a_constant_table_reads_int8_rows():
    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor((2, 5), "int64"), table: R.Tensor((128, 64), "float32")) -> R.Tensor((2, 5, 64), "float32"):
            with R.dataflow():
                gv = R.take(table, ids, axis=0, mode="fast")
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(ids: R.Tensor((2, 5), "int64"), table_q: R.Tensor((128, 64), "int8"),
                 row_scale: R.Tensor((128, 1), "float32")) -> R.Tensor((2, 5, 64), "float32"):
            with R.dataflow():
                gv_q = R.take(table_q, ids, axis=0, mode="fast")
                gv_scale = R.take(row_scale, ids, axis=0, mode="fast")
                lv = R.astype(gv_q, "float32")
                gv = R.multiply(lv, gv_scale)
                R.output(gv)
            return gv

    after, tables = quantize_embeddings(bind(Before, table=TABLE))
    q, scale = quantize_rows(TABLE)
    after = relax.transform.Normalize()(after)
    tvm.ir.assert_structural_equal(after, bind(Expected, table_q=q, row_scale=scale))
    assert tables == [{"name": "gv", "op": "take", "table": [128, 64], "dtype": "int8 -> float32",
                       "scale": "per row", "bytes": TABLE.nbytes, "quantized_bytes": q.nbytes + scale.nbytes}]

    ids = RNG.integers(0, 128, (2, 5)).astype("int64")
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    rows = vm["main"](tvm.runtime.tensor(ids)).numpy()
    # each value within half a step of its row: max|row| / 254
    bound = np.abs(TABLE).max(axis=1)[ids][..., None] / 254 * (1 + 1e-6)
    assert np.all(np.abs(rows - TABLE[ids]) <= bound)
    assert _cosine(rows, TABLE[ids]) >= 0.9999


def test_small_and_shared_tables_stay_float():
    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor((4,), "int64"), x: R.Tensor((2, 64), "float32"), small: R.Tensor((16, 64), "float32"),
                 tied: R.Tensor((128, 64), "float32")):
            with R.dataflow():
                a = R.take(small, ids, axis=0)  # 1024 values: below MIN_ELEMENTS
                b = R.take(tied, ids, axis=0)
                c = R.matmul(x, R.permute_dims(tied))  # the table read again: keeping one float copy is smaller
                gv = (a, b, c)
                R.output(gv)
            return gv

    before = bind(Before, small=TABLE[:16], tied=TABLE)
    after, tables = quantize_embeddings(before)
    assert tables == []
    tvm.ir.assert_structural_equal(after, before)


class Embedder(nn.Module):
    """BERT's embedding block: token embedding + position embedding, LayerNorm."""

    def __init__(self, vocab: int = 2000, dim: int = 64, seq: int = 16) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.norm(self.tokens(ids) + self.positions(positions))


def _embedder_onnx(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "embedder.onnx"
    ids = torch.randint(0, 2000, (1, 16))
    torch.onnx.export(Embedder().eval(), (ids,), str(path), input_names=["ids"], output_names=["out"], dynamo=False)
    return path


def _take_tables(mod: tvm.IRModule) -> list[str]:
    """The dtypes of the constant tables ``main`` gathers rows from."""
    return [str(const_value(value.args[0]).dtype) for _, value in Graph.from_main(mod["main"]).bindings
            if op_name(value) == "relax.take" and const_value(value.args[0]) is not None]


def test_int8_builds_store_the_embedding_as_int8(tmp_path):
    """Static int8 (nothing else to quantize here) and dynamic int8 gather int8 rows; the
    output stays within cosine 0.999 of float32 and the library loses 3/4 of the table."""
    path = _embedder_onnx(tmp_path)
    feeds = [{"ids": RNG.integers(0, 2000, (1, 16)).astype("int64")} for _ in range(4)]
    fp32 = qcompile.compile(path, "native", out_dir=tmp_path, name="fp32", tuning_logs=False)
    int8 = qcompile.compile(path, "native", quantization=qcompile.Int8Config(num_samples=4), calibration_data=feeds,
                            out_dir=tmp_path, name="int8", tuning_logs=False)
    table_bytes = 2000 * 64 * 4
    (table,) = int8.manifest.quantization["embeddings"]  # the manifest says which table went int8
    assert table["table"] == [2000, 64] and table["bytes"] == table_bytes
    saved = fp32.manifest.library["bytes"] - int8.manifest.library["bytes"]
    assert saved >= 0.7 * table_bytes, saved
    float_model, int8_model = qcompile.load(fp32.library), qcompile.load(int8.library)
    for feed in feeds:
        ref, out = (next(iter(m.run(feed).values())) for m in (float_model, int8_model))
        cosine = _cosine(out, ref)
        print(f"embedding block int8 table vs float32: cosine {cosine:.7f}, max abs diff {np.abs(out - ref).max():.2e}")
        assert cosine >= 0.999

    dynamic = qcompile.prepare(path, "native", quantization=qcompile.DynamicInt8Config())
    assert _take_tables(dynamic.mod) == ["int8", "float32"]  # the table, its row scales
    assert [t["table"] for t in dynamic.quantization.embeddings] == [[2000, 64]]
