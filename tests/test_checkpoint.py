from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_cli import load
from compress_cli.checkpoint import (
    apply_architecture_diff,
    architecture_diff,
    read_manifest,
    save_model,
    tensor_encodings,
)
from compress_cli.checkpoint.codec import decode_state_dict, encode_state_dict
from compress_cli.errors import SourceError
from compress_cli.sources.models import build_from_source as load_source_model
from compress_cli.testing import seeded_zoo

SPEC = {"source": "zoo:digits_cnn", "kwargs": {}}


def roundtrip(sd):
    blob, index = encode_state_dict(sd)
    return decode_state_dict(blob), index, len(blob)


def test_encodings_are_bit_exact_and_chosen_by_content():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 64, generator=g)
    sparse = dense * (torch.rand(64, 64, generator=g) > 0.9)
    palette = torch.randint(0, 16, (64, 64), generator=g).float() * 0.37 - 2
    rows = torch.randint(-127, 128, (32, 512), generator=g).float() * torch.rand(32, 1, generator=g)
    sparse_pal = palette * (torch.rand(64, 64, generator=g) > 0.7)
    ints = torch.arange(100)
    sd = {
        "dense": dense,
        "sparse": sparse,
        "palette": palette,
        "rows": rows,
        "sp": sparse_pal,
        "ints": ints,
        "half": dense.half(),
        "bf": dense.bfloat16(),
        "scalar": torch.tensor(3.0),
    }
    out, index, _ = roundtrip(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    assert index["dense"]["enc"] == "shuffle"  # float bytes split into planes (see checkpoint/codec.py)
    assert index["sparse"]["enc"] == "gaps+shuffle"  # 10% dense: gap-coded positions
    assert index["palette"]["enc"] == "palette" and index["palette"]["bits"] == 4
    assert index["rows"]["enc"] == "rowgrid"  # per-row int8 multiples: int8 codes + a scale per row
    assert index["sp"]["enc"] == "sparse+palette"


@pytest.mark.parametrize("compression", ["lzma", "zstd", "none"])
def test_a_shape_bomb_in_the_index_is_refused_before_allocating(compression):
    """A sparse tensor's shape comes from the file: a few bytes may claim a terabyte once decoded."""
    import json

    from compress_cli.checkpoint.codec import TooLarge, _decompress

    blob, index = encode_state_dict(
        {"w": torch.zeros(64, 64).index_fill_(0, torch.tensor([3]), 1.0)}, compression
    )
    assert index["w"]["enc"].startswith(("sparse", "gaps"))
    payload = _decompress(blob)
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["index"])
    meta["w"]["shape"] = [2**20, 2**20]
    header["__metadata__"]["index"] = json.dumps(meta)
    new = json.dumps(header).encode()
    bomb = len(new).to_bytes(8, "little") + new + payload[8 + n :]
    with pytest.raises(TooLarge, match=r"the decoded tensors declare 4096\.0 GiB"):
        decode_state_dict(bomb)


@pytest.mark.parametrize("kind", ["xz", "zstd-sized", "zstd-streamed"])
def test_a_decompression_bomb_is_refused_before_allocating(tmp_path, monkeypatch, kind):
    """A weights file that decompresses to more than the memory available (here: 8 MiB of zeros with
    4 MiB available) is a located SourceError, not a run into the OOM killer."""
    import json
    import lzma

    import zstandard

    from compress_cli.checkpoint import codec

    spec = {"source": "zoo:digits_mlp"}
    d = tmp_path / "m"
    save_model(
        seeded_zoo("digits_mlp"), d, base=load_source_model(spec), model_spec=spec, input_shape=[1, 8, 8]
    )
    zeros = bytes(8 << 20)
    blob = {
        "xz": lambda: lzma.compress(zeros, format=lzma.FORMAT_XZ),
        "zstd-sized": lambda: zstandard.ZstdCompressor().compress(zeros),
        "zstd-streamed": lambda: (c := zstandard.ZstdCompressor().compressobj()).compress(zeros) + c.flush(),
    }[kind]()
    for f in d.glob("weights*"):
        f.unlink()
    name = "weights.safetensors.zst" if kind.startswith("zstd") else "weights.safetensors.xz"
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "weights": name}))
    (d / name).write_bytes(blob)
    monkeypatch.setattr(codec, "memory_available", lambda: 4 << 20)
    claim = "declare 8.0 MiB" if kind == "zstd-sized" else "decompress to more than 3.2 MiB"
    with pytest.raises(SourceError, match=rf"{name}: the weights {claim}, more than 80% of the 4\.0 MiB"):
        load(d)


def test_sparse_and_palette_shrink_the_file():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    _, _, dense_bytes = roundtrip({"w": w})
    _, _, sparse_bytes = roundtrip({"w": w * (torch.rand(256, 256, generator=g) > 0.9)})
    q = torch.round(w * 8).clamp(-8, 7) / 8  # 16 levels -> 4 bits
    _, _, pal_bytes = roundtrip({"w": q})
    assert sparse_bytes < dense_bytes / 4
    assert pal_bytes < dense_bytes / 6


