"""ViTAEv2: parameter counts and numerics of the released implementation, input sizes, layout,
loading RGB checkpoints into the gray model, attention maps, training mode, torch.compile."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dinocxr_fast.models import CONFIGS, ViTAEv2, convert_reference_state_dict, create_model, list_models
from dinocxr_fast.models.cells import pcm_strides
from dinocxr_fast.models.vitaev2 import VITAEV2_S_PCM_SHAPES

FIXTURE = Path(__file__).parent / "fixtures" / "vitaev2_tiny_parity.safetensors"

# Counted on the released implementation (ViTAE-Transformer/ViTAE-Transformer,
# Image-Classification/vitaev2) with in_chans=3, num_classes=1000; the paper rounds S to 19.2M.
REFERENCE_PARAMS = {"vitaev2_s": 19_355_688, "vitaev2_48m": 48_674_632, "vitaev2_b": 89_693_352}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny() -> ViTAEv2:
    torch.manual_seed(0)
    return create_model("vitaev2_tiny").eval()


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_equals_the_reference(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000, in_chans=3)
    assert _n_params(model) == REFERENCE_PARAMS[name]


def test_tiny_has_a_few_hundred_thousand_parameters(tiny):
    assert 100_000 < _n_params(tiny) < 1_000_000
    assert set(list_models()) == {"vitaev2_s", "vitaev2_48m", "vitaev2_b", "vitaev2_tiny"}


def test_s_config_is_the_papers():
    c = CONFIGS["vitaev2_s"]
    assert c.token_dims == (64, 128, 256, 512) and c.embed_dims == (64, 64, 128, 256)
    assert c.depths == (2, 2, 8, 2) and c.num_heads == (1, 2, 4, 8) and c.reduction_heads == (1, 1, 2, 4)
    assert c.groups == (1, 32, 64, 128) and c.reduction_groups == (1, 16, 32, 64)
    assert c.window_size == 7 and c.window_stages == (True, True, False, False)
    assert c.kernel_sizes == (7, 3, 3, 3) and c.dilations == ((1, 2, 3, 4), (1, 2, 3), (1, 2), (1, 2))


def _load_fixture():
    from safetensors.torch import safe_open  # noqa: PLC0415

    tensors, state = {}, {}
    with safe_open(str(FIXTURE), framework="pt") as f:
        meta = f.metadata()
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    for key, t in tensors.items():
        kind, _, name = key.partition("::")
        if kind == "q":  # int8 grid with a power-of-two scale: exact in fp32
            state[name] = t.float() * tensors[f"scale::{name}"]
        elif kind == "raw":
            state[name] = t
    return meta, tensors["input"], tensors["output"], state


def test_parity_with_the_reference_fixture():
    """Output of the released implementation on the same weights (tests/models/fixtures/make_vitaev2_parity.py)."""
    meta, images, expected, state = _load_fixture()
    model = create_model(meta["model"], num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = model.eval()(images)
    assert FIXTURE.stat().st_size < 500_000
    assert images.shape[-1] % 7 != 0  # the stage-1 and stage-2 grids are padded for the windows
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (96, 64), (128, 128)])
def test_any_multiple_of_32_at_call_time(tiny, size):
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        tokens = tiny.forward_tokens(x)
        features = tiny.forward_features(x)
    assert tokens.shape == (2, size[0] // 32, size[1] // 32, 64)
    torch.testing.assert_close(features, tokens.mean(dim=(1, 2)))
    assert tiny(x).shape == (2, 64)  # num_classes=0: the features


def test_tokens_stay_channels_last_between_cells(tiny):
    shapes = []

    def record(_module, _inputs, out):
        assert out.is_contiguous(), "a cell handed on a non-contiguous B x H x W x C tensor"
        shapes.append(tuple(out.shape))

    cells = [stage.reduction for stage in tiny.stages] + [c for stage in tiny.stages for c in stage.cells]
    handles = [c.register_forward_hook(record) for c in cells]
    try:
        with torch.no_grad():
            tiny(torch.randn(1, 1, 64, 64))
    finally:
        for h in handles:
            h.remove()
    assert (1, 16, 16, 16) in shapes and (1, 2, 2, 64) in shapes
    assert all(len(s) == 4 for s in shapes)


def test_batch_elements_are_independent(tiny):
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        together = tiny(x)
        alone = torch.cat([tiny(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(1, 1, 48, 64), "multiples of 32"),
        (torch.randn(1, 3, 64, 64), "channels"),
        (torch.randn(1, 64, 64), "B x C x H x W"),
    ],
)
def test_bad_images_raise_value_error(tiny, x, match):
    with pytest.raises(ValueError, match=match):
        tiny(x)


def test_create_model_rejects_unknown_names_and_overrides():
    with pytest.raises(ValueError, match="name"):
        create_model("vitaev2_huge")
    with pytest.raises(ValueError, match="overrides"):
        create_model("vitaev2_tiny", depth=3)
    assert create_model("vitaev2_tiny", drop_path_rate=0.2).config.drop_path_rate == 0.2


def test_rgb_state_dict_loads_into_gray_model_by_summing_the_stem():
    torch.manual_seed(1)
    rgb = create_model("vitaev2_tiny", in_chans=3).eval()
    gray = create_model("vitaev2_tiny", in_chans=1).eval()
    gray.load_state_dict(rgb.state_dict(), strict=True)
    for name in gray.stem_weight_names():
        torch.testing.assert_close(gray.state_dict()[name], rgb.state_dict()[name].sum(1, keepdim=True))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # a gray image replicated to RGB is what the summed kernels see
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_last_selfattention_maps(tiny):
    x = torch.randn(2, 1, 96, 64)
    maps = tiny.get_last_selfattention(x)
    heads = CONFIGS["vitaev2_tiny"].num_heads[-1]
    assert maps.shape == (2, heads, 6, 6)  # 3 x 2 tokens at stride 32
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, heads, 6))


def test_training_step_updates_everything_and_drop_path_is_stochastic():
    torch.manual_seed(0)
    model = create_model("vitaev2_tiny", num_classes=4, drop_path_rate=0.3).train()
    bn = model.stages[1].cells[0].pcm.conv1.bn
    before = bn.running_mean.clone()
    x = torch.randn(4, 1, 64, 64)
    out = model(x)
    out.square().mean().backward()
    assert not torch.equal(before, bn.running_mean) and int(bn.num_batches_tracked) == 1
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing[:5]}"
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # stochastic depth in training
        model.eval()
        torch.testing.assert_close(model(x), model(x))


def test_frozen_batchnorm_keeps_its_statistics_in_a_training_model():
    torch.manual_seed(0)
    model = create_model("vitaev2_tiny").train()
    bn = model.stages[0].cells[0].pcm.conv2.bn
    bn.eval()
    before = (bn.running_mean.clone(), bn.running_var.clone())
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert torch.equal(before[0], bn.running_mean) and torch.equal(before[1], bn.running_var)
    assert int(bn.num_batches_tracked) == 0


def test_drop_path_schedules():
    c = dataclasses.replace(CONFIGS["vitaev2_s"], drop_path_rate=0.13)
    rates = c.drop_path_rates()
    assert [len(r) for r in rates] == [2, 2, 8, 2]
    flat = [r for stage in rates for r in stage]
    assert flat[0] == 0.0 and flat[-1] == pytest.approx(0.13) and flat == sorted(flat)
    # The release slices from the previous stage's depth: stage 3 restarts at cell index 2.
    ref = dataclasses.replace(c, drop_path_schedule="reference").drop_path_rates()
    assert ref[:2] == rates[:2] and ref[2] == flat[2:10] and ref[3] == flat[8:10]


def test_pcm_strides_spread_the_downsampling():
    assert pcm_strides(4) == (2, 2, 1) and pcm_strides(2) == (2, 1, 1) and pcm_strides(1) == (1, 1, 1)
    with pytest.raises(ValueError):
        pcm_strides(3)


def test_reference_names_map_to_ours():
    ref_keys = {
        "layers.0.RC.PRM.convs.3.0.weight": "stages.0.reduction.prm.convs.3.conv.weight",
        "layers.0.RC.PCM.4.running_var": "stages.0.reduction.pcm.conv2.bn.running_var",
        "layers.1.RC.PCM.6.bias": "stages.1.reduction.pcm.conv3.conv.bias",
        "layers.0.RC.attn.attn.qkv.weight": "stages.0.reduction.attn.qkv.weight",
        "layers.2.RC.attn.norm2.bias": "stages.2.reduction.norm2.bias",
        "layers.3.RC.attn.mlp.fc1.weight": "stages.3.reduction.mlp.fc1.weight",
        "layers.2.NC.7.PCM.0.weight": "stages.2.cells.7.pcm.conv1.conv.weight",
        "layers.2.NC.7.attn.proj.bias": "stages.2.cells.7.attn.proj.bias",
        "layers.1.NC.0.norm1.weight": "stages.1.cells.0.norm1.weight",
        "head.weight": "head.weight",
    }
    dummy = torch.zeros(1)
    state = {k: dummy for k in ref_keys} | {"layers.0.NC.0.attn.relative_position_index": dummy}
    assert convert_reference_state_dict(state) == {v: dummy for v in ref_keys.values()}
    # And every name of ours is one the mapping can produce (same module tree as the release).
    with torch.device("meta"):
        ours = create_model("vitaev2_s", num_classes=1000, in_chans=3).state_dict().keys()
    assert set(ref_keys.values()) - {"head.weight"} <= set(ours)


def test_torch_compile_smoke(tiny):
    """torch.compile (inductor, CPU) of vitaev2_tiny runs, in one graph, and matches eager.

    About a minute on a 2-core runner, nearly all of it compiling ~64 C++ kernels; scalar kernels
    (simdlen=1) roughly halve that, and vectorisation is not what this checks.
    """
    import torch._dynamo  # noqa: PLC0415
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    torch._dynamo.reset()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad(), inductor_config.patch({"cpp.simdlen": 1}):
        eager = tiny(x)
        compiled = torch.compile(tiny, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_the_pcm_shape_table_is_the_models():
    """VITAEV2_S_PCM_SHAPES (what kernel tests and bench_pcm run) is every PCM vitaev2_s holds at 224 px."""
    from dinocxr_fast.models.layers import ParallelConv  # noqa: PLC0415

    model = create_model("vitaev2_s").eval()
    seen = set()

    def record(module, inputs):
        convs = [module.conv1.conv, module.conv2.conv, module.conv3.conv]
        seen.add((convs[0].in_channels, *(c.out_channels for c in convs), convs[0].groups,
                  tuple(c.stride[0] for c in convs), inputs[0].shape[-2]))  # B x H x W x C

    for module in model.modules():
        if isinstance(module, ParallelConv):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.zeros(1, 1, 224, 224))
    assert seen == set(VITAEV2_S_PCM_SHAPES.values())
