"""msfast.models: torchvision-compatible trunks, MultiScaleResNet, backend parity."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randint_u8, randn

from msfast.models import MultiScaleResNet, ResNet, load_torchvision_weights

pytestmark = pytest.mark.usefixtures("one_thread")


# torchvision.models.resnet{18,34,50}(): parameter counts (1000 classes) and state_dict sizes
TV_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}
TV_KEYS = {18: 122, 34: 218, 50: 320}


def torchvision_trunk_keys(depth: int) -> set:
    """torchvision's ResNet state_dict keys without ``fc``, written from its naming scheme."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    convs = 3 if depth == 50 else 2

    def bn(p):
        return {f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var", f"{p}.num_batches_tracked"}

    keys = {"conv1.weight"} | bn("bn1")
    for stage, n in enumerate(blocks, 1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            for c in range(1, convs + 1):
                keys |= {f"{p}.conv{c}.weight"} | bn(f"{p}.bn{c}")
            if b == 0 and (stage > 1 or depth == 50):
                keys |= {f"{p}.downsample.0.weight"} | bn(f"{p}.downsample.1")
    return keys


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_trunk_has_torchvision_keys_and_sizes(depth):
    trunk = ResNet(depth)
    sd = trunk.state_dict()
    assert set(sd) == torchvision_trunk_keys(depth)
    assert len(sd) + 2 == TV_KEYS[depth]  # + fc.weight, fc.bias
    n = sum(p.numel() for p in trunk.parameters()) + trunk.out_channels * 1000 + 1000
    assert n == TV_PARAMS[depth]
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert trunk.out_channels == (2048 if depth == 50 else 512)


@pytest.mark.parametrize("depth,stem,size,out_hw", [(18, "large", 64, 2), (34, "small", 16, 2), (50, "small", 8, 1)])
def test_trunk_shapes(depth, stem, size, out_hw, gen):
    trunk = ResNet(depth, width=4, stem=stem, in_channels=2)
    y = trunk(randn(gen, 2, 2, size, size))
    assert y.shape == (2, trunk.out_channels, out_hw, out_hw)
    assert trunk.out_channels == 4 * 8 * (4 if depth == 50 else 1)


def _fake_fc(sd, out_channels):
    return dict(sd, **{"fc.weight": torch.randn(7, out_channels), "fc.bias": torch.randn(7)})


def test_load_weights_from_state_dict_and_file(tmp_path, gen):
    src = ResNet(18).eval()
    for p in src.state_dict().values():  # non-trivial BatchNorm statistics too
        if p.dtype.is_floating_point:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1 if p.ndim == 1 else 0))
    path = tmp_path / "resnet18.pth"
    torch.save(_fake_fc(src.state_dict(), 512), path)
    x = randn(gen, 2, 3, 64, 64)
    for weights in (_fake_fc(src.state_dict(), 512), str(path), src):
        dst = ResNet(18).eval()
        unused = load_torchvision_weights(dst, weights)
        assert unused == ([] if isinstance(weights, torch.nn.Module) else ["fc.bias", "fc.weight"])
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    for shared in (False, True):
        model = MultiScaleResNet(5, depth=18, scales=(1, 0.5), shared=shared)
        load_torchvision_weights(model, str(path))
        assert len(model.trunks) == (1 if shared else 2)
        for trunk in model.trunks:
            for k, v in trunk.state_dict().items():
                # a shared trunk's running statistics: one row per level, each torchvision's
                assert torch.equal(v, src.state_dict()[k].expand_as(v)), k


def test_load_weights_errors(tmp_path):
    sd = ResNet(18).state_dict()
    with pytest.raises(ValueError, match="width=64"):
        load_torchvision_weights(ResNet(18, width=32), sd)
    with pytest.raises(ValueError, match="stem='large'"):
        load_torchvision_weights(ResNet(18, stem="small"), sd)
    with pytest.raises(ValueError, match="depth-34 trunk: missing keys"):
        load_torchvision_weights(ResNet(34), sd)
    with pytest.raises(FileNotFoundError, match="weights"):
        load_torchvision_weights(ResNet(18), str(tmp_path / "missing.pth"))
    with pytest.raises(TypeError, match="model"):
        load_torchvision_weights(torch.nn.Linear(2, 2), sd)


def test_load_torchvision_model():
    tv = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(0)
    for depth, ctor in ((18, tv.models.resnet18), (50, tv.models.resnet50)):
        ref = ctor(weights=None).eval()
        for p in ref.state_dict().values():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1 if p.ndim == 1 else 0))
        trunk = ResNet(depth).eval()
        assert load_torchvision_weights(trunk, ref.state_dict()) == ["fc.bias", "fc.weight"]
        x = randn(gen, 2, 3, 64, 64)
        features = torch.nn.Sequential(*list(ref.children())[:-2])  # everything before avgpool and fc
        torch.testing.assert_close(trunk(x), features(x), rtol=1e-5, atol=1e-5)


def _pair(**kw):
    torch.manual_seed(0)
    fast = MultiScaleResNet(**kw)
    slow = copy.deepcopy(fast)
    slow.backend = "torch"
    assert fast.backend == "msfast" and slow.pyramid.backend == slow.concat.backend == "torch"
    return fast, slow


