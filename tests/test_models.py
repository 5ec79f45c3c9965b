"""The Vim family: sizes, public parameter names, checkpoint loading, pos-embed resizing, forward passes."""
import pytest
import timm
import torch
import torch.nn.functional as F

import models
from kernels import selective_scan_ref
from models import load_checkpoint, resize_pos_embed
from models.vim import MambaMixer

EXPECTED = {  # (params at stride 16 or 8, D, E, depth): VIM_SPEC
    "vim_tiny_patch16_224": (7_148_008, 192),
    "vim_small_patch16_224": (25_796_584, 384),
    "vim_base_patch16_224": (97_598_440, 768),
    "vim_tiny_patch16_stride8_224": (7_250_344, 192),
    "vim_small_patch16_stride8_224": (26_001_256, 384),
}


def public_shapes(D, depth=24, N=16, M=196, classes=1000):
    """Parameter names and shapes of the public reference checkpoints (VIM_SPEC)."""
    E, R = 2 * D, -(-D // 16)
    shapes = {"patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,), "cls_token": (1, 1, D),
              "pos_embed": (1, M + 1, D), "norm_f.weight": (D,), "head.weight": (classes, D), "head.bias": (classes,)}
    for i in range(depth):
        p = f"layers.{i}."
        shapes[p + "norm.weight"] = (D,)
        shapes[p + "mixer.in_proj.weight"] = (2 * E, D)
        shapes[p + "mixer.out_proj.weight"] = (D, E)
        for s in ("", "_b"):
            shapes[p + f"mixer.conv1d{s}.weight"] = (E, 1, 4)
            shapes[p + f"mixer.conv1d{s}.bias"] = (E,)
            shapes[p + f"mixer.x_proj{s}.weight"] = (R + 2 * N, E)
            shapes[p + f"mixer.dt_proj{s}.weight"] = (E, R)
            shapes[p + f"mixer.dt_proj{s}.bias"] = (E,)
            shapes[p + f"mixer.D{s}"] = (E,)
        shapes[p + "mixer.A_log"] = (E, N)
        shapes[p + "mixer.A_b_log"] = (E, N)
    return shapes


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count_and_names(name):
    model = timm.create_model(name)
    count, D = EXPECTED[name]
    assert sum(p.numel() for p in model.parameters()) == count
    M = 196 if "stride8" not in name else 729
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == public_shapes(D, M=M)


def test_public_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    state = {k: torch.randn(s) for k, s in public_shapes(192, depth=2).items()}
    path = tmp_path / "vim_t_public.pth"
    torch.save({"model": state, "epoch": 299}, path)
    model = timm.create_model("vim_tiny_patch16_224", depth=2)
    assert load_checkpoint(model, path) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # through timm's own pretrained path too
    model2 = timm.create_model("vim_tiny_patch16_224", depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model2.pos_embed, state["pos_embed"])


def test_checkpoint_mismatch_names_keys(tmp_path):
    state = public_shapes(192, depth=2)
    state = {k: torch.zeros(s) for k, s in state.items() if k != "layers.1.mixer.D_b"}
    state["layers.0.mixer.x_proj.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    model = timm.create_model("vim_tiny_patch16_224", depth=2)
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, path)
    msg = str(err.value)
    assert "layers.1.mixer.D_b" in msg and "layers.0.mixer.x_proj.weight" in msg and "(3, 3)" in msg
    assert "extra.weight" in msg


def test_checkpoint_missing_file_and_pickle_safety(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(timm.create_model("vim_tiny_patch16_224", depth=1), tmp_path / "nope.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": Evil()}}, path)
    with pytest.raises(Exception):
        load_checkpoint(timm.create_model("vim_tiny_patch16_224", depth=1), path)


