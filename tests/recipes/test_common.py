from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass

import _common as C
import pytest
import torch


@dataclass(frozen=True)
class Cfg:
    model: str = C.option("mlp", "model name")
    lr: float = C.option(0.1, "learning rate")
    steps: int = C.option(10, "number of steps")
    ks: tuple[int, ...] = C.option((1, 5), "k values")
    resume: bool = C.option(False, "resume from checkpoint")
    note: str | None = C.option(None, "optional note")
    device: str = C.option("cpu", "cpu or cuda")
    seed: int = C.option(0, "seed")
    out_dir: str = C.option("runs", "outputs go to <out_dir>/x/")

    @classmethod
    def quick(cls):
        return cls(steps=3)


# ---------------------------------------------------------------- config / CLI


def test_parse_config_precedence(tmp_path):
    assert C.parse_config(Cfg, []) == Cfg()
    assert C.parse_config(Cfg, ["--quick"]).steps == 3
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 7, "lr": 0.5, "ks": [2, 3]}))
    cfg = C.parse_config(Cfg, ["--quick", "--config", str(f), "--lr", "0.25"])
    # file overrides quick(), CLI overrides the file
    assert cfg == Cfg(steps=7, lr=0.25, ks=(2, 3))


def test_parse_config_types():
    cfg = C.parse_config(
        Cfg, ["--ks", "4,8", "--resume", "--note", "hi", "--model", "test_resnet"]
    )
    assert cfg.ks == (4, 8) and cfg.resume is True and cfg.note == "hi"
    assert C.parse_config(Cfg, ["--note", "none"]).note is None
    assert C.parse_config(Cfg, ["--resume", "--no-resume"]).resume is False


def test_parse_config_help_is_the_field_metadata(capsys):
    with pytest.raises(SystemExit):
        C.parse_config(Cfg, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "--learning-rate" not in out and "--lr X learning rate (default: 0.1)" in out
    assert "--steps X number of steps (default: 10)" in out
    assert Cfg.__dataclass_fields__["lr"].metadata == {"help": "learning rate"}


def test_parse_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        C.parse_config(Cfg, ["--steps", "abc"])
    assert "`steps` must be of type int; got 'abc'." in capsys.readouterr().err
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"stepz": 1}))
    with pytest.raises(SystemExit):
        C.parse_config(Cfg, ["--config", str(f)])
    assert "unknown config field(s) 'stepz'" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["5", "[1, 2]", '"steps"', "null"])