def _check_same(fast, slow, x, rtol, atol, grad_rtol, grad_atol):
    a, b = fast(x), slow(x)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(a.dtype)
    (a * w).sum().backward()
    (b * w).sum().backward()
    pb = dict(slow.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None and pb[name].grad is not None, name
        torch.testing.assert_close(p.grad, pb[name].grad, rtol=grad_rtol, atol=grad_atol, msg=name)
    for name, buf in fast.named_buffers():  # BatchNorm statistics updated alike
        torch.testing.assert_close(buf, dict(slow.named_buffers())[name], rtol=rtol, atol=atol)
    return a


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-scale"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backends_same_logits_and_gradients_float32(shared, layout, gen):
    fast, slow = _pair(num_classes=5, depth=18, width=4, stem="small", scales=(1, 0.5, 0.25), in_channels=3,
                       shared=shared)
    x = randn(gen, 4, 3, 20, 24, channels_last=layout == "channels_last")
    if layout == "channels_last":
        fast, slow = fast.to(memory_format=torch.channels_last), slow.to(memory_format=torch.channels_last)
    logits = _check_same(fast, slow, x, 1e-4, 1e-4, 1e-3, 1e-4)
    assert logits.shape == (4, 5) and logits.std() > 0


def test_backends_same_logits_and_gradients_float64(gen):
    fast, slow = _pair(num_classes=3, depth=50, width=2, stem="large", scales=(1, 0.6, 0.3), in_channels=3)
    fast, slow = fast.double(), slow.double()
    _check_same(fast, slow, randn(gen, 3, 3, 40, 36, dtype=torch.float64), 1e-10, 1e-10, 1e-8, 1e-9)


def test_backends_same_eval_logits_uint8_images(gen):
    # uint8 NHWC images viewed as NCHW, normalized inside the pyramid; BatchNorm in eval mode
    kw = dict(num_classes=4, depth=18, width=4, stem="small", scales=(1, 0.5), in_channels=3,
              mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    fast, slow = _pair(**kw)
    for m in (fast, slow):  # a few training batches first, so that eval uses real statistics
        m.train()
        m(randint_u8(gen, 8, 16, 16, 3).permute(0, 3, 1, 2))
    slow.load_state_dict(fast.state_dict())
    fast.eval()
    slow.eval()
    x = randint_u8(gen, 3, 16, 16, 3).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-4, atol=1e-4)


def test_backends_bfloat16_autocast(gen):
    fast, slow = _pair(num_classes=3, depth=18, width=4, stem="small", scales=(1, 0.5), in_channels=1)
    x = randn(gen, 2, 1, 16, 16)
    with torch.autocast("cpu", torch.bfloat16):
        a, b = fast(x), slow(x)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_fusion_at_finest_resolution_and_per_scale_trunks(gen):
    model = MultiScaleResNet(6, depth=18, width=4, stem="small", scales=(0.5, 1.0, 0.25), shared=False)
    assert len(model.trunks) == 3
    one = sum(p.numel() for p in model.trunks[0].parameters())
    assert sum(p.numel() for p in model.trunks.parameters()) == 3 * one
    seen = {}
    model.fusion.register_forward_hook(lambda m, i, o: seen.update({"in": i[0].shape}))  # returns None
    x = randn(gen, 2, 3, 32, 32)
    feats = model.features(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(2, 2), (4, 4), (1, 1)]
    assert model(x).shape == (2, 6)
    assert seen["in"] == (2, 3 * 32, 4, 4)  # the scale-1 level is the finest, wherever it is listed
    # the trunks differ: per-scale weights are separate parameters
    assert not torch.equal(model.trunks[0].conv1.weight, model.trunks[1].conv1.weight)


def test_shared_trunk_keeps_batchnorm_statistics_per_level(gen):
    # Shared weights, but each level's BatchNorm statistics: in eval mode the shared model is
    # the per-scale model whose trunk k holds the shared weights and level k's statistics.
    torch.manual_seed(0)
    kw = dict(num_classes=4, depth=18, width=4, stem="small", scales=(1, 0.5, 0.25), in_channels=1)
    shared = MultiScaleResNet(**kw)
    for _ in range(3):
        shared(randn(gen, 8, 1, 16, 16) * 2 + 1)
    bn = shared.trunks[0].layer2[0].bn1
    assert bn.running_mean.shape == (3, 8) and bn.num_batches_tracked == 9
    assert not torch.allclose(bn.running_mean[0], bn.running_mean[2])  # the levels differ
    per_scale = MultiScaleResNet(**kw, shared=False)
    sd = {}
    for k, v in shared.state_dict().items():
        if k.startswith("trunks.0."):
            for level in range(3):
                sd[f"trunks.{level}." + k[len("trunks.0."):]] = v[level] if v.ndim == 2 and "running" in k else v
        else:
            sd[k] = v
    per_scale.load_state_dict(sd)
    shared.eval()
    per_scale.eval()
    x = randn(gen, 3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), per_scale(x), rtol=1e-5, atol=1e-6)


def test_single_scale_and_other_input_sizes(gen):
    model = MultiScaleResNet(2, depth=18, width=4, stem="small", scales=[1], in_channels=1).eval()
    for h, w in ((8, 8), (37, 29)):
        assert model(randn(gen, 1, 1, h, w)).shape == (1, 2)


@pytest.mark.parametrize("kw,match", [
    (dict(depth=20), "depth"),
    (dict(scales=[]), "scales"),
    (dict(scales=[1, 0]), "scales"),
    (dict(scales=[1, float("nan")]), "scales"),
    (dict(scales="1,0.5"), "scales"),
    (dict(backend="cuda"), "backend"),
    (dict(stem="medium"), "stem"),
    (dict(width=0), "width"),
    (dict(num_classes=0), "num_classes"),
    (dict(mean=[0.5, 0.5]), "mean"),
])
def test_bad_arguments(kw, match):
    args = dict(num_classes=3, width=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        MultiScaleResNet(**args)


def test_bad_backend_switch():
    model = MultiScaleResNet(3, width=4, stem="small")
    with pytest.raises(ValueError, match="backend"):
        model.backend = "numpy"
