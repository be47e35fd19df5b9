"""`compile: true`: every decoder layer torch.compile'd as one graph. On CPU with the `aot_eager` backend
(no C compiler needed; it runs dynamo and AOTAutograd, where graph breaks and tracing failures show):
- a masked (pruning) and an unmasked (continued pre-training) layer trace with no graph break, forward and
  backward equal to eager;
- all layers share their compiled graphs (the mask slices, not a layer index, go in);
- a few pruning steps through `build_trainer` with compile: true end at the eager run's weights and loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_data import make_tiny_data

from llmshearing.models.config import ModelConfig
from llmshearing.models.llama import LlamaForCausalLM
from llmshearing.models.shape import ModelShape
from llmshearing.pruning.l0 import L0Module
from llmshearing.training.config import load_config
from llmshearing.training.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
SHAPE = ModelShape(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, n_layers=3, intermediate_size=96, vocab_size=101)
TARGET = SHAPE.replace(d_model=48, n_heads=2, n_kv_heads=1, n_layers=2, intermediate_size=64)


def _layer_inputs(model: LlamaForCausalLM, masked: bool, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(2, 12, SHAPE.d_model, requires_grad=True)
    cos, sin = model.model.rotary_emb(12, x.device, x.dtype)
    masks = None
    if masked:
        l0 = L0Module(SHAPE, TARGET, seed=seed).train()
        masks = l0()[0].for_layer(1)
        masks = type(masks)(**{k: (v.detach() if v is not None else None) for k, v in vars(masks).items()})
    return x, cos, sin, masks


@pytest.mark.parametrize("masked", [False, True])
def test_layer_traces_without_graph_breaks(masked):
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(shape=SHAPE))
    layer = model.model.layers[1]
    x, cos, sin, masks = _layer_inputs(model, masked)
    explanation = torch._dynamo.explain(layer._forward)(x, cos, sin, masks)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("masked", [False, True])
def test_compiled_layer_equals_eager_forward_and_backward(masked):
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(shape=SHAPE))
    layer = model.model.layers[1]
    x, cos, sin, masks = _layer_inputs(model, masked)
    eager = layer(x, cos, sin, masks)
    eager.square().sum().backward()
    g_eager = {n: p.grad.clone() for n, p in layer.named_parameters()}
    gx_eager = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    layer.compile_layer("aot_eager")  # fullgraph=True: a graph break would raise here
    out = layer(x, cos, sin, masks)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)  # fp32; AOTAutograd may reorder ops
    torch.testing.assert_close(x.grad, gx_eager, atol=1e-5, rtol=1e-5)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, g_eager[n], atol=1e-5, rtol=1e-5, msg=n)
    assert [n for n, _ in layer.named_parameters()] == list(g_eager)  # names unchanged by compiling


def test_layers_share_their_compiled_graphs():
    """3 layers, masked, forward + backward: one compiled frame, not one per layer (layer-index guards)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    model = LlamaForCausalLM(ModelConfig(shape=SHAPE))
    model.compile_layers("aot_eager")
    l0 = L0Module(SHAPE, TARGET, seed=0).train()
    ids = torch.randint(0, SHAPE.vocab_size, (2, 12))
    for _ in range(2):
        masks, _ = l0()
        model(ids, masks).float().logsumexp(-1).mean().backward()
    frames = counters["stats"]["unique_graphs"]
    assert frames == 1, dict(counters["stats"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


def _train(data_root: Path, save: Path, compiled: bool):
    over = [f"data.root={data_root}", "max_duration=4ba", "eval_interval=4ba", "save_interval=4ba",
            "loggers.file=false", f"save_folder={save}", "autoresume=false"]
    if compiled:
        over += ["compile=true", "compile_backend=aot_eager"]
    trainer = build_trainer(load_config(REPO / "yamls/tiny/prune.yaml", over))
    trainer.fit()
    w = {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}
    loss = float(trainer.state.total_loss_dict["loss/train/total"])
    trainer.close()
    return w, loss


@pytest.mark.slow
def test_compiled_training_steps_equal_eager_steps(data_root, tmp_path):
    torch._dynamo.reset()
    w_eager, loss_eager = _train(data_root, tmp_path / "eager", compiled=False)
    w_comp, loss_comp = _train(data_root, tmp_path / "compiled", compiled=True)
    print(f"4 pruning steps: loss eager {loss_eager:.6f} compiled {loss_comp:.6f}")
    assert abs(loss_comp - loss_eager) < 1e-5  # fp32, same arithmetic reordered by AOTAutograd
    worst = max(float((w_comp[k] - w_eager[k]).abs().max()) for k in w_eager)
    print(f"max |weight diff| {worst:.2e}")
    assert worst < 5e-5  # measured 7.8e-6: Adam carries the fp32 reordering through 4 steps
