"""train.cuda_graph on CPU: when the wrapper captures, replays and falls back, what is refused, and that the tasks
route their training call through it. The capture itself needs a GPU (BENCHMARKS.md has the GPU runs); here a
stand-in capture returns a callable that counts its calls."""
import functools

import pytest
import timm
import torch

import run_finetune
from engine.cuda_graph import GraphedTraining, check_compile, check_cuda_graph
from finetune import Classifier
from helpers import TINY_MODEL, read_losses
from pretrain import MaskedAutoencoder
from test_clip import tiny_clip


def tiny_vim(**kwargs):
    return timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2,
                             **kwargs)


class StandIn:
    """Replaces make_graphed_callables: records what was captured and calls the captured module eagerly."""

    def __init__(self):
        self.captured = []
        self.calls = 0

    def __call__(self, module, sample_args, allow_unused_input=False):
        self.captured.append(tuple(sample_args[0].shape))

        def replay(x):
            self.calls += 1
            return module(x)
        return replay


def test_captures_once_replays_same_shape_and_falls_back_otherwise():
    net = torch.nn.Linear(4, 3)
    capture = StandIn()
    graphed = GraphedTraining(net, capture=capture)
    x = torch.randn(5, 4)
    assert torch.equal(graphed(x), net(x))
    graphed(torch.randn(5, 4))
    assert capture.captured == [(5, 4)] and capture.calls == 2
    graphed(torch.randn(2, 4))                      # another shape (a last partial batch): eager
    with torch.no_grad():
        graphed(x)                                  # no gradients: eager
    net.eval()
    graphed(x)                                      # evaluation: eager
    assert capture.captured == [(5, 4)] and capture.calls == 2


def test_gradients_flow_through_the_replayed_call():
    net = torch.nn.Linear(4, 3)
    graphed = GraphedTraining(net, capture=StandIn())
    graphed(torch.randn(5, 4)).sum().backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_host_side_coin_flip_is_refused():
    with pytest.raises(ValueError, match="bidir_mode=sequence"):
        GraphedTraining(tiny_vim(bidir_mode="sequence"))
    mae = MaskedAutoencoder(tiny_vim(num_classes=0, bidir_mode="sequence"), {}, decoder_embed_dim=16, decoder_depth=1,
                            decoder_num_heads=2)
    with pytest.raises(ValueError, match="VisionMamba decides on the host"):   # the encoder inside the MAE
        GraphedTraining(mae, "image_loss")
    GraphedTraining(tiny_vim())


@pytest.mark.parametrize("device, stage, accum, message", [
    ("cpu", 0, 1, "needs a CUDA device"),
    ("cuda", 1, 1, "needs ZeRO stage 0, got stage 1"),
    ("cuda", 3, 1, "needs ZeRO stage 0, got stage 3"),
    ("cuda", 0, 2, "grad_accum 1, got 2"),
])
def test_unsupported_settings_are_named(device, stage, accum, message):
    task = Classifier(tiny_vim(num_classes=3), 3, {})
    with pytest.raises(ValueError, match=message):
        check_cuda_graph(task, torch.device(device), stage, accum)


def test_zero0_is_accepted():
    check_cuda_graph(Classifier(tiny_vim(num_classes=3), 3, {}), torch.device("cuda"), 0, 1)


def test_a_task_without_a_network_to_graph_is_named():
    with pytest.raises(ValueError, match="has no network to graph"):
        check_cuda_graph(torch.nn.Linear(2, 2), torch.device("cuda"), 0, 1)


def test_classifier_trains_through_the_graphed_model():
    torch.manual_seed(0)
    task = Classifier(tiny_vim(num_classes=3), 3, {})
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    eager_loss, _ = task(batch)
    capture = StandIn()
    task.graph_network(lambda module: GraphedTraining(module, capture=capture))
    loss, _ = task(batch)
    assert capture.captured == [(4, 3, 32, 32)] and capture.calls == 1
    assert torch.allclose(loss, eager_loss)
    loss.backward()
    assert task.model.head.weight.grad is not None