def test_pos_embed_resize_keeps_middle_class_token():
    D = 8
    pos = torch.randn(1, 14 * 14 + 1, D)
    pos[:, 98] = 1000.0  # the class slot, recognisable
    new = resize_pos_embed(pos, (27, 27))
    assert new.shape == (1, 27 * 27 + 1, D)
    assert torch.all(new[:, 729 // 2] == 1000.0)
    others = torch.cat([new[:, :364], new[:, 365:]], dim=1)
    assert others.abs().max() < 100.0  # the class slot did not leak into the grid
    same = resize_pos_embed(pos, (14, 14))
    assert torch.equal(same, pos)


def test_resized_checkpoint_loads_into_stride8(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vim_tiny_patch16_224", depth=2)
    path = tmp_path / "t.safetensors"
    from safetensors.torch import save_file
    save_file(src.state_dict(), str(path))
    dst = timm.create_model("vim_tiny_patch16_stride8_224", depth=2)
    load_checkpoint(dst, path)
    assert torch.equal(dst.pos_embed[:, dst.cls_index], src.pos_embed[:, src.cls_index])
    assert torch.equal(dst.layers[1].mixer.A_b_log, src.layers[1].mixer.A_b_log)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_at_224_and_at_another_size(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    small = timm.create_model(name, img_size=96, depth=2, num_classes=7).eval()
    with torch.no_grad():
        feats = small.forward_features(torch.randn(2, 3, 96, 96))
    grid = (96 - 16) // small.patch_embed.proj.stride[0] + 1
    assert feats.shape == (2, grid * grid + 1, small.embed_dim)
    assert small.forward_head(feats).shape == (2, 7)


def test_forward_other_size_gradients_and_grad_checkpointing():
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=64, patch_size=8, stride=8, depth=3, num_classes=10,
                              drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    out = model(x)
    assert out.shape == (2, 10)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    model.set_grad_checkpointing(True)
    assert torch.allclose(model(x), out, atol=1e-6)
    feats = model.forward_features(x)
    assert feats.shape == (2, 65, 192)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 192)


def test_timm_api_hooks():
    model = timm.create_model("vim_small_patch16_224", depth=2)
    assert model.num_features == 384
    nwd = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.1.mixer.A_b_log", "layers.0.mixer.D_b"} <= nwd
    model.reset_classifier(7)
    assert model.head.out_features == 7
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(model, 0.05, no_weight_decay_list=nwd, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]  # stem, layer 0, layer 1, final norm + head


def test_mixer_reference_initialisation():
    model = timm.create_model("vim_tiny_patch16_224", depth=2)
    mixer = model.layers[0].mixer
    for bias in (mixer.dt_proj.bias, mixer.dt_proj_b.bias):   # softplus(bias) in [1e-3, 1e-1]
        dt = torch.nn.functional.softplus(bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0
    assert torch.allclose(mixer.A_b_log[0], torch.log(torch.arange(1, 17.0)))
    assert torch.equal(mixer.D_b, torch.ones(384))
    assert model.head.bias.abs().max() == 0


def mixer_oracle(mixer, hidden_states):
    """The v2 mixer as the public reference computes it: per direction an nn.Conv1d on the (flipped)
    channel-major sequence, separate projections and one selective scan, then the gate and the average."""
    N, R = mixer.d_state, mixer.dt_rank
    x, z = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    L = x.shape[-1]
    ys = []
    for suffix, reverse in (("", False), ("_b", True)):
        conv, x_proj, dt_proj = (getattr(mixer, n + suffix) for n in ("conv1d", "x_proj", "dt_proj"))
        A_log, D = getattr(mixer, ("A_log", "A_b_log")[reverse]), getattr(mixer, "D" + suffix)
        xi = x.flip(-1) if reverse else x
        u = F.silu(conv(xi)[..., :L])
        dt_low, B, C = x_proj(u.transpose(1, 2)).split([R, N, N], dim=-1)
        delta = (dt_low @ dt_proj.weight.t()).transpose(1, 2)
        y = selective_scan_ref(u, delta, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, dt_proj.bias,
                               reverse=False)
        ys.append(y.flip(-1) if reverse else y)
    y = F.silu(z) * (ys[0] + ys[1]) / 2
    return mixer.out_proj(y.transpose(1, 2).to(hidden_states.dtype))


@pytest.mark.parametrize("backend,save_states", [("reference", True), ("triton", True), ("triton", False)])
def test_mixer_equals_the_plain_reference_computation(backend, save_states):
    torch.manual_seed(0)
    dtype = torch.float64 if backend == "reference" else torch.float32
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # else Triton's interpreter
    mixer = MambaMixer(24, d_state=8, scan_backend=backend, scan_save_states=save_states).to(device, dtype)
    mixer.init_weights()
    h = torch.randn(2, 11, 24, dtype=dtype, device=device, requires_grad=True)
    out = mixer(h)
    expected = mixer_oracle(mixer, h)
    # the reference scan is log-depth (cumulative sums of logs): about 1e-8 relative from a sequential loop in fp64
    tol = dict(rtol=1e-6, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    g = torch.randn_like(out)
    params = [h, *mixer.parameters()]
    grads = torch.autograd.grad(out, params, g)
    expected_grads = torch.autograd.grad(expected, params, g)
    for (name, _), a, b in zip([("input", None), *mixer.named_parameters()], grads, expected_grads):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_formula_in_fp32(dtype):
    torch.manual_seed(0)
    norm = models.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    # mean(x^2) ~ 1e-5 = eps: the test sees whether eps is added where the formula adds it
    x = (torch.randn(3, 7, 24) * 3e-3).to(dtype).requires_grad_()
    out = norm(x)
    assert out.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (x, norm.weight), g.float())
    expected_grads = torch.autograd.grad(expected, (x64, w64), g)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a.double(), b.to(a.dtype).double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_general_mixer_path_equals_the_v2_path():
    # the same pair of directions listed the other way round goes through the general path (per-direction convs,
    # multidirectional_scan); its parameters have the same names, and the average over directions is symmetric
    torch.manual_seed(0)
    general = MambaMixer(24, d_state=8, directions=("row_reverse", "row"), scan_backend="reference").double()
    general.init_weights()
    v2 = MambaMixer(24, d_state=8, scan_backend="reference").double()
    v2.load_state_dict(general.state_dict())
    h = torch.randn(2, 11, 24, dtype=torch.float64, requires_grad=True)
    out, expected = general(h), v2(h)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8)
    g = torch.randn_like(out)
    names = [n for n, _ in general.named_parameters()]          # created in another order than v2's: match by name
    v2_params = dict(v2.named_parameters())
    grads = torch.autograd.grad(out, [h, *general.parameters()], g)
    expected_grads = torch.autograd.grad(expected, [h, *(v2_params[n] for n in names)], g)
    for name, a, b in zip(["input", *names], grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=lambda m: f"gradient of {name}: {m}")
