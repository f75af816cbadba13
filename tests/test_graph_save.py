"""Saving and reloading graph-pruned networks: safetensors plus the geometry of every resizable layer."""

import copy
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import prunekit
from prunekit import nets
from prunekit.artifacts import MANIFEST
from prunekit.artifacts.modules import builtin_nets
from prunekit.errors import PrunekitError


class GatedNet(nn.Module):
    """A user's network: a grouped conv, GroupNorm, a bare nn.Parameter multiplied in, a transposed conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.norm = nn.GroupNorm(4, 16)
        self.scale = nn.Parameter(torch.randn(1, 16, 1, 1))
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2, output_padding=0)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.norm(self.grouped(x)) * self.scale)
        return self.head(torch.relu(self.up(x)).mean((2, 3)))


def _settle(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """A few training-mode passes so that BatchNorm's running statistics are not their initial 0 and 1."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(inputs)
    return model.eval()


def _out(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs)


def _pruned(model: nn.Module, inputs: torch.Tensor, **options) -> tuple[nn.Module, dict]:
    result = prunekit.prune_structure(model, inputs[:1], remove=0.3, progress=False, **options)
    record = result[0] if isinstance(result, tuple) else result
    return model, record


def _shrunk(model: nn.Module, dense: nn.Module) -> list[str]:
    shapes = {name: p.shape for name, p in dense.named_parameters()}
    return [name for name, p in model.named_parameters() if p.shape != shapes[name]]


@pytest.mark.parametrize("name, shape", [("resnet-small", (4, 1, 28, 28)), ("mobilenet-v2", (2, 3, 96, 96))])
def test_builtin_net_round_trip_is_exact(tmp_path, name, shape):
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    dense = _settle(builtin_nets()[name](), inputs)
    model, record = _pruned(copy.deepcopy(dense), inputs)
    assert _shrunk(model, dense), "nothing was removed; the test would prove nothing"
    prunekit.save(model, None, tmp_path / "out", record)

    loaded, tokenizer, manifest = prunekit.load(tmp_path / "out")
    assert tokenizer is None and type(loaded) is type(model) and not loaded.training
    assert manifest["net"] == name and manifest["metrics"] == json.loads(json.dumps(record["metrics"]))
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # module attributes agree with the tensors (a stale in_channels would break a later prune or a repr)
    for module_name, module in loaded.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.weight.shape[0] == module.out_channels, module_name
            assert module.weight.shape[1] * module.groups == module.in_channels, module_name
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean.shape[0] == module.num_features, module_name


def test_user_net_with_bare_parameter_and_grouped_conv_needs_a_fresh_instance(tmp_path):
    inputs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    dense = _settle(GatedNet(), inputs)
    model, record = _pruned(copy.deepcopy(dense), inputs, method="l1")
    # the grouped conv loses whole groups: `groups` itself is geometry the manifest must carry
    assert model.scale.shape[1] < 16 and 1 < model.grouped.groups < 4 and model.up.in_channels < 16
    prunekit.save(model, None, tmp_path / "out", record)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["net"] is None and manifest["tensors"] == {"scale": list(model.scale.shape)}
    assert manifest["modules"]["up"]["output_padding"] == [0, 0]
    assert manifest["modules"]["grouped"]["groups"] == model.grouped.groups

    with pytest.raises(PrunekitError, match="load\\(dir, model=TheClass"):
        prunekit.load(tmp_path / "out")
    fresh = GatedNet()
    loaded, _, _ = prunekit.load(tmp_path / "out", model=fresh)
    assert loaded is fresh and loaded.scale.shape == model.scale.shape
    assert loaded.grouped.groups == model.grouped.groups and loaded.norm.num_groups == model.norm.num_groups
    assert isinstance(loaded.scale, nn.Parameter) and loaded.scale.requires_grad
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))


def test_masked_model_saves_and_reloads(tmp_path):
    inputs = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    dense = _settle(nets.build_net("resnet-small", seed=0), inputs)
    model, record = _pruned(copy.deepcopy(dense), inputs, mode="mask")
    assert not _shrunk(model, dense)
    prunekit.save(model, None, tmp_path / "out", record)
    loaded, _, manifest = prunekit.load(tmp_path / "out")
    assert manifest["method"]["mode"] == "mask"
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    zeros = sum(int((p == 0).sum()) for p in loaded.parameters())
    assert zeros == sum(int((p == 0).sum()) for p in model.parameters()) > 0


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = nn.Linear(6, 6, bias=False)
            self.decode = nn.Linear(6, 6, bias=False)
            self.decode.weight = self.encode.weight

        def forward(self, x):
            return self.decode(torch.tanh(self.encode(x)))

    model = Tied()
    prunekit.save(model, None, tmp_path / "out", {})
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["encode.weight"]
    loaded, _, manifest = prunekit.load(tmp_path / "out", model=Tied())
    assert manifest["tied"] == {"decode.weight": "encode.weight"}
    assert loaded.decode.weight is loaded.encode.weight
    assert torch.equal(loaded.encode.weight, model.encode.weight)


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    inputs = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model, record = _pruned(nets.build_net("resnet-small", seed=0).eval(), inputs)
    return prunekit.save(model, None, tmp_path_factory.mktemp("resnet") / "out", record)