def test_mae_trains_through_the_graphed_loss():
    encoder = tiny_vim(num_classes=0)
    mae = MaskedAutoencoder(encoder, {}, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    capture = StandIn()
    mae.graph_network(lambda module, method: GraphedTraining(module, method, capture=capture))
    images = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    loss, _ = mae({"image": images})
    torch.manual_seed(1)
    assert torch.allclose(loss, mae.image_loss(images))   # the same masks from the same seed
    assert capture.captured == [(3, 3, 32, 32)] and capture.calls == 1
    loss.backward()
    assert encoder.patch_embed.proj.weight.grad is not None


def test_clip_trains_through_the_graphed_image_tower():
    torch.manual_seed(0)
    model = tiny_clip(["circle", "square"])
    batch = {"image": torch.randn(3, 3, 32, 32), "text": model.tokenizer(["a circle.", "a square.", "a circle."])}
    eager_loss, _ = model(batch)
    capture = StandIn()
    model.graph_network(lambda module, method: GraphedTraining(module, method, capture=capture))
    loss, _ = model(batch)
    assert capture.captured == [(3, 3, 32, 32)] and capture.calls == 1
    assert torch.allclose(loss, eager_loss)
    loss.backward()
    assert model.visual.patch_embed.proj.weight.grad is not None and model.text.token_embedding.weight.grad is not None


@pytest.mark.parametrize("task", ["clip", "mae"])
def test_pretraining_networks_compile_whole(monkeypatch, task):
    """train.compile on MAE's network (encoder, decoder, loss) and on CLIP's image tower: each traces into one graph
    (fullgraph: no graph break, so the compiler sees the whole network) and gives eager's loss and gradients.
    aot_eager (the same tracing as inductor, without its code generation) keeps this fast on the CPU; the end-to-end
    inductor run is the classification test below (MAE ran compiled on one and two H100s: BENCHMARKS.md)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager", fullgraph=True))
    torch.manual_seed(0)
    if task == "clip":
        model = tiny_clip(["circle", "square"])
        batch = {"image": torch.randn(3, 3, 32, 32), "text": model.tokenizer(["a circle.", "a square.", "a circle."])}
    else:
        model = MaskedAutoencoder(tiny_vim(num_classes=0), {}, decoder_embed_dim=16, decoder_depth=1,
                                  decoder_num_heads=2)
        batch = {"image": torch.randn(3, 3, 32, 32)}

    def loss_and_grads():
        torch.manual_seed(1)                        # the same MAE masks in both runs
        model.zero_grad()
        loss = model(batch)[0]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model.graph_network(lambda module, method: GraphedTraining(module, method, capture=None, compile=True))
    loss, grads = loss_and_grads()
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cuda_graph_on_cpu_is_a_config_error(tmp_path, default_data_cache):
    with pytest.raises(ValueError, match="train.cuda_graph needs a CUDA device"):
        run_finetune.main(["--task", "classification", *TINY_MODEL, f"output_dir={tmp_path}",
                           f"data.cache_dir={default_data_cache}", "train.cuda_graph=true"])


def test_compiled_training_call_matches_eager():
    """train.compile without a graph: the training call goes through torch.compile (inductor, on the CPU here) and
    gives eager's output and gradients; evaluation stays eager."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    x = torch.randn(5, 4)
    eager = net(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = GraphedTraining(net, capture=None, compile=True)
    out = compiled(x)
    out.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1                 # it went through the compiler
    torch.testing.assert_close(out, eager)
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    net.eval()
    assert torch.equal(compiled(x), net(x))
    assert counters["stats"]["unique_graphs"] == 1                 # evaluation: eager, nothing compiled


def test_compile_refuses_zero3_and_modules_without_a_network():
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        check_compile(Classifier(tiny_vim(num_classes=3), 3, {}), 3)
    with pytest.raises(ValueError, match="no network to compile"):
        check_compile(torch.nn.Linear(2, 2), 0)
    check_compile(Classifier(tiny_vim(num_classes=3), 3, {}), 2)


def test_train_compile_runs_the_task_with_eager_losses(tmp_path, default_data_cache):
    """train.compile=true through the entry point (inductor on the CPU; about a minute of compiling): the same
    losses as the eager run, step for step."""
    args = ["--task", "classification", *TINY_MODEL, "optim.lr=3e-3", "optim.warmup_steps=0", "train.max_steps=3",
            f"data.cache_dir={default_data_cache}", "seed=0"]
    run_finetune.main([*args, f"output_dir={tmp_path / 'eager'}"])
    run_finetune.main([*args, f"output_dir={tmp_path / 'compiled'}", "train.compile=true"])
    eager, compiled = read_losses(tmp_path / "eager"), read_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step, loss in eager.items():
        assert abs(compiled[step] - loss) < 1e-4, (step, compiled[step], loss)
