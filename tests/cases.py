"""Small models and data shared by the tests (float64 unless stated otherwise)."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def make_data(n=12, d=5, k=3, *, classification=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    if classification:
        y = torch.randint(0, k, (n,), generator=g)
    else:
        y = torch.randn(n, k, generator=g, dtype=dtype)
    return X, y


def mlp(d=5, h=6, k=3, *, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k)).to(dtype)


class AttentionNet(nn.Module):
    """``nn.MultiheadAttention`` (4 features, 2 heads) and a linear head on the
    mean token; its ``dropout`` is the attention dropout, drawn functionally in
    train mode (no ``Dropout`` submodule)."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.att(x, x, x)
        return self.head(h.mean(1))


class InlineDropNet(nn.Module):
    """Input ``(N, 3, 4)``: a linear layer, ``F.dropout`` and ``F.dropout1d``
    called functionally with ``training=self.training`` (as timm's heads do; no
    ``Dropout`` submodule), and a linear head on the mean token."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.p = dropout
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        h = F.dropout(h, self.p, training=self.training)
        h = F.dropout1d(h, self.p, training=self.training)
        return self.head(h.mean(1))


class LSTMNet(nn.Module):
    """Input ``(N, 3, 4)``: a two-layer ``nn.LSTM`` (dropout between its layers,
    drawn inside the LSTM kernel in train mode) and a linear head."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 3, num_layers=2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


class SDPANet(nn.Module):
    """Input ``(N, 3, 4)``: one-head self-attention through
    ``F.scaled_dot_product_attention`` with ``dropout_p=p if self.training else
    0`` (timm's ``Attention``, Hugging Face's SDPA attention; no ``Dropout``
    submodule runs), and a linear head on the mean token."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.p = dropout
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.p if self.training else 0.0
        )
        return self.head(h.mean(1))


class SDPAPositionalNet(SDPANet):
    """:class:`SDPANet` passing ``attn_mask`` and ``dropout_p`` positionally
    (``F.scaled_dot_product_attention(q, k, v, None, p)``)."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(
            q, k, v, None, self.p if self.training else 0.0
        )
        return self.head(h.mean(1))


class PackedGRUNet(nn.Module):
    """Input ``(N, 3, 4)``: a two-layer ``nn.GRU`` on a packed sequence (the
    kernel's packed overload, dropout between its layers) and a linear head."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 3, num_layers=2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        lengths = [x.shape[1]] * x.shape[0]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        _, h = self.rnn(packed)
        return self.head(h[-1])


def dropout_twins(net):
    """``net(0.5)`` in train mode, ``net(0.0)`` with the same weights, and a
    float64 batch ``(4, 3, 4)`` with two classes: a model whose dropout must be
    off in the train-mode policy, and its reference without dropout."""
    torch.manual_seed(0)
    model = net(0.5).double().train()
    plain = net(0.0).double()
    plain.load_state_dict(model.state_dict())
    X = torch.randn(4, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    return model, plain, X, y


def linear(d=5, k=1, *, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(d, k).to(dtype)


class TinyCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> linear, on 1x6x6 inputs."""

    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 2 * 2, k)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def tiny_cnn(k=3, *, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = TinyCNN(k).to(dtype)
    # non-trivial running statistics so eval mode differs from train mode
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def image_data(n=10, k=3, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    return X, y


def problem(name, *, n=12):
    """``(model, loss_fn, X, y)`` of a named small float64 test problem.

    ``"linear-mse"``, ``"mlp-mse"``, ``"mlp-ce"``, ``"mlp-bce"`` (a generic loss:
    its output curvature comes from ``torch.func.hessian``) with ``n`` samples, and
    ``"cnn-ce"`` (the tiny CNN with BatchNorm on 10 images).
    """
    if name == "linear-mse":
        X, y = make_data(n=n, k=1, classification=False)
        return linear(), nn.MSELoss(), X, y
    if name == "mlp-mse":
        X, y = make_data(n=n, classification=False)
        return mlp(), nn.MSELoss(), X, y
    if name == "mlp-ce":
        return mlp(), nn.CrossEntropyLoss(), *make_data(n=n)
    if name == "mlp-bce":
        X, _ = make_data(n=n)
        y = torch.randn(X.shape[0], 3, generator=torch.Generator().manual_seed(2)) > 0
        return mlp(), nn.BCEWithLogitsLoss(), X, y.double()
    if name == "cnn-ce":
        return tiny_cnn(), nn.CrossEntropyLoss(), *image_data()
    raise KeyError(name)


def model_state(model):
    """Snapshot of everything a side-effect-free call must leave unchanged."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def bitwise_equal(a, b):
    """Same dtype, shape and bits (NaN payloads included), unlike ``torch.equal``,
    which is ``False`` for any tensor holding a NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point and not a.dtype.is_complex:
        return torch.equal(a, b)
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_state(before, after):
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for n in before[key]:
            assert bitwise_equal(before[key][n], after[key][n]), f"{key} {n} changed"
    for n in before["grads"]:
        a, b = before["grads"][n], after["grads"][n]
        assert (a is None) == (b is None), f"grad {n} changed"
        if a is not None:
            assert bitwise_equal(a, b), f"grad {n} changed"
    assert before["modes"] == after["modes"], "module modes changed"
    assert torch.equal(before["rng"], after["rng"]), "global RNG changed"


def free_port():
    """A TCP port on localhost that is free now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank, world, port):
    """Join a one-thread gloo process group on localhost for the ``with`` body."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, args, nprocs=2, timeout=60.0):
    """``mp.spawn(fn, args=(world, port, *args))``, failing instead of hanging.

    A rank left waiting in a collective (another rank raised or skipped it) is
    killed after ``timeout`` seconds and the test fails with ``"hang"``.
    """
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"hang: a rank still running after {timeout} s")


# --------------------------------------------------------------- recipe results

RESULT_KEYS = frozenset(
    {"schema_version", "recipe", "config", "seed", "env", "metrics", "arrays"}
    | {"verdict", "passed"}
)
VERDICT_KEYS = frozenset(
    {"claim", "value", "op", "threshold", "passed", "source", "note"}
)


def check_results(out_dir, recipe: str) -> dict:
    """Read ``out_dir/results.json`` and check the layout every recipe writes.

    The schema version and recipe name, the top-level keys, the config (equal to
    ``config.json`` beside it) and the keys of every verdict row.
    """
    import json

    import _common  # the recipes' package, on pytest's pythonpath

    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["schema_version"] == _common.SCHEMA_VERSION
    assert on_disk["recipe"] == recipe
    assert set(on_disk) >= RESULT_KEYS
    assert on_disk["config"] == json.loads((out_dir / "config.json").read_text())
    for row in on_disk["verdict"]:
        assert set(row) == VERDICT_KEYS
    return on_disk
