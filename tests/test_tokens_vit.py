"""Token merging and pruning installed on prunekit's small vision transformer."""

import pytest
import torch

from prunekit import tokens
from prunekit.errors import PrunekitError
from prunekit.measure import weights_sha256
from prunekit.nets import VisionTransformer


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def vit(patch: int = 4, depth: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(patch=patch, dim=32, depth=depth, heads=4).eval()


def images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("method", tokens.ENCODER_METHODS)
def test_no_reduction_is_bit_identical_and_remove_restores(method):
    model, x = vit(), images()
    dense, sha = run(model, x), weights_sha256(model)
    handle = tokens.apply(model, method, r=0)
    assert torch.equal(run(model, x), dense)
    handle.remove()
    handle = tokens.apply(model, method, r=4)
    reduced = run(model, x)
    assert not torch.equal(reduced, dense)
    assert handle.kept[:, 0].tolist() == [46, 42, 38, 34]  # 49 patches + CLS, 4 fewer per block
    handle.remove()
    assert weights_sha256(model) == sha
    assert torch.equal(run(model, x), dense)
    assert all("forward" not in vars(block) for block in model.blocks)


def test_tome_sizes_and_source_on_patches():
    model, x = vit(patch=7, depth=3), images()
    handle = tokens.apply(model, "tome", r=3)
    run(model, x)
    assert handle.sizes.shape == (3, 17 - 9)
    assert (handle.sizes.sum(1) == 17).all()
    source = handle.source
    assert (source.sum(1) == 1).all()  # every patch (and CLS) in exactly one token
    assert source[:, 0, 0].all() and (source[:, 0].sum(1) == 1).all()  # CLS never merged


def test_keep_fraction_on_vit():
    model, x = vit(), images()
    handle = tokens.apply(model, "cls-attention", keep=0.5)
    run(model, x)
    assert handle.kept[-1].tolist() == [25, 25, 25]


def test_merging_identical_patches_is_exact():
    # A constant image without position embeddings gives identical patch tokens: merging them with proportional
    # attention changes nothing.
    model = vit(depth=2)
    with torch.no_grad():
        model.pos_embed.zero_()
    x = torch.full((2, 1, 28, 28), 0.3)
    dense = run(model, x)
    handle = tokens.apply(model, "tome", r=20)
    torch.testing.assert_close(run(model, x), dense, atol=1e-5, rtol=1e-5)
    assert handle.kept[:, 0].tolist() == [30, 16]  # at most the unprotected A half: 20, then 14


def test_patch_size_must_tile_the_image():
    with pytest.raises(PrunekitError, match="patch size 5"):
        VisionTransformer(patch=5)


def last_block_tokens(model, x) -> torch.Tensor:
    captured = []
    hook = model.blocks[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    run(model, x)
    hook.remove()
    return captured[0]


def test_unmerge_maps_patch_tokens_back():
    model, x = vit(patch=7, depth=3), images()
    dense = last_block_tokens(model, x)
    handle = tokens.apply(model, "tome", r=0)
    assert torch.equal(handle.unmerge(last_block_tokens(model, x)), dense)  # nothing merged: the identity
    handle.remove()
    handle = tokens.apply(model, "tome", r=3)
    merged = last_block_tokens(model, x)
    unmerged = handle.unmerge(merged)
    assert merged.shape == (3, 8, 32) and unmerged.shape == (3, 17, 32)  # CLS and 16 patches, in their places
    owner = handle.owner
    for image in range(3):
        for position in range(17):
            assert torch.equal(unmerged[image, position], merged[image, owner[image, position]])
