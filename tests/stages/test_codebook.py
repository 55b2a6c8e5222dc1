"""codebook stage: k-means weight sharing, composition with pruning, centroid fine-tuning,
bit-width of the stored indices, exact reload, validation."""

from __future__ import annotations

import json
import lzma

import pytest
import torch
import yaml

import compress_cli
from compress_cli import codebook as C
from compress_cli import pruning as P
from compress_cli.checkpoint import WEIGHTS, read_manifest, tensor_encodings
from compress_cli.config.yaml import parse_yaml
from compress_cli.engine.setup import build_state
from compress_cli.errors import RecipeError
from compress_cli.stages.registry import get_stage, validate
from compress_cli.state import save_snapshot
from compress_cli.testing import tiny_recipe_dict
from compress_cli.training import TrainOptions, train


def make_state(tmp_path, model="zoo:digits_mlp"):
    d = tiny_recipe_dict(tmp_path, model={"source": model}, data={"limit_train": 400})
    return build_state(validate(parse_yaml(yaml.safe_dump(d))), torch.device("cpu"), tmp_path / "out")


def run(state, type_, **cfg):
    cls = get_stage(type_)
    return cls(cls.config_class.model_validate({"type": type_, **cfg})).run(state)


def nonzero_values(w: torch.Tensor) -> int:
    return int(torch.unique(w[w != 0]).numel())


@pytest.fixture
def state(tmp_path):
    s = make_state(tmp_path)
    train(s.model, s, TrainOptions(epochs=2, lr=0.01))
    return s


def test_kmeans_linear_init_is_deterministic_and_uses_every_code():
    torch.manual_seed(0)
    v = torch.randn(5000)
    v = v[v.abs() > 0.5]  # the gap pruning leaves around zero
    c1, l1 = C.kmeans_1d(v, 16)
    c2, l2 = C.kmeans_1d(v, 16)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert torch.unique(l1).numel() == 16  # no empty cluster stranded in the gap
    assert torch.all(c1[1:] > c1[:-1])
    # each centroid is the mean of its members (converged Lloyd)
    for j in range(16):
        assert c1[j] == pytest.approx(float(v[l1 == j].double().mean()), abs=1e-9)
    c, lab = C.kmeans_1d(torch.tensor([-1.0, -1.1, 1.0, 1.1]), 2)
    assert c.tolist() == pytest.approx([-1.05, 1.05]) and lab.tolist() == [0, 0, 1, 1]
    c, lab = C.kmeans_1d(torch.tensor([2.0, 2.0, 3.0]), 8)  # fewer distinct values than codes
    assert set(c[lab].tolist()) == {2.0, 3.0}


def test_shared_weight_gradient_is_the_sum_over_each_cluster():
    lin = torch.nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.5, 0.0, 0.5, 0.25, 0.25]] * 3))
    C.attach(lin)
    x = torch.randn(4, 6)
    lin(x).pow(2).sum().backward()
    sw = lin.parametrizations.weight[0]
    w = lin.weight.detach().requires_grad_(True)
    torch.nn.functional.linear(x, w).pow(2).sum().backward()
    expect = torch.zeros_like(sw.centroids).index_add_(0, sw.index[sw.mask], w.grad[sw.mask])
    assert torch.allclose(sw.centroids.grad, expect, atol=1e-6)
    C.detach(lin)
    assert isinstance(lin.weight, torch.nn.Parameter) and nonzero_values(lin.weight) == 3


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_codebook_after_prune_keeps_zeros_and_at_most_2_to_the_bits_values(state, bits):
    run(state, "prune", sparsity=0.7, include_head=True)
    zero_before = {n: P.effective_weight(state.model.get_submodule(n)) == 0 for n in ("fc1", "fc2", "fc3")}
    res = run(state, "codebook", bits=bits)
    for n, z in zero_before.items():
        w = state.model.get_submodule(n).weight
        assert not P.is_pruned(state.model.get_submodule(n))
        assert torch.equal(w == 0, z)  # zeros stay zero, nonzeros stay nonzero
        assert nonzero_values(w) == 2**bits == res.details["layers"][n]["clusters"]