@pytest.fixture()
def saved_resnet(resnet_dir, tmp_path):
    """A fresh copy of a saved graph-pruned ResNetSmall, for a test to tamper with."""
    return Path(shutil.copytree(resnet_dir, tmp_path / "out"))


def _tamper(directory, change) -> None:
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _set(manifest, module, field, value):
    manifest["modules"][module][field] = value


@pytest.mark.parametrize("change, needle", [
    (lambda m: _set(m, "stem.0", "out_channels", m["modules"]["stem.0"]["out_channels"] + 1), "shape"),
    (lambda m: _set(m, "layer1.bn1", "num_features", 3), "shape"),
    (lambda m: _set(m, "stem.0", "type", "Conv9d"), "type 'Conv9d'"),
    (lambda m: _set(m, "stem.0", "type", "Linear"), "states"),
    (lambda m: _set(m, "fc", "groups", 2), "expected exactly"),
    (lambda m: _set(m, "stem.0", "groups", 5), "impossible Conv2d geometry"),
    (lambda m: _set(m, "stem.1", "eps", "tiny"), "eps='tiny', which is not a valid value"),
    (lambda m: _set(m, "fc", "bias", 1), "bias=1"),
    (lambda m: _set(m, "stem.0", "kernel_size", [3, "x"]), "kernel_size="),
    (lambda m: m["modules"].pop("layer2.conv2"), "does not describe module 'layer2.conv2'"),
    (lambda m: m["modules"].update({"layer9.conv": m["modules"]["stem.0"]}), "does not have"),
    (lambda m: m.update(net="vgg-77"), "names network 'vgg-77'"),
    (lambda m: m.update(modules=[]), "must be JSON objects"),
    (lambda m: m.update(tensors={"stem.0.weight": [1]}), "not a bare parameter"),
])
def test_tampered_manifest_is_one_line_error(saved_resnet, change, needle):
    _tamper(saved_resnet, change)
    with pytest.raises(PrunekitError, match=needle) as error:
        prunekit.load(saved_resnet)
    assert "\n" not in str(error.value)


def test_a_failed_load_leaves_the_given_model_untouched(saved_resnet):
    _tamper(saved_resnet, lambda m: _set(m, "fc", "out_features", 11))
    fresh = nets.build_net("resnet-small", seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PrunekitError, match="'fc.weight' has shape"):
        prunekit.load(saved_resnet, model=fresh)
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(fresh.fc) is nn.Linear and fresh.fc.out_features == 10


def test_a_model_of_another_layout_is_refused(saved_resnet):
    swapped = nets.build_net("resnet-small")
    swapped.stem[0] = nn.Linear(1, 1)
    with pytest.raises(PrunekitError, match="has a Conv2d at 'stem.0', but ResNetSmall has a Linear"):
        prunekit.load(saved_resnet, model=swapped)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

    _tamper(saved_resnet, lambda m: m.update(modules={}, tensors={}))
    with pytest.raises(PrunekitError, match="missing \\['w'\\]"):
        prunekit.load(saved_resnet, model=Other())


def test_load_never_unpickles(saved_resnet, monkeypatch):
    assert sorted(p.name for p in saved_resnet.iterdir()) == ["model.safetensors", MANIFEST]

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    model, _, _ = prunekit.load(saved_resnet)
    assert isinstance(model, nets.ResNetSmall)


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(1, 2, 3))
    with pytest.raises(PrunekitError, match="subclass of Conv2d"):
        prunekit.save(model, None, tmp_path / "out", {})
    with pytest.raises(PrunekitError, match="the model itself is a Linear"):
        prunekit.save(nn.Linear(2, 2), None, tmp_path / "out", {})
    with pytest.raises(PrunekitError, match="tokenizer"):
        prunekit.save(nets.build_net("small-cnn"), object(), tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_hugging_face_directories_refuse_model_argument(tmp_path):
    from tiny_models import tiny_causal_lm

    prunekit.save(tiny_causal_lm("llama", layers=1), None, tmp_path / "hf", {"method": {"name": "none"}})
    with pytest.raises(PrunekitError, match="model= applies"):
        prunekit.load(tmp_path / "hf", model=nn.Linear(1, 1))


@pytest.mark.slow
def test_imagenet_mobilenet_v2_round_trip(tmp_path):
    from prunekit.assets import sample_image_crops

    images = sample_image_crops(8, seed=0)
    model = nets.mobilenet_v2_imagenet()
    record = prunekit.prune_structure(model, images[:1], method="l2", remove=0.3, progress=False)
    prunekit.save(model, None, tmp_path / "out", record)
    loaded, _, manifest = prunekit.load(tmp_path / "out")
    assert manifest["net"] == "mobilenet-v2"
    assert sum(p.numel() for p in loaded.parameters()) == record["metrics"]["parameters"]["after"]
    assert torch.equal(_out(loaded, images), _out(model, images))
