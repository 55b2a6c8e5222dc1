"""The input spec (what a model is called with) and ONNX export / ONNX Runtime with named inputs,
dynamic batch and sequence axes, and structured outputs."""

from __future__ import annotations

import onnx
import pytest
import torch

from compress_cli.errors import SourceError, StageError
from compress_cli.runtime.export import onnx_bytes
from compress_cli.runtime.inputs import InputSpec
from compress_cli.runtime.ort import OrtModule
from compress_cli.testing import bert_inputs, tiny_bert


class Encoder(torch.nn.Module):
    """tiny_bert's encoder returning its ``ModelOutput`` (last_hidden_state, pooler_output)."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert().bert.bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask)


def test_spec_of_a_dict_example_follows_forward_order_and_marks_token_axes():
    x = bert_inputs(2, 16)
    swapped = {"attention_mask": x["attention_mask"], "input_ids": x["input_ids"]}
    spec = InputSpec.from_example(swapped, tiny_bert())
    assert spec.kind == "kwargs" and spec.names == ["input_ids", "attention_mask"]
    assert [t.dynamic for t in spec.tensors] == [(0, 1), (0, 1)] and spec.sequence_length == 16
    assert spec.describe()["input_ids"] == {"dtype": "int64", "shape": ["batch", "sequence"]}
    ex = spec.example(3, 7)
    assert ex["input_ids"].shape == (3, 7) and ex["input_ids"].dtype == torch.int64
    assert ex["input_ids"].eq(0).all() and ex["attention_mask"].eq(1).all()
    assert InputSpec.from_json(spec.to_json()) == spec
    images = InputSpec.from_example(torch.zeros(2, 1, 8, 8))
    assert images.kind == "tensor" and images.names == ["input"] and images.tensors[0].dynamic == (0,)
    assert images == InputSpec.from_entry({"input_shape": [1, 8, 8]})  # what older manifests recorded
    pair = InputSpec.from_example((torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long)))
    assert pair.names == ["input_0", "input_1"] and isinstance(pair.example(1), tuple)


def test_untrusted_specs_are_refused_with_the_field():
    with pytest.raises(SourceError, match=r"tensors\[0\]\.dtype"):
        InputSpec.from_json({"kind": "kwargs", "tensors": [{"name": "a", "dtype": "object", "shape": [3]}]})
    with pytest.raises(SourceError, match=r"tensors\[1\]\.name"):
        t = {"name": "a", "dtype": "int64", "shape": [3]}
        InputSpec.from_json({"kind": "kwargs", "tensors": [t, t]})
    with pytest.raises(SourceError, match=r"dynamic"):
        InputSpec.from_json({"kind": "tensor", "tensors": [{**t, "shape": [3, 4], "dynamic": [0, 1]}]})
    with pytest.raises(StageError, match="not a tensor"):
        InputSpec.from_example({"input_ids": torch.zeros(2, 3), "flag": True})


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_onnx_export_of_a_dict_input_model_has_dynamic_batch_and_sequence(exporter):
    model = tiny_bert()
    data, used = onnx_bytes(model, bert_inputs(2, 16), exporters=(exporter,))
    graph = onnx.load_from_string(data).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert used == exporter and dims == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
    }
    ort = OrtModule(data)
    for batch, length in ((1, 5), (3, 16), (4, 23)):  # lengths and batch sizes never exported
        x = bert_inputs(batch, length, seed=batch)
        with torch.no_grad():
            want = model(**x)
        assert float(want.abs().max()) > 0.01
        assert torch.allclose(ort(x), want, atol=1e-5) and torch.allclose(ort(**x), want, atol=1e-5)


def test_structured_outputs_come_back_in_the_models_structure():
    """All tensor outputs are exported, named by their keys; ONNX Runtime gives back a dict with the
    same keys, so a task's output selector reads ORT's output as it reads torch's."""
    from compress_cli.config.recipe import TaskConfig
    from compress_cli.tasks import build_task

    model = Encoder().eval()
    data, _ = onnx_bytes(model, bert_inputs(2, 16), exporters=("legacy",))
    outs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in onnx.load_from_string(data).graph.output
    }
    assert outs == {"last_hidden_state": ["batch", "sequence", 32], "pooler_output": ["batch", 32]}
    x = bert_inputs(3, 9, seed=4)
    got = OrtModule(data)(x)
    with torch.no_grad():
        want = model(**x)
    assert isinstance(got, dict) and list(got) == ["last_hidden_state", "pooler_output"]
    task = build_task(TaskConfig(type="fidelity", output="mean_pool"), None)
    assert torch.allclose(task.select(got, x), task.select(want, x), atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter, called directly
def test_an_onnx_file_without_metadata_still_runs_as_before():
    """Files written before the output structure was recorded: the first output, one tensor input."""
    import io

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, 8, 8),),
        buf,
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
    )
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(OrtModule(buf.getvalue())(x), model(x), atol=1e-6)
