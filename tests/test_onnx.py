"""ONNX export of every registered method (timm and Hugging Face models): static shapes, opset >= 17, no
scatter with mean reduction, onnxruntime (CPU) within 1e-4 of PyTorch; the ``vitrim export`` command."""
import argparse

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import vitrim  # noqa: E402
from conftest import small_vit  # noqa: E402
from test_compile_methods import reduced_options  # noqa: E402
from vitrim.cli.export import add_export_parser
from vitrim.export import check_onnx, verify_onnx  # noqa: E402

METHODS = vitrim.methods()
SIZE = (2, 3, 64, 64)


def _inputs(n: int = 2) -> list[torch.Tensor]:
    return [torch.randn(*SIZE, generator=torch.Generator().manual_seed(s)) for s in range(n)]


@pytest.mark.parametrize("name", METHODS)
def test_export_matches_pytorch(name, tmp_path):
    model = vitrim.apply(small_vit(depth=4), name, **reduced_options(name)).eval()
    path = vitrim.export_onnx(model, tmp_path / f"{name}.onnx", input_size=SIZE)
    summary = check_onnx(path, input_size=SIZE)
    assert summary["opset"] >= 17
    proto = onnx.load(path)
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [2, 10]
    for x in _inputs():  # content changes the decisions, not the shapes
        assert verify_onnx(model, path, x) < 1e-4
    assert model.training is False and vitrim.is_reduced(model)


def test_tome_merge_is_a_sum_scatter(tmp_path):
    model = vitrim.apply(small_vit(depth=2), "tome", r=4)
    path = vitrim.export_onnx(model, tmp_path / "tome.onnx", input_size=(1, 3, 64, 64))
    reductions = {next((a.s.decode() for a in n.attribute if a.name == "reduction"), "none")
                  for n in onnx.load(path).graph.node if n.op_type == "ScatterElements"}
    assert "add" in reductions and "mean" not in reductions


def test_check_rejects_mean_scatter_and_dynamic_input(tmp_path):
    from onnx import TensorProto, helper

    def save(shape, reduction):
        node = helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=0, reduction=reduction)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
                          helper.make_tensor_value_info("i", TensorProto.INT64, [1]),
                          helper.make_tensor_value_info("u", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
        path = tmp_path / f"{reduction}-{shape[0]}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
        return path

    with pytest.raises(vitrim.VitrimError, match="mean"):
        check_onnx(save([4], "mean"))
    with pytest.raises(vitrim.VitrimError, match="static"):
        check_onnx(save(["n"], "add"))
    assert check_onnx(save([4], "add"))["ops"] == {"ScatterElements": 1}


@pytest.mark.parametrize("family", ["vit", "deit", "clip"])
def test_export_hf_models(family, tmp_path):
    pytest.importorskip("transformers")
    from test_hf import hf_model

    model = vitrim.apply(hf_model(family), "tome", r=4)
    path = vitrim.export_onnx(model, tmp_path / f"{family}.onnx", input_size=SIZE)
    name = onnx.load(path).graph.output[0].name
    assert name == ("last_hidden_state" if family == "clip" else "logits")
    for x in _inputs():
        assert verify_onnx(model, path, x) < 1e-4


def test_export_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vitrim")
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "test_vit.onnx"
    args = parser.parse_args(["export", "--model", "test_vit", "--img-size", "64", "--method", "tome",
                              "--r", "3", "--batch-size", "2", "--output", str(out), "--verify"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "max abs difference" in printed
    assert check_onnx(out, input_size=(2, 3, 64, 64))["opset"] >= 17