def test_centroid_finetuning_moves_centroids_not_the_sharing(state):
    run(state, "prune", sparsity=0.5, include_head=True)
    run(state, "codebook", bits=3, exclude=["fc3"])
    shared = {n: state.model.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")}
    res = run(
        state, "codebook", bits=3, exclude=["fc3"], epochs=1, lr=0.01, optimizer="sgd", weight_decay=0.01
    )
    for n, before in shared.items():
        w = state.model.get_submodule(n).weight.detach()
        assert nonzero_values(w) <= 8 and torch.equal(w == 0, before == 0)
        assert not torch.equal(w, before)  # centroids were trained
        # same grouping: weights that shared a value still share one
        _, inv_b = torch.unique(before[before != 0], return_inverse=True)
        _, inv_a = torch.unique(w[w != 0], return_inverse=True)
        pairs = set(zip(inv_b.tolist(), inv_a.tolist(), strict=True))
        assert len(pairs) == len(set(inv_b.tolist()))
    assert res.details["finetune"]["epochs_run"] == 1
    assert not any("parametrizations" in k for k in state.model.state_dict())


def test_checkpoint_packs_indices_at_bits_and_reloads_exactly(state, tmp_path):
    run(state, "prune", sparsity=0.8, include_head=True)
    pruned = save_snapshot(state, tmp_path / "pruned")
    run(state, "codebook", bits=4, layers={"fc3": 3})
    shared = save_snapshot(state, tmp_path / "shared")
    assert shared < pruned * 0.6  # 4-bit indices instead of 32-bit values
    m = read_manifest(tmp_path / "shared")
    blob = lzma.decompress((tmp_path / "shared" / WEIGHTS).read_bytes())
    index = json.loads(json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])["__metadata__"]["index"])
    assert index["fc1.weight"]["bits"] == 4 and index["fc3.weight"]["bits"] == 3
    assert tensor_encodings(tmp_path / "shared")["fc1.weight"].endswith("palette")
    assert m["edits"][-1] == {"stage": "codebook", "op": "codebook", "bits": 4, "layers": {"fc3": 3}}
    loaded = compress_cli.load(tmp_path / "shared")
    x = torch.randn(32, 1, 8, 8)
    assert torch.equal(loaded(x), state.model.eval()(x))
    for n in ("fc1", "fc2", "fc3"):
        assert torch.equal(loaded.get_submodule(n).weight, state.model.get_submodule(n).weight)


def test_codebook_leaves_masks_of_untouched_layers_in_force(state):
    run(state, "prune", sparsity=0.6, include_head=True)
    run(state, "codebook", bits=4, include=["fc1"], epochs=1, lr=0.01, max_steps_per_epoch=3)
    assert not P.is_pruned(state.model.fc1) and P.is_pruned(state.model.fc2)
    keep = P.masks(state.model)["fc2.weight"]
    assert torch.all(P.effective_weight(state.model.fc2)[~keep] == 0)


def test_codebook_validation():
    def v(stages: str):
        return validate(
            parse_yaml("version: 1\nname: t\nmodel: {source: 'zoo:digits_mlp'}\nstages:\n" + stages, "r.yaml")
        )

    with pytest.raises(
        RecipeError,
        match=r"r\.yaml:6: stages\[0\] \(codebook\)\.bits: must be less than or equal to 8 \(got 9\)",
    ):
        v("  - type: codebook\n    bits: 9\n")
    with pytest.raises(
        RecipeError, match=r"stages\[0\] \(codebook\)\.layers\.fc1: must be greater than or equal to 2"
    ):
        v("  - type: codebook\n    bits: 4\n    layers: {fc1: 1}\n")
    with pytest.raises(
        RecipeError, match=r"stages\[1\] \(finetune\): cannot train after stages\[0\] \(codebook\)"
    ):
        v("  - type: codebook\n    bits: 4\n  - type: finetune\n")
    r = v("  - {type: prune, sparsity: 0.5}\n  - {type: codebook, bits: 4, epochs: 2, lr: 0.001}\n")
    assert get_stage("codebook").trains(r.stages[1]) and not get_stage("codebook").trains(
        r.stages[1].model_copy(update={"epochs": 0})
    )


