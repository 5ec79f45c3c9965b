"""train.cuda_graph: the network's training forward and backward replayed from a CUDA graph; train.compile: that
call through torch.compile (alone, or compiled and then graphed).

A small model's training step is bound by the host, not the GPU: Vim-T at 32x32 launches about 2,000 kernels a
step, which an H100 runs faster than Python issues them (BENCHMARKS.md: 1,907 images/s eager, 4,824 with the whole
step graphed). The task hands its network to `GraphedTraining` (classification: the model; MAE: encoder, decoder and
loss; CLIP: the image tower); the first training call captures the network's forward and backward once
(torch.cuda.make_graphed_callables) and later calls replay them. What is around it (the loss, Mixup, CLIP's text
tower and gathered loss, DeepSpeed's update, logging) stays eager.

What a graph freezes, and so what is refused or falls back:
- the input's shape: a call with another shape (or in evaluation, or without gradients) runs eagerly;
- host-side decisions inside the network: a module containing one whose `graph_safe` is False (Vim with
  bidir_mode=sequence, a host coin flip per batch) is refused; random numbers drawn on the GPU (drop path, MAE's
  masks) are fresh at every replay;
- gradient buffers: the replayed backward writes into the same buffers each step, so gradient accumulation over
  micro-steps (train.grad_accum > 1) is refused;
- DeepSpeed's gradient hooks: ZeRO-1/2's optimizer hooks run inside the backward being captured, which invalidates
  the capture (seen on 2 H100s: cudaErrorStreamCaptureImplicit), and ZeRO-3 gathers parameters inside the forward.
  So it needs ZeRO-0, where the engine's step is a plain PyTorch step (engine/deepspeed_setup.py), on one GPU or
  several: the all-reduce of several ranks runs after the replayed backward, outside the graph (MAE on 2 H100s:
  the eager run's loss, 1.36x the images/s; BENCHMARKS.md).

train.compile wraps the same call in torch.compile (Vim's Triton kernels are custom operators in its graph, see
kernels/): it fuses the network's elementwise work, needs none of the graph's conditions above but ZeRO-3's (which
gathers parameters in hooks inside the forward), and costs a compile of a minute or less at the first call and at
each new input shape. Evaluation stays eager.
"""
import torch
import torch.nn as nn

__all__ = ["GraphedTraining", "check_cuda_graph", "check_compile"]


class _Method(nn.Module):
    """module.method(x) as a module's forward: make_graphed_callables graphs modules, and collects the
    parameters whose gradients the replayed backward returns from the module it is given."""

    def __init__(self, module, method):
        super().__init__()
        self.inner = module
        self.method = method

    def forward(self, x):
        return getattr(self.inner, self.method)(x)


class GraphedTraining:
    """Calls module.method(x); while the module trains with gradients enabled, through a CUDA graph captured from
    the first such call's input, replayed for every later input of the same shape, dtype and device, and / or
    through torch.compile. Other calls (evaluation, no gradients) run eagerly.

    capture: the capturing function (torch.cuda.make_graphed_callables; the tests pass a stand-in on the CPU), or
        None for no graph.
    compile: the training call goes through torch.compile (before capture, when there is one).
    """

    def __init__(self, module, method="forward", capture=torch.cuda.make_graphed_callables, compile=False):
        # models.VisionMamba's flag, wherever the Vim sits in the module (classifier, MAE encoder, CLIP image tower)
        unsafe = [m for m in module.modules() if not getattr(m, "graph_safe", True)]
        if unsafe and capture is not None:
            raise ValueError(f"train.cuda_graph: this {type(unsafe[0]).__name__} decides on the host per batch "
                             f"(bidir_mode=sequence), which a CUDA graph would freeze: turn one of the two off")
        self.module = module
        self.method = method
        self.call = _Method(module, method)
        if compile:
            self.call = torch.compile(self.call)
        self.capture = capture
        self.graphed = None
        self.signature = None

    def __call__(self, x):
        eager = getattr(self.module, self.method)
        if not (self.module.training and torch.is_grad_enabled()):
            return eager(x)
        if self.capture is None:
            return self.call(x)
        signature = (tuple(x.shape), x.dtype, x.device)
        if self.graphed is None:
            self.signature = signature
            # allow_unused_input: the method may use only part of the module (CLIP's image tower), whose other
            # parameters then get no gradient from the replay
            self.graphed = self.capture(self.call, (x.detach(),), allow_unused_input=True)
        if signature != self.signature:
            return eager(x)
        return self.graphed(x)


def check_cuda_graph(module, device, zero_stage, grad_accum):
    """Raise ValueError, naming the setting, where train.cuda_graph cannot work."""
    if device.type != "cuda":
        raise ValueError(f"train.cuda_graph needs a CUDA device, not {device.type}")
    if not hasattr(module, "graph_network"):
        raise ValueError(f"train.cuda_graph: {type(module).__name__} has no network to graph (classification, "
                         f"MAE and CLIP have one)")
    if zero_stage != 0:
        raise ValueError(f"train.cuda_graph needs ZeRO stage 0, got stage {zero_stage} (its gradient hooks run inside "
                         f"the captured backward): use deepspeed=configs/deepspeed/zero0.json or turn it off")
    if grad_accum > 1:
        raise ValueError(f"train.cuda_graph needs train.grad_accum 1, got {grad_accum} (the replayed backward "
                         f"reuses its gradient buffers every micro-step)")


def check_compile(module, zero_stage):
    """Raise ValueError, naming the setting, where train.compile cannot work."""
    if not hasattr(module, "graph_network"):
        raise ValueError(f"train.compile: {type(module).__name__} has no network to compile (classification, MAE and "
                         f"CLIP have one)")
    if zero_stage == 3:
        raise ValueError("train.compile does not support ZeRO stage 3 (it gathers parameters in hooks inside the "
                         "forward): use ZeRO 0-2 or turn it off")