def test_architecture_diff_rebuilds_changed_and_replaced_modules(tmp_path):
    model = seeded_zoo("digits_cnn")
    names = dict(model.named_modules())
    conv_name = next(n for n, m in names.items() if isinstance(m, nn.Conv2d))
    conv = names[conv_name]
    parent_name, _, child = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(
        parent,
        child,
        nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            bias=conv.bias is None,
        ),
    )
    base = seeded_zoo("digits_cnn")
    diff = architecture_diff(base, model)
    assert [d["path"] for d in diff] == [conv_name]
    rebuilt = apply_architecture_diff(seeded_zoo("digits_cnn"), diff)
    assert (rebuilt.get_submodule(conv_name).bias is None) == (conv.bias is not None)


def test_save_load_roundtrip_with_structural_change(tmp_path):
    model = seeded_zoo("digits_cnn").eval()
    # replace the whole first block by Identity-compatible change: swap the classifier head for a
    # smaller one + new
    head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, child = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(head.in_features, head.out_features, bias=False))
    size = save_model(
        model,
        tmp_path / "m",
        base=load_source_model(SPEC),
        model_spec=SPEC,
        input_shape=[1, 8, 8],
        num_classes=10,
    )
    assert size > 0
    again = load(tmp_path / "m")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert read_manifest(tmp_path / "m")["architecture"][0]["path"] == head_name


def test_corrupt_or_missing_files_are_source_errors(tmp_path):
    model = seeded_zoo("digits_cnn")
    save_model(model, tmp_path / "m", base=load_source_model(SPEC), model_spec=SPEC, input_shape=[1, 8, 8])
    w = tmp_path / "m" / "weights.safetensors.xz"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    with pytest.raises(SourceError, match="corrupt or truncated weights"):
        load(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(SourceError, match="unreadable manifest"):
        load(tmp_path / "m")
    with pytest.raises(SourceError, match="not a compressed model directory"):
        load(tmp_path / "nothing")


def test_prune_reparametrization_is_folded(tmp_path):
    import torch.nn.utils.prune as P

    model = seeded_zoo("digits_mlp").eval()
    lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
    P.l1_unstructured(lin, "weight", amount=0.8)
    spec = {"source": "zoo:digits_mlp"}
    save_model(model, tmp_path / "m", base=load_source_model(spec), model_spec=spec, input_shape=[1, 8, 8])
    again = load(tmp_path / "m")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert tensor_encodings(tmp_path / "m")[
        [k for k in again.state_dict() if k.endswith("weight")][0]
    ].startswith(("sparse", "gaps"))


def test_copy_model_works_on_pruned_modules_after_forward():
    import torch.nn.utils.prune as P

    from compress_cli.checkpoint import copy_model

    model = seeded_zoo("digits_mlp")
    lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
    P.l1_unstructured(lin, "weight", amount=0.5)
    x = torch.randn(2, 1, 8, 8)
    model(x).sum().backward()
    clone = copy_model(model)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    assert hasattr(lin, "weight_orig")  # the original keeps its masks


def test_large_payloads_are_zstd_small_ones_xz_and_both_reload_exactly(tmp_path, monkeypatch):
    import compress_cli.checkpoint as ck
    import compress_cli.checkpoint.codec as codec
    from compress_cli.testing import tiny_cnn

    model = tiny_cnn()
    spec = {"source": "zoo:digits_cnn"}
    small = ck.save_model(
        model, tmp_path / "m", base=load_source_model(spec), model_spec=spec, input_shape=[1, 8, 8]
    )
    assert (tmp_path / "m" / ck.WEIGHTS).is_file() and ck.read_manifest(tmp_path / "m")[
        "weights"
    ] == ck.WEIGHTS
    monkeypatch.setattr(codec, "LZMA_MAX_BYTES", 1000)  # this model's payload now counts as large
    big = ck.save_model(
        model, tmp_path / "m", base=load_source_model(spec), model_spec=spec, input_shape=[1, 8, 8]
    )
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["manifest.json", ck.WEIGHTS_ZSTD], "the re-save replaces the xz file"
    assert big == ck.checkpoint_size(tmp_path / "m") and big > small * 0.9
    again = load(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_modules_that_check_their_state_version_reload(tmp_path):
    """torchvision's MNASNet refuses a state_dict without module versions (``_metadata``)."""
    model = load_source_model({"source": "torchvision:mnasnet0_5", "kwargs": {"num_classes": 10}})
    save_model(
        model,
        tmp_path / "m",
        base=load_source_model({"source": "torchvision:mnasnet0_5", "kwargs": {"num_classes": 10}}),
        model_spec={"source": "torchvision:mnasnet0_5", "kwargs": {"num_classes": 10}},
        input_shape=[3, 32, 32],
    )
    again = load(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again(x))