def test_others_fp16_rounds_biases_and_norms_into_2_byte_storage(tmp_path):
    s = make_state(tmp_path, "zoo:digits_cnn")
    run(s, "prune", sparsity=0.5)
    before = save_snapshot(s, tmp_path / "a")
    x = torch.randn(8, 1, 8, 8)
    y = s.model.eval()(x)
    res = run(s, "codebook", bits=4, include=["conv*"], others="fp16")
    assert {"bn1.weight", "bn2.running_var", "fc.bias", "fc.weight"} <= set(res.details["rounded"])
    for name, t in s.model.state_dict().items():
        if t.is_floating_point() and name not in ("conv1.weight", "conv2.weight"):  # codebooks: not rounded
            assert torch.equal(t.half().float(), t), name
    save_snapshot(s, tmp_path / "b")
    enc = tensor_encodings(tmp_path / "b")
    assert "f16" in enc["bn2.running_var"] and "f16" in enc["fc.weight"]
    assert save_snapshot(s, tmp_path / "b") < before
    assert torch.allclose(s.model(x), y, atol=0.5)
    loaded = compress_cli.load(tmp_path / "b")
    assert torch.equal(loaded(x), s.model(x))


def test_centroid_finetuning_is_deterministic(tmp_path):
    outs = []
    for i in range(2):
        s = make_state(tmp_path / str(i), "zoo:digits_resnet")
        run(s, "codebook", bits=4, epochs=1, lr=0.001, max_steps_per_epoch=2)
        outs.append(s.model.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_fold_batchnorm_shares_the_folded_weights_keeps_zeros_and_reloads(tmp_path):
    s = make_state(tmp_path, "zoo:digits_cnn")
    train(s.model, s, TrainOptions(epochs=1, lr=0.01, max_steps_per_epoch=5))  # BN stats move off init
    run(s, "prune", sparsity=0.6, include_head=True)
    zeros = {n: P.effective_weight(s.model.get_submodule(n)) == 0 for n in ("conv1", "conv2", "fc")}
    x = torch.randn(8, 1, 8, 8)
    y = s.model.eval()(x)
    res = run(
        s, "codebook", bits=6, others="fp16", batchnorm="fold", epochs=1, lr=1e-3, max_steps_per_epoch=3
    )
    assert res.details["folded"] == ["conv1+bn1", "conv2+bn2"]
    assert isinstance(s.model.bn1, torch.nn.Identity) and s.model.conv1.bias is not None
    for n, z in zeros.items():  # folding and centroid training keep every pruned weight at zero
        w = s.model.get_submodule(n).weight
        assert torch.all(w[z] == 0) and nonzero_values(w) <= 64, n
    assert torch.allclose(s.model.eval()(x), y, atol=0.2)  # 6-bit sharing of the folded weights
    save_snapshot(s, tmp_path / "folded")
    edit = read_manifest(tmp_path / "folded")["edits"][-1]
    assert edit == {"stage": "codebook", "op": "codebook", "bits": 6, "others": "fp16", "batchnorm": "fold"}
    assert not any(k.startswith("bn") for k in s.model.state_dict())  # 4 tensors less per pair
    loaded = compress_cli.load(tmp_path / "folded")
    assert torch.equal(loaded(x), s.model(x))


def test_batchnorm_affine_moves_the_statistics_into_weight_and_bias(tmp_path):
    s = make_state(tmp_path, "zoo:digits_cnn")
    train(s.model, s, TrainOptions(epochs=1, lr=0.01, max_steps_per_epoch=5))  # BN stats move off init
    x = torch.randn(8, 1, 8, 8)
    run(s, "codebook", bits=4)
    y = s.model.eval()(x)
    plain = save_snapshot(s, tmp_path / "plain")
    s2 = make_state(tmp_path / "2", "zoo:digits_cnn")
    s2.model.load_state_dict(s.model.state_dict())
    res = run(s2, "codebook", bits=4, batchnorm="affine")
    assert res.details["affine"] == ["bn1", "bn2"]
    bn = s2.model.bn2
    assert torch.all(bn.running_mean == 0) and float((bn.running_var + bn.eps).rsqrt().max()) == 1.0
    assert torch.allclose(s2.model.eval()(x), y, atol=1e-5)  # eval outputs unchanged
    assert save_snapshot(s2, tmp_path / "affine") < plain  # two constant tensors per BN
    assert torch.equal(compress_cli.load(tmp_path / "affine")(x), s2.model(x))