def test_parse_config_file_that_is_not_an_object(tmp_path, capsys, text):
    # a JSON number raised a TypeError traceback; a list or a string was read as
    # field names ("unknown config field(s) 1, 2")
    f = tmp_path / "c.json"
    f.write_text(text)
    with pytest.raises(SystemExit) as e:
        C.parse_config(Cfg, ["--config", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--config: {str(f)!r} must hold a JSON object of field values" in err
    assert "Traceback" not in err and "unknown config field" not in err


def test_config_dict_roundtrip():
    cfg = Cfg(ks=(3,), note="x")
    d = C.config_to_dict(cfg)
    assert d["ks"] == [3]
    assert C.config_from_dict(Cfg, json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="`steps` must be an integer; got 1.5."):
        C.config_from_dict(Cfg, {"steps": 1.5})
    with pytest.raises(ValueError, match="`resume` must be a boolean; got 'maybe'."):
        C.config_from_dict(Cfg, {"resume": "maybe"})
    with pytest.raises(ValueError, match="`lr` must not be None."):
        C.config_from_dict(Cfg, {"lr": None})


# ---------------------------------------------------------------- validation


def test_check_config_basics_errors():
    C.check_config_basics(Cfg())
    with pytest.raises(ValueError, match=r"`model` must be one of 'mlp'.*got 'nope'"):
        C.check_config_basics(Cfg(model="nope"))
    with pytest.raises(ValueError, match="timm.list_models"):
        C.check_model_name("nope")
    with pytest.raises(ValueError, match=r"`lr` must be > 0; got -1.0."):
        C.check_config_basics(Cfg(lr=-1.0))
    with pytest.raises(ValueError, match=r"`lr` must be > 0; got 0.0."):
        C.check_config_basics(Cfg(lr=0.0))
    with pytest.raises(ValueError, match=r"`seed` must be >= 0; got -2."):
        C.check_config_basics(Cfg(seed=-2))
    with pytest.raises(ValueError, match=r"`device` must be one of 'cpu', 'cuda'"):
        C.check_device("tpu")
    with pytest.raises(ValueError, match=r"`dataset` must be one of 'digits'"):
        C.check_dataset("imagenet")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_check_device_no_cuda():
    with pytest.raises(ValueError, match="CUDA is not available here; pass --device"):
        C.check_device("cuda")


@pytest.mark.parametrize("cuda", [False, True])
def test_check_device_malformed_name_or_missing_gpu(monkeypatch, cuda):
    # 'cpu:abc' raised torch's RuntimeError (a traceback, exit 1); on a GPU machine
    # 'cuda:x' did too and 'cuda:7' failed only when the model moved there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    for bad in ("cpu:abc", "cpu:", "cuda:x", "cuda:"):
        with pytest.raises(ValueError, match=f"`device` {bad!r} is not a device"):
            C.check_device(bad)
    if cuda:
        assert C.check_device("cuda:1") == "cuda:1" and C.check_device("cuda")
        with pytest.raises(ValueError, match="`device` 'cuda:2': this machine has 2"):
            C.check_device("cuda:2")


def test_check_config_basics_loss():
    @dataclass(frozen=True)
    class L:
        loss: str = "hinge"

    with pytest.raises(ValueError, match=r"`loss` must be one of 'ce', 'mse'; got 'h"):
        C.check_config_basics(L())
    with pytest.raises(ValueError, match=r"`loss` must be one of 'ce', 'mse'"):
        C.make_loss("hinge")


# ---------------------------------------------------------------- data


def test_load_digits_shapes_and_standardisation():
    d = C.load_data("digits", image_size=12, in_chans=3, num_train=200, num_test=50)
    assert d.x_train.shape == (200, 3, 12, 12) and d.x_test.shape == (50, 3, 12, 12)
    assert d.y_train.dtype == torch.long and d.num_classes == 10
    assert d.in_chans == 3 and d.image_size == 12 and d.input_dim == 3 * 12 * 12
    # standardised per channel on the training split: mean 0, std 1 (float32 sums
    # over 28,800 entries: 1e-5 is ample)
    m = d.x_train.mean(dim=(0, 2, 3))
    s = d.x_train.std(dim=(0, 2, 3))
    torch.testing.assert_close(m, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s, torch.ones(3), atol=1e-5, rtol=0)


def test_load_digits_native_flat_and_deterministic():
    a = C.load_data("digits", image_size=None, flatten=True, dtype=torch.float64)
    b = C.load_data("digits", image_size=None, flatten=True, dtype=torch.float64)
    assert a.x_train.shape[1] == 64 and a.image_size is None
    assert a.x_train.dtype == torch.float64
    assert len(a.y_train) + len(a.y_test) == 1797
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = C.load_data("digits", image_size=None, flatten=True, seed=1)
    assert not torch.equal(a.y_train, c.y_train)
    # train and test are disjoint: same number of rows as the full set, no overlap
    rows = {tuple(r.tolist()) for r in a.x_train} & {
        tuple(r.tolist()) for r in a.x_test
    }
    # digits holds a few exact duplicate images; the split itself is by index
    assert len(rows) < 20


def test_load_data_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`dataset` must be one of 'digits'.*'svhn'"):
        C.load_data("svhn")
    with pytest.raises(ValueError, match="pass --data-dir DIR"):
        C.load_data("cifar10")
    with pytest.raises(FileNotFoundError, match="--download"):
        C.load_data("fashion_mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"`num_train` must be in \[1, "):
        C.load_data("digits", num_train=10**6)
    with pytest.raises(ValueError, match="`image_size` must be >= 1; got 0."):
        C.load_data("digits", image_size=0)
    with pytest.raises(ValueError, match="`in_chans` must be >= 1; got 0."):
        C.load_data("digits", in_chans=0)


# ---------------------------------------------------------------- models


def test_make_model_small_and_seeded():
    rng = torch.get_rng_state()
    a = C.make_model("mlp", 10, input_dim=64, width=8, seed=3, dtype=torch.float64)
    b = C.make_model("mlp", 10, input_dim=64, width=8, seed=3, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), rng), "global RNG consumed"
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q) and p.dtype == torch.float64
    assert a(torch.zeros(2, 64, dtype=torch.float64)).shape == (2, 10)
    cnn = C.make_model("cnn", 4, in_chans=1, image_size=8, width=3)
    assert cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    lin = C.make_model("linear", 2, input_dim=5)
    assert lin(torch.zeros(1, 5)).shape == (1, 2)


def test_make_model_cnn_activation_and_pool():
    def layers(m):
        return [type(mod) for mod in m.features]

    nn = torch.nn
    default = C.make_model("cnn", 1, image_size=8, width=3, seed=5)
    assert layers(default) == [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2
    # the default is the ReLU/max CNN with the same initialisation
    explicit = C.make_model(
        "cnn", 1, image_size=8, width=3, seed=5, cnn_activation="relu", cnn_pool="max"
    )
    for p, q in zip(default.parameters(), explicit.parameters(), strict=True):
        assert torch.equal(p, q)
    for act, cls in [
        ("gelu", nn.GELU),
        ("softplus", nn.Softplus),
        ("tanh", nn.Tanh),
    ]:
        m = C.make_model("cnn", 1, image_size=8, width=3, seed=5, cnn_activation=act)
        assert layers(m) == [nn.Conv2d, cls, nn.MaxPool2d] * 2
        # only the nonlinearity differs: the same parameters
        for p, q in zip(default.parameters(), m.parameters(), strict=True):
            assert torch.equal(p, q)
    avg = C.make_model(
        "cnn", 1, image_size=8, width=3, cnn_activation="gelu", cnn_pool="avg"
    )
    assert layers(avg) == [nn.Conv2d, nn.GELU, nn.AvgPool2d] * 2
    assert all(m.kernel_size == 2 for m in avg.features if isinstance(m, nn.AvgPool2d))
    assert avg(torch.zeros(2, 1, 8, 8)).shape == (2, 1)
    # `activation` is the MLP's: it leaves the CNN's ReLU as it is
    assert layers(C.make_model("cnn", 1, image_size=8, width=3, activation="tanh")) == (
        layers(default)
    )
    with pytest.raises(ValueError, match="`cnn_activation` must be one of 'relu'"):
        C.make_model("cnn", 1, image_size=8, cnn_activation="elu")
    with pytest.raises(ValueError, match="`cnn_pool` must be one of 'max', 'avg'"):
        C.make_model("cnn", 1, image_size=8, cnn_pool="min")


def test_make_model_timm():
    m = C.make_model("test_efficientnet", 10, in_chans=1)
    assert m(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_make_model_timm_args():
    args = {"img_size": 8, "patch_size": 8, "depth": 1, "embed_dim": 16}
    m = C.make_model("test_vit", 3, in_chans=1, timm_args=args)
    assert len(m.blocks) == 1 and m.embed_dim == 16
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_make_model_checks_the_input_size_before_training():
    # test_convnext downsamples 16 px inputs below one pixel: a clear error at build
    with pytest.raises(
        ValueError, match=r"'test_convnext' cannot run on 16x16 .*--image-size"
    ):
        C.make_model("test_convnext", 10, in_chans=1, image_size=16)
    rng = torch.get_rng_state()
    m = C.make_model("test_resnet", 10, in_chans=1, image_size=16)
    assert all(mod.training for mod in m.modules())  # train mode kept
    assert torch.equal(rng, torch.get_rng_state())
    bn = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 0  # the check ran in eval mode


def test_make_model_errors():
    with pytest.raises(ValueError, match="timm.list_models"):
        C.make_model("resnet_does_not_exist", 10)
    with pytest.raises(ValueError, match="`input_dim` is needed for model 'mlp'."):
        C.make_model("mlp", 10)
    with pytest.raises(ValueError, match="`input_dim` is needed for model 'linear'."):
        C.make_model("linear", 10)
    with pytest.raises(ValueError, match="`image_size` is needed for model 'cnn'."):
        C.make_model("cnn", 10)
    with pytest.raises(ValueError, match="`activation` must be one of 'tanh', 'relu'"):
        C.make_model("mlp", 10, input_dim=3, activation="gelu")
    with pytest.raises(ValueError, match="`timm_args` are for timm models; got model"):
        C.make_model("mlp", 10, input_dim=3, timm_args={"depth": 1})
    with pytest.raises(ValueError, match=r"repeats keyword arguments: \['in_chans'\]"):
        C.make_model("test_vit", 10, timm_args={"in_chans": 3})
    with pytest.raises(ValueError, match=r"repeats keyword arguments: \['img_size'\]"):
        C.make_model("test_vit", 10, img_size=8, timm_args={"img_size": 16})


def test_make_targets():
    y = torch.tensor([0, 2])
    assert torch.equal(C.make_targets("ce", y, 3, torch.float64), y)
    t = C.make_targets("mse", y, 3, torch.float64)
    assert t.dtype == torch.float64
    assert torch.equal(t, torch.tensor([[1.0, 0, 0], [0, 0, 1]], dtype=torch.float64))


# ---------------------------------------------------------------- files


def test_write_json_atomic_and_strict(tmp_path):
    p = C.write_json(
        tmp_path / "a" / "r.json",
        {"x": float("nan"), "t": torch.tensor([1.0, 2.0]), "i": math.inf},
    )
    assert json.loads(p.read_text()) == {"x": None, "t": [1.0, 2.0], "i": None}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"], "temp file left behind"
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        C.write_json(tmp_path / "b.json", {"o": object()})
    assert not (tmp_path / "b.json").exists()
    assert list(tmp_path.glob(".b.json*")) == []


def test_save_figure_atomic(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    p = C.save_figure(fig, tmp_path / "f" / "a.png")
    good = p.read_bytes()
    assert good[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in p.parent.iterdir()] == ["a.png"], "temp file left behind"
    assert not plt.fignum_exists(fig.number), "figure not closed"

    def broken(fh, **kw):  # rendering interrupted half-way through the file
        fh.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    fig2 = plt.figure()
    fig2.savefig = broken
    with pytest.raises(KeyboardInterrupt):
        C.save_figure(fig2, p)
    assert not plt.fignum_exists(fig2.number)
    assert p.read_bytes() == good, "an interrupted save replaced the old figure"
    assert [f.name for f in p.parent.iterdir()] == ["a.png"]


def test_checkpoint_roundtrip_restores_rng(tmp_path):
    cfg = C.config_to_dict(Cfg())
    path = tmp_path / "ck.pt"
    assert C.load_checkpoint(path) is None
    torch.manual_seed(5)
    random.seed(5)
    C.save_checkpoint(path, {"step": 3, "config": cfg, "w": torch.arange(3)})
    expect = (torch.rand(2), random.random())
    torch.manual_seed(99)
    random.seed(99)
    # weights_only=True inside load_checkpoint: only plain types were saved
    state = C.load_checkpoint(path, config=dict(cfg, resume=True, device="cuda"))
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(3))
    assert torch.equal(torch.rand(2), expect[0]) and random.random() == expect[1]


def test_checkpoint_config_mismatch(tmp_path):
    path = tmp_path / "ck.pt"
    C.save_checkpoint(path, {"config": C.config_to_dict(Cfg())})
    other = C.config_to_dict(Cfg(lr=0.3))
    with pytest.raises(ValueError, match=r"different config \(fields 'lr'\)"):
        C.load_checkpoint(path, config=other)


def test_results_payload_and_environment():
    env = C.environment("cpu")
    for key in ("torch", "timm", "device", "git_sha", "python"):
        assert key in env
    rows = [C.claim("a", 1.0, ">=", 0.5), C.claim("b", None, "<", 1)]
    out = C.results_payload(
        "x", Cfg(), env=env, metrics={"m": 1}, arrays={"loss": [1, 2]}, verdict=rows
    )
    assert out["schema_version"] == C.SCHEMA_VERSION and out["seed"] == 0
    assert out["passed"] is False and out["config"]["ks"] == [1, 5]


# ---------------------------------------------------------------- verdict


@pytest.mark.parametrize(
    ("value", "op", "thr", "ok"),
    [
        (0.95, ">=", 0.9, True),
        (0.9, ">=", 0.9, True),
        (0.9, ">", 0.9, False),
        (0.4, "<=", 0.5, True),
        (0.6, "<", 0.5, False),
        (float("nan"), "<=", 0.5, False),
        (None, ">=", 0.0, False),
        # at the threshold: "<=" holds, "<" does not
        (0.5, "<=", 0.5, True),
        (0.5, "<", 0.5, False),
        # a non-finite value fails whichever side of the threshold it lies on
        (float("inf"), ">=", 0.9, False),
        (float("-inf"), "<=", 0.5, False),
        (float("nan"), ">=", 0.9, False),
    ],
)
def test_claim(value, op, thr, ok):
    row = C.claim("c", value, op, thr, source="Wang & Wu 2023, arXiv:2310.00692")
    assert row["passed"] is ok and row["threshold"] == thr


def test_claim_error_and_table():
    with pytest.raises(ValueError, match=r"`op` must be one of '>=', '>', '<=', '<'"):
        C.claim("c", 1.0, "==", 1.0)
    table = C.verdict_table(
        [C.claim("rho", 0.95, ">=", 0.9), C.claim("x", None, "<", 1)]
    )
    assert "| rho | 0.95 | >= 0.9 | PASS |" in table
    assert "| x | n/a | < 1 | FAIL |" in table


def test_maybe_interrupt(monkeypatch):
    C.maybe_interrupt(3)  # STOP_AT is None: never
    monkeypatch.setattr(C.run, "STOP_AT", 4)
    C.maybe_interrupt(3)
    with pytest.raises(C.Interrupted, match="interrupted at step 4"):
        C.maybe_interrupt(4)


def test_whiten_flattens_the_input_spectrum():
    def spectrum(whiten):
        d = C.load_data(
            "digits", image_size=None, flatten=True, whiten=whiten, dtype=torch.float64
        )
        x = d.x_train - d.x_train.mean(0)
        return torch.linalg.eigvalsh(x.T @ x / (len(x) - 1)).flip(0)

    raw, white = spectrum(False), spectrum(True)
    # raw digits: a few principal components dominate (measured ratio ~ 72x);
    # ZCA with a 1% ridge leaves the top 40 within a factor 1.5 (measured 1.07)
    assert raw[0] / raw[39] > 10
    assert white[0] / white[39] < 1.5
    assert C.model_wants_flat("mlp") and not C.model_wants_flat("test_resnet")


def test_check_choice_and_min_messages():
    with pytest.raises(
        ValueError, match=r"^`model` must be one of 'a', 'b'; got 'mlp'.$"
    ):
        C.check_choice(Cfg(), "model", ("a", "b"))
    C.check_choice(Cfg(), "model", ("mlp",))
    with pytest.raises(ValueError, match=r"^`steps` must be >= 11; got 10.$"):
        C.check_min(Cfg(seed=20), ("seed", "steps"), 11)  # the first field below
    C.check_min(Cfg(), ("seed", "steps"), 0)


def test_parity_targets_and_flat_parameters():
    y = torch.tensor([0, 1, 2, 7])
    t = C.parity_targets(y, torch.float64)
    assert t.dtype == torch.float64
    assert torch.equal(t, torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]).double())
    model = torch.nn.Linear(3, 2)
    theta = C.flat_parameters(model)
    expect = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    assert torch.equal(theta, expect)
    C.set_flat_parameters(model, theta + 1)
    assert torch.equal(C.flat_parameters(model), expect + 1)
    assert torch.equal(theta, expect), "the vector is a copy"


def test_make_loss_mse_is_the_half_squared_error():
    from geoopt_sgd import HalfSquaredError

    assert isinstance(C.make_loss("mse"), HalfSquaredError)
    assert isinstance(C.make_loss("ce"), torch.nn.CrossEntropyLoss)


# ---------------------------------------------------------------- run, stages


def test_run_writes_nothing_before_open_and_restores_threads(tmp_path):
    cfg = Cfg(out_dir=str(tmp_path), seed=3)
    before = torch.get_num_threads()
    with C.Run("x", cfg, threads=1) as run:
        assert torch.get_num_threads() == 1
        drawn = torch.rand(2)  # seeded with cfg.seed on entry
        torch.manual_seed(3)
        assert torch.equal(drawn, torch.rand(2))
        assert not (tmp_path / "x").exists()
        assert run.open() == {} and (tmp_path / "x" / "config.json").exists()
        res = run.finish(
            {"m": math.nan}, {"a": (1, 2)}, [C.claim("c", 1.0, ">=", 0)], lambda p: None
        )
    assert torch.get_num_threads() == before
    # returned as written: NaN became null, tuples lists; the wall time is added
    assert res["metrics"]["m"] is None and res["arrays"] == {"a": [1, 2]}
    assert res["metrics"]["seconds"] >= 0 and res["passed"] is True
    assert res == C.read_json(tmp_path / "x" / "results.json")


def test_stages_run_once_and_resume_from_their_snapshot(tmp_path):
    cfg = Cfg(out_dir=str(tmp_path))
    calls = []

    def counting(resume, snapshot):
        done = [] if resume is None else list(resume)
        calls.append(list(done))
        for i in range(len(done), 4):
            if i == 2 and len(calls) == 1:
                raise C.Interrupted("killed")
            done.append(i)
            snapshot(done)
        return sum(done)

    with C.Run("x", cfg) as run:
        stages = C.Stages(run.open(), run.save)
        assert stages.run("first", lambda resume, snapshot: "a") == "a"
        with pytest.raises(C.Interrupted):
            stages.run("second", counting)
    with C.Run("x", dataclasses.replace(cfg, resume=True)) as run:
        stages = C.Stages(run.open(), run.save)
        assert stages.run("first", lambda resume, snapshot: "not run") == "a"
        assert stages.run("second", counting) == 0 + 1 + 2 + 3
    assert calls == [[], [0, 1]]  # resumed from its own last snapshot
    assert stages.state == {"done": {"first": "a", "second": 6}, "current": None}


def test_stages_min_interval_writes_at_most_that_often_and_on_an_interrupt(monkeypatch):
    import copy
    import sys
    import types

    clock = [0.0]
    monkeypatch.setattr(
        sys.modules["_common.run"],
        "time",
        types.SimpleNamespace(perf_counter=lambda: clock[0]),
    )
    state: dict = {}
    writes = []
    stages = C.Stages(state, lambda: writes.append(copy.deepcopy(state["current"])))

    def four_seconds_each(stop=None):
        def stage(resume, snapshot):
            done = [] if resume is None else list(resume)
            for i in range(len(done), 5):
                if i == stop:
                    raise C.Interrupted("killed")
                clock[0] += 4.0
                done.append(i)
                snapshot(done)
            return len(done)

        return stage

    # snapshots at 4, 8, 12, 16, 20 s: written at 12 s, then at the stage's end
    assert stages.run("a", four_seconds_each(), min_interval=10.0) == 5
    assert writes == [{"stage": "a", "snapshot": [0, 1, 2]}, None]
    # an interrupt writes the snapshot kept back, and the stage resumes from it
    writes.clear()
    with pytest.raises(C.Interrupted):
        stages.run("b", four_seconds_each(stop=2), min_interval=10.0)
    assert writes == [{"stage": "b", "snapshot": [0, 1]}]
    assert stages.run("b", four_seconds_each(), min_interval=10.0) == 5
    # the default writes at every snapshot
    writes.clear()
    assert stages.run("c", four_seconds_each()) == 5
    assert len(writes) == 6 and writes[0] == {"stage": "c", "snapshot": [0]}


def test_parse_model_kwargs():
    got = C.parse_model_kwargs(
        [" depth = 2", "channels=(8,8,16,16)", "norm_layer=groupnorm1", "x=False"],
        "test_resnet",
    )
    assert got == {
        "depth": 2,
        "channels": (8, 8, 16, 16),
        "norm_layer": "groupnorm1",
        "x": False,
    }
    assert C.parse_model_kwargs(None, "mlp") == {} == C.parse_model_kwargs([], "vit")
    for bad in ("depth", "=2", "two words=1", "1x=2"):
        with pytest.raises(ValueError, match="'key=value'"):
            C.parse_model_kwargs([bad], "test_vit")
    with pytest.raises(ValueError, match="'mlp' is not a timm model"):
        C.parse_model_kwargs(["depth=2"], "mlp")


def test_cli_exit_status(tmp_path, monkeypatch, capsys):
    def main(passed):
        def run(cfg):
            if cfg.note == "bad":
                raise ValueError("`note` is bad; pass another")
            return {
                "verdict": [C.claim("c", 1.0 if passed else -1.0, ">=", 0)],
                "passed": passed,
            }

        return run

    for argv, passed, code in (
        ([], True, 0),
        ([], False, 1),
        (["--note", "bad"], True, 2),
    ):
        monkeypatch.setattr("sys.argv", ["x.py", *argv])
        with pytest.raises(SystemExit) as e:
            C.cli("x", Cfg, main(passed), "doc")
        assert e.value.code == code
    assert "error: `note` is bad; pass another" in capsys.readouterr().err


def test_cli_ctrl_c_says_how_to_continue(tmp_path, monkeypatch, capsys):
    # Ctrl-C: exit 130 without a traceback, pointing to --resume once a stage
    # has saved the progress
    def interrupted(save):
        def run(cfg):
            with C.Run("x", cfg) as run:
                run.open()
                if save:
                    run.save()
                raise KeyboardInterrupt

        return run

    monkeypatch.setattr("sys.argv", ["x.py", "--out-dir", str(tmp_path)])
    # the second run saves; the third finds its checkpoint but saves none itself
    for save, hint in (
        (False, "nothing was saved yet"),
        (True, "--resume"),
        (False, "nothing was saved yet"),
    ):
        with pytest.raises(SystemExit) as e:
            C.cli("x", Cfg, interrupted(save), "doc")
        assert e.value.code == 130
        err = capsys.readouterr().err
        assert err.startswith("interrupted: ") and hint in err, err
        assert "Traceback" not in err
    # a resumed run stopped before it saves: the checkpoint it resumed from holds
    monkeypatch.setattr("sys.argv", ["x.py", "--out-dir", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit) as e:
        C.cli("x", Cfg, interrupted(False), "doc")
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err


def test_resume_from_an_older_checkpoint_layout_says_so(tmp_path):
    cfg = Cfg(out_dir=str(tmp_path), resume=True)
    C.save_checkpoint(
        tmp_path / "x" / "checkpoint.pt",
        {"config": C.config_to_dict(cfg), "progress": {}},
    )
    with C.Run("x", cfg) as run:
        with pytest.raises(ValueError, match="older version of the recipes; rerun"):
            run.open()


# ---------------------------------------------------------------- out dir: damaged
# checkpoints, a second run on the same folder, files of a killed run (#13)


def _open_main(cfg):
    with C.Run("x", cfg) as run:
        run.open()
    return {"verdict": [C.claim("c", 1.0, ">=", 0)], "passed": True}


def _write_damaged(path, kind):
    cfg = C.config_to_dict(Cfg(resume=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        C.save_checkpoint(path, {"config": cfg, "state": {"w": torch.zeros(1000)}})
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy())
    elif kind == "a pickled object":  # torch.load(weights_only=True) refuses it
        torch.save(Cfg(), path)
    elif kind == "a list":
        torch.save([1, 2], path)
    elif kind == "no config":
        torch.save({"state": {}}, path)
    elif kind == "state not a dict":
        torch.save({"config": cfg, "state": [1]}, path)
    elif kind == "bad rng":
        torch.save({"config": cfg, "state": {}, "rng": {"torch": torch.zeros(3)}}, path)


DAMAGED = [
    "truncated",
    "empty",
    "random bytes",
    "a pickled object",
    "a list",
    "no config",
    "state not a dict",
    "bad rng",
]


@pytest.mark.parametrize("kind", DAMAGED)
def test_resume_from_a_damaged_checkpoint_names_it_and_exits_2(
    tmp_path, monkeypatch, capsys, kind
):
    path = tmp_path / "x" / "checkpoint.pt"
    _write_damaged(path, kind)
    monkeypatch.setattr("sys.argv", ["x.py", "--out-dir", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit) as e:
        C.cli("x", Cfg, _open_main, "doc")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: the checkpoint {str(path)!r} is damaged")
    assert "Delete it, or rerun without --resume to start over." in err
    assert "Traceback" not in err and "weights_only" not in err
    # the lock was released: a run without --resume starts over on the same folder
    monkeypatch.setattr("sys.argv", ["x.py", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        C.cli("x", Cfg, _open_main, "doc")
    assert e.value.code == 0


@pytest.mark.parametrize("kind", ["a changed config", "truncated"])
def test_a_refused_resume_leaves_config_json_as_it_was(tmp_path, kind):
    # config.json describes the checkpoint and results.json next to it: a --resume
    # that is refused (another config, a damaged checkpoint) must not overwrite it
    folder = tmp_path / "x"
    with C.Run("x", Cfg(out_dir=str(tmp_path))) as run:
        run.open()
        run.save()
    before = (folder / "config.json").read_bytes()
    if kind == "truncated":
        path = folder / "checkpoint.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cfg = Cfg(out_dir=str(tmp_path), resume=True, steps=99)
    if kind == "truncated":
        cfg = Cfg(out_dir=str(tmp_path), resume=True)
    with C.Run("x", cfg) as run:
        with pytest.raises(ValueError, match="--resume: the checkpoint"):
            run.open()
    assert (folder / "config.json").read_bytes() == before


def test_a_damaged_checkpoint_leaves_the_rng_states_alone(tmp_path):
    path = tmp_path / "x" / "checkpoint.pt"
    _write_damaged(path, "bad rng")
    torch.manual_seed(7)
    random.seed(7)
    expect = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    with pytest.raises(ValueError, match="its RNG states are invalid"):
        C.load_checkpoint(path, config=C.config_to_dict(Cfg()))
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1]


def test_a_second_run_on_the_same_out_dir_is_refused(tmp_path, monkeypatch, capsys):
    import os

    cfg = Cfg(out_dir=str(tmp_path))
    with C.Run("x", cfg) as first:
        first.open()
        lock = tmp_path / "x" / ".lock"
        assert lock.read_text().strip() == str(os.getpid())
        with C.Run("x", cfg) as second:
            with pytest.raises(
                C.OutDirBusy, match=rf"in use by the run with pid {os.getpid()}"
            ):
                second.open()
        # the same through the command line: exit status 2, no traceback
        monkeypatch.setattr("sys.argv", ["x.py", "--out-dir", str(tmp_path)])
        with pytest.raises(SystemExit) as e:
            C.cli("x", Cfg, _open_main, "doc")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: --out-dir: {str(tmp_path / 'x')!r} is in use" in err
        assert "pass another --out-dir" in err and "Traceback" not in err
        assert first.open() == {}  # the holder itself is not locked out
    # released on leaving the block, even through an exception
    with pytest.raises(C.Interrupted):
        with C.Run("x", cfg) as run:
            run.open()
            raise C.Interrupted("killed")
    with C.Run("x", cfg) as run:
        assert run.open() == {}
    # a different recipe in the same --out-dir has its own folder, its own lock
    with C.Run("x", cfg) as a, C.Run("y", cfg) as b:
        a.open()
        b.open()


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_out_dir_that_cannot_be_created_names_it_and_exits_2(
    tmp_path, monkeypatch, capsys, where
):
    # a NotADirectoryError traceback and exit 1 before
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" if where == "a file" else tmp_path / "f" / "g"
    monkeypatch.setattr("sys.argv", ["x.py", "--out-dir", str(out)])
    with pytest.raises(SystemExit) as e:
        C.cli("x", Cfg, _open_main, "doc")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out-dir: cannot create {str(out / 'x')!r}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    folder = tmp_path / "x"
    folder.mkdir()
    holder = subprocess.Popen(  # another process takes the lock, as a run would
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fh = open({str(folder / '.lock')!r}, 'a+')\n"
            "fcntl.flock(fh, fcntl.LOCK_EX)\n"
            "fh.write(str(os.getpid())); fh.flush()\n"
            "print('locked', flush=True); sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with C.Run("x", Cfg(out_dir=str(tmp_path))) as run:
            with pytest.raises(C.OutDirBusy, match=f"pid {holder.pid}"):
                run.open()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    # the dead run's lock file (with its pid) is still there; the next run takes it
    assert (folder / ".lock").read_text() == str(holder.pid)
    with C.Run("x", Cfg(out_dir=str(tmp_path))) as run:
        assert run.open() == {}
        assert (folder / ".lock").read_text().strip() == str(os.getpid())


def test_open_removes_the_temp_files_of_a_killed_write(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    stale = [".toy.png.k3_9zqa1.tmp", ".checkpoint.pt.abcdefgh.tmp"]
    kept = ["notes.tmp", ".keep.tmp", "toy.png", ".results.json.short.tmp"]
    for name in stale + kept:
        (folder / name).write_bytes(b"x")
    with C.Run("x", Cfg(out_dir=str(tmp_path), resume=True)) as run:
        run.open()
    names = {p.name for p in folder.iterdir()}
    assert not names & set(stale)
    assert set(kept) <= names


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        C.write_json(tmp_path / "a.json", {"a": 1})
        C.save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(2)})
        plt = C.pyplot()
        C.save_figure(plt.figure(), tmp_path / "f.png")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == want
    for name in ("a.json", "c.pt", "f.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_random_feature_model_trains_only_its_head():
    model = C.make_model("rfm", 2, input_dim=5, width=40, seed=3, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["head.weight"]
    W = model.features
    # rows on the sphere of radius sqrt(d); the forward is a^T relu(Wx)/sqrt(m)
    torch.testing.assert_close(W.norm(dim=1), torch.full((40,), 5**0.5, dtype=W.dtype))
    x = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.relu(x @ W.T) @ model.head.weight.T / 40**0.5
    torch.testing.assert_close(model(x), expected)
    again = C.make_model("rfm", 2, input_dim=5, width=40, seed=3, dtype=torch.float64)
    assert torch.equal(again.features, W)  # seeded: the features are reproducible
    assert C.model_wants_flat("rfm")


def test_deep_linear_network_is_a_bias_free_product():
    model = C.make_model("deep_linear", 3, input_dim=4, width=6, depth=2, seed=0)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(6, 4), (6, 6), (3, 6)]  # WWS22's three layers, no biases
    x = torch.randn(5, 4)
    W1, W2, W3 = model.parameters()
    torch.testing.assert_close(model(x), x @ (W3 @ W2 @ W1).T)
    assert C.model_wants_flat("deep_linear")
    with pytest.raises(ValueError, match="`input_dim` is needed for model 'rfm'"):
        C.make_model("rfm", 1)


def test_strict_min_and_max_fail_on_any_nan_or_nothing():
    import math

    assert C.strict_min([3.0, 1.0, 2.0]) == 1.0
    assert C.strict_max([3.0, 1.0, 2.0]) == 3.0
    # Python's min/max skip a NaN that is not first: these do not
    for f in (C.strict_min, C.strict_max):
        assert math.isnan(f([1.0, math.nan, 2.0]))
        assert math.isnan(f([1.0, math.inf]))
        assert math.isnan(f([]))
