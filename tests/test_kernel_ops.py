"""The Triton kernels as torch.library custom operators: registration checks and torch.compile over them.

torch.compile cannot trace the Triton launchers (inline assembly, register caps, host-side chunking), so each kernel
call is a custom operator with a fake (shapes and strides only) and an autograd formula. opcheck verifies those
against the real op; the compile test traces a whole Vim on the Triton backend into one graph (fullgraph: no graph
break) and checks it against eager. Runs on CPU through Triton's interpreter, like the other kernel tests.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import interpreted_kernel_modules  # noqa: E402

st, mt, ct = interpreted_kernel_modules("kernels.scan_triton", "kernels.scan_multidir_triton", "kernels.conv_triton")


def _scan_inputs(K=2, batch=2, E=8, L=9, N=4, grad=True):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(K, batch, E, L, generator=g), torch.randn(K, batch, E, L, generator=g) * 0.5 - 1.0,
          -torch.rand(K, E, N, generator=g) - 0.5, torch.randn(K, batch, N, L, generator=g),
          torch.randn(K, batch, N, L, generator=g), torch.randn(K, E, generator=g), torch.randn(batch, E, L, generator=g),
          torch.randn(K, E, generator=g) * 0.3]
    return [x.requires_grad_(grad) for x in xs]


def test_scan_op_registration():
    """Schema, fake tensors (shapes and strides of every output), autograd registration, and the op under
    AOTAutograd with dynamic shapes; chunked, with the backward's states saved (an output) or the chunk start
    states only, and without saving."""
    torch.library.opcheck(st._scan_op, (*_scan_inputs(), 4, None, True, True))
    torch.library.opcheck(st._scan_op, (*_scan_inputs(), 4, None, True, False))
    torch.library.opcheck(st._scan_op, (*_scan_inputs(grad=False), None, None, False, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_multidirectional_scan_op_registration():
    K, L = 3, 9
    orders = torch.stack([torch.arange(L), torch.arange(L).flip(0), torch.randperm(L)])
    torch.library.opcheck(mt._scan_op, (*_scan_inputs(K=K, L=L), orders, 4, None, True))


def test_conv_op_registration():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 40, generator=g).requires_grad_()
    weight, bias = torch.randn(2, 40, 4, generator=g).requires_grad_(), torch.randn(2, 40, generator=g).requires_grad_()
    torch.library.opcheck(ct._conv_op, (x, weight, bias, None))


def test_scan_op_backward_needs_saved_forward():
    """The forward run without `save` keeps nothing for a backward: asking for one is a clear error."""
    xs = _scan_inputs()
    out = st._scan_op(*xs, None, None, False, True)[0]
    with pytest.raises(RuntimeError, match="save=False"):
        out.sum().backward()


def test_compiled_vim_matches_eager():
    """A whole Vim on the Triton backend compiles into one graph (the kernels as opaque ops) and gives eager's
    output and gradients."""
    import timm

    import models  # noqa: F401  (registers the Vim models)
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=16, patch_size=8, stride=8, embed_dim=16, depth=2,
                              num_classes=10, scan_backend="triton")
    images = torch.randn(2, 3, 16, 16)

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        out = forward(images)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_eager, grads_eager = loss_and_grads(model)
    torch._dynamo.reset()
    out_compiled, grads_compiled = loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-5, msg=name)
