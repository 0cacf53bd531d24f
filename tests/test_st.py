"""ST model: shapes and gradients of every module, set-permutation equivariance, key-padded batches equal
one-set-at-a-time outputs, the energy loss convention (0.5 * E_V), presets, perturbation features, the
configurator, and a few steps of training lowering the loss on real data. Budget: ~30 s on 2 cores."""

import math
import os

import numpy as np
import pytest
import torch

import kernels
from state.config import configure
from state.perts import load_pert_features
from state.st import (Attention, Block, ConfidenceHead, RMSNorm, STConfig, StateTransition, SwiGLU,
                      build_mlp, gene_decoder)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def tiny(**kw):
    return STConfig.from_name("tiny", **{"n_in": 37, "n_pert": 5, **kw})


def check_grads(module, out):
    """Every parameter gets a finite gradient and at least one nonzero entry."""
    out.float().square().mean().backward()
    for n, p in module.named_parameters():
        assert p.grad is not None, f"{n}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{n}: all-zero gradient"


# -----------------------------------------------------------------------------
# modules


@pytest.mark.parametrize("n_layers,norm", [(1, "none"), (2, "none"), (4, "layernorm")])
def test_build_mlp(n_layers, norm):
    m = build_mlp(7, 5, 11, n_layers, dropout=0.0, norm=norm)
    x = torch.randn(3, 4, 7)
    y = m(x)
    assert y.shape == (3, 4, 5)
    n_lin = sum(isinstance(l, torch.nn.Linear) for l in m.modules())
    assert n_lin == n_layers
    assert any(isinstance(l, torch.nn.LayerNorm) for l in m.modules()) == (norm == "layernorm" and n_layers > 1)
    check_grads(m, y)


def test_rmsnorm():
    n = RMSNorm(8, 1e-6)
    x = torch.randn(2, 3, 8)
    y = n(x)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, ref)
    n.weight.data.uniform_(0.5, 1.5)  # non-trivial weight so x-grad and w-grad are both tested
    check_grads(n, n(x))


def test_attention_swiglu_block_shapes_grads():
    cfg = tiny()
    x = torch.randn(3, 9, cfg.hidden, requires_grad=True)
    for m in (Attention(cfg), SwiGLU(cfg), Block(cfg)):
        torch.nn.init.normal_(next(m.parameters()), 0, 0.2)
        y = m(x, torch.tensor([9, 4, 1])) if not isinstance(m, SwiGLU) else m(x)
        assert y.shape == x.shape
        check_grads(m, y)
        x.grad = None


def test_attention_matches_naive():
    cfg = tiny(hidden=24, n_heads=3)  # d = 8
    a = Attention(cfg)
    x = torch.randn(2, 5, 24)
    q, k, v = a.wqkv(x).view(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    ref = a.wo((att @ v).transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(a(x), ref, atol=1e-5, rtol=1e-5)


def test_confidence_head_and_decoder():
    h = ConfidenceHead(16, 0.0)
    y = h(torch.randn(4, 16))
    assert y.shape == (4, 1) and (y >= 0).all()
    d = gene_decoder(6, (8, 8, 4), 13, 0.0)
    z = d(torch.randn(2, 3, 6))
    assert z.shape == (2, 3, 13) and (z >= 0).all()
    check_grads(d, z + 1.0)  # + 1: the ReLU zeroes a few outputs, not all


@pytest.mark.parametrize("opts", [
    dict(),
    dict(n_batch=3, confidence_token=True),
    dict(basal_proj=False, residual="paper", mlp_norm="layernorm", mlp_dropout=0.0),
    dict(n_out=12, gene_space=False, n_genes=37, decoder_hidden=(16, 8)),  # embedding + decoder
])
def test_model_shapes_and_grads(opts):
    cfg = tiny(mlp_dropout=0.0, **opts) if "mlp_dropout" not in opts else tiny(**opts)
    m = StateTransition(cfg)
    B, S = 3, cfg.set_size
    ctrl = torch.rand(B, S, cfg.n_in)
    pert = torch.tensor([0, 2, 4])
    bt = torch.randint(0, 3, (B, S))
    y = m(ctrl, pert, batch=bt)
    assert y.shape == (B, S, cfg.n_out)
    if cfg.gene_space:
        assert (y >= 0).all()
    else:
        assert (y < 0).any()  # signed embeddings are not ReLU'd
    tgt = torch.randn(B, S, cfg.n_out) + (3.0 if cfg.gene_space else 0.0)
    tg = torch.rand(B, S, 37) if cfg.n_genes else None
    loss, parts = m(ctrl, pert, batch=bt, tgt=tgt, tgt_genes=tg)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert ("decoder" in parts) == bool(cfg.n_genes)
    assert ("conf" in parts) == cfg.confidence_token
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if not n.startswith("f_batch") or cfg.n_batch:
            assert p.grad.abs().sum() > 0, f"{n}: zero gradient"


def test_no_decoder_without_target():
    m = StateTransition(tiny())
    assert m.decoder is None  # never a decoder nobody trains
    assert m.decode(torch.zeros(1, 2, 37)) is None


def test_pert_features_table_and_direct():
    table = torch.randn(5, 9)
    m = StateTransition(tiny(n_pert=9, mlp_dropout=0.0), pert_table=table).eval()
    ctrl = torch.rand(2, 16, 37)
    a = m(ctrl, torch.tensor([1, 3]))
    b = m(ctrl, table[[1, 3]])
    torch.testing.assert_close(a, b)
    assert "pert_table" in m.state_dict()


def test_pert_features_files(tmp_path):
    names = ["A", "B", "ctrl"]
    vec = {n: np.arange(4, dtype=np.float32) + i for i, n in enumerate(names)}
    torch.save({k: torch.from_numpy(v) for k, v in vec.items()}, tmp_path / "f.pt")
    np.savez(tmp_path / "f.npz", **vec)
    from safetensors.torch import save_file
    save_file({k: torch.from_numpy(v) for k, v in vec.items()}, str(tmp_path / "f.safetensors"))
    with open(tmp_path / "f.tsv", "w") as f:
        f.write("name\tx0\tx1\tx2\tx3\n")
        for k, v in vec.items():
            f.write(k + "\t" + "\t".join(str(x) for x in v) + "\n")
    for ext in ("pt", "npz", "safetensors", "tsv"):
        t = load_pert_features(tmp_path / f"f.{ext}", ["ctrl", "A"])
        assert t.shape == (2, 4)
        torch.testing.assert_close(t[0], torch.arange(4.0) + 2)
    with pytest.raises(KeyError, match="missing_perturbation|no feature vector"):
        load_pert_features(tmp_path / "f.pt", ["A", "NOPE"])
    t = load_pert_features(tmp_path / "f.pt", ["A", "NOPE"], missing="zero")
    assert t[1].abs().sum() == 0


# -----------------------------------------------------------------------------
# set semantics


def test_permutation_equivariance():
    cfg = tiny(n_batch=2, confidence_token=True)
    m = StateTransition(cfg).eval()
    ctrl = torch.rand(2, 16, 37)
    bt = torch.randint(0, 2, (2, 16))
    pert = torch.tensor([1, 4])
    perm = torch.randperm(16)
    y = m(ctrl, pert, batch=bt)
    yp = m(ctrl[:, perm], pert, batch=bt[:, perm])
    torch.testing.assert_close(yp, y[:, perm], atol=1e-5, rtol=1e-5)
    # and the set is not processed cell by cell: changing one control changes the others' outputs
    ctrl2 = ctrl.clone()
    ctrl2[:, 0] += 1.0
    y2 = m(ctrl2, pert, batch=bt)
    assert (y2[:, 1:] - y[:, 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("conf", [False, True])
def test_key_padded_batch_equals_one_at_a_time(conf):
    cfg = tiny(confidence_token=conf)
    m = StateTransition(cfg).eval()
    lens = [16, 7, 1, 12]
    sets = [torch.rand(n, 37) for n in lens]
    pert = torch.tensor([0, 1, 2, 3])
    x = torch.zeros(4, 16, 37)
    for i, s in enumerate(sets):
        x[i, :len(s)] = s
    x[1, 7:] = 123.0  # garbage in the padding must not leak into valid cells
    y = m(x, pert, lens=torch.tensor(lens))
    for i, s in enumerate(sets):
        yi = m(s[None], pert[i:i + 1])
        torch.testing.assert_close(y[i, :len(s)], yi[0], atol=1e-5, rtol=1e-5)
    # the loss on the padded batch equals the mean of the one-at-a-time losses
    tgt = torch.rand(4, 16, 37)
    _, parts = m(x, pert, lens=torch.tensor(lens), tgt=tgt)
    each = [m(s[None], pert[i:i + 1], tgt=tgt[i:i + 1, :len(s)])[1]["main"] for i, s in enumerate(sets)]
    torch.testing.assert_close(parts["main"], torch.stack(each).mean(), atol=1e-5, rtol=1e-5)


def test_energy_loss_convention():
    """Loss = 0.5 * E_V (reference/geomloss scale), averaged over sets; energy_scale=1 gives E_V."""
    x = torch.rand(3, 16, 37, dtype=torch.float64)
    y = torch.rand(3, 16, 37, dtype=torch.float64)

    def ev(a, b):
        return 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()
    want = torch.stack([ev(x[i], y[i]) for i in range(3)])
    for scale in (0.5, 1.0):
        m = StateTransition(tiny(energy_scale=scale))
        e = m.set_energy(x.float(), y.float())
        torch.testing.assert_close(e.double(), scale * want, atol=1e-4, rtol=1e-4)
    # gradient reaches the prediction only
    xp = x.float().requires_grad_()
    m.set_energy(xp, y.float()).mean().backward()
    assert xp.grad.abs().sum() > 0


def test_pseudobulk_term_is_the_set_mean_error():
    """mean_weight adds w * the squared error of the set means (per feature, over the valid cells of each
    set) to the loss; 0 (default) leaves the loss the energy distance alone."""
    x, y = torch.rand(3, 16, 37), torch.rand(3, 16, 37)
    lens = torch.tensor([16, 9, 4])
    want = torch.stack([(x[i, :n].mean(0) - y[i, :n].mean(0)).pow(2).mean() for i, n in enumerate(lens)])
    torch.testing.assert_close(StateTransition.set_mean_error(x, y, lens), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(StateTransition.set_mean_error(x, y), ((x.mean(1) - y.mean(1)) ** 2).mean(-1))
    torch.manual_seed(0)
    m0 = StateTransition(tiny(mlp_dropout=0.0)).eval()
    m1 = StateTransition(tiny(mlp_dropout=0.0, mean_weight=5.0)).eval()
    m1.load_state_dict(m0.state_dict())
    ctrl, tgt, pert = torch.rand(3, 16, 37), torch.rand(3, 16, 37), torch.tensor([0, 1, 2])
    l0, p0 = m0(ctrl, pert, lens=lens, tgt=tgt)
    l1, p1 = m1(ctrl, pert, lens=lens, tgt=tgt)
    assert "mean" not in p0 and p1["mean"] > 0
    torch.testing.assert_close(l1, l0 + 5.0 * p1["mean"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mean_weight"):
        tiny(mean_weight=-1.0)
    with pytest.raises(ValueError, match="choose one"):  # the control cell would be added twice
        tiny(residual="output", anchor="two_way", n_out=37)


def test_loss_in_fp32_under_autocast():
    m = StateTransition(tiny(mlp_dropout=0.0))
    ctrl, tgt = torch.rand(2, 16, 37), torch.rand(2, 16, 37)
    pert = torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = m(ctrl, pert, tgt=tgt)
    assert loss.dtype == torch.float32
    loss.backward()


# -----------------------------------------------------------------------------
# presets, accounting, optimizer


def test_presets_param_counts():
    """SPEC 3.6: state_sm 28.9M backbone / 34.4M whole on 2000 genes and 151 perts; state 75.5M / 78.7M."""
    want = {"small": (28.9, 34.4), "default": (75.5, 78.7)}
    for name, (bb, tot) in want.items():
        with torch.device("meta"):
            m = StateTransition(STConfig.from_name(name, n_in=2000, n_pert=151))
        n_bb = sum(p.numel() for p in m.blocks.parameters())
        assert round(n_bb / 1e6, 1) == bb, (name, n_bb)
        assert round(m.num_params() / 1e6, 1) == tot, (name, m.num_params())
    with torch.device("meta"):
        m = StateTransition(STConfig.from_name("paper", n_in=2058, n_pert=1139, n_genes=2000,
                                               gene_space=False))
    assert 225e6 < m.num_params() < 250e6  # SPEC: state_lg on 2058-d + decoder ~238M
    assert STConfig.from_name("paper").set_size == 256
    assert STConfig.from_name("paper").decoder_weight == 0.1
    assert STConfig.from_name("tiny").hidden == 64
    with pytest.raises(KeyError):
        STConfig.from_name("huge")


def test_flops_and_optimizer():
    m = StateTransition(tiny())
    c = m.cfg
    n_mm = m.num_params(matmul_only=True)
    assert n_mm < m.num_params()
    assert m.estimate_flops(8) == 6 * n_mm * 8 * 16 + 12 * c.n_layers * c.hidden * 16 * 16 * 8
    opt = m.configure_optimizer(lr=1e-4)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-4
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_init_weights_on_meta_then_empty():
    with torch.device("meta"):
        m = StateTransition(tiny())
    m.to_empty(device="cpu")
    m.init_weights()
    std = m.blocks[0].attn.wqkv.weight.std().item()
    assert 0.015 < std < 0.025
    assert (m.norm.weight == 1).all()
    assert torch.isfinite(m(torch.rand(1, 16, 37), torch.tensor([0]))).all()


def test_config_round_trip():
    c = tiny(confidence_token=True, decoder_hidden=(8, 4))
    assert STConfig.from_dict(c.to_dict()) == c


def test_configurator():
    ns = {"lr": 1e-4, "steps": 10, "name": "x", "flag": False}
    configure(["--lr=3e-4", "--steps=20", "--name=abc", "--flag"], ns)
    assert ns == {"lr": 3e-4, "steps": 20, "name": "abc", "flag": True}
    configure(["--lr=1"], ns)  # an int where a float is expected is fine
    assert ns["lr"] == 1.0 and isinstance(ns["lr"], float)
    with pytest.raises(ValueError, match="unknown"):
        configure(["--nope=1"], ns)
    with pytest.raises(ValueError, match="expected int"):
        configure(["--steps=0.5"], ns)
    with pytest.raises(ValueError, match="expected a bool"):
        configure(["--flag=3"], ns)


def test_config_file_names_are_checked(tmp_path):
    """A config file sets known names (imports and helpers aside); a misspelt name is refused, not dropped;
    --key=value after the file wins; config/st_cpu.py is the cpu preset."""
    ns = {"lr": 1e-4, "steps": 10}
    f = tmp_path / "c.py"
    f.write_text("import math\ndef twice(x):\n    return 2 * x\nlr = twice(1e-3)\nsteps = int(math.sqrt(400))\n")
    configure([str(f), "--steps=7"], ns)
    assert ns == {"lr": 2e-3, "steps": 7}
    f.write_text("lr = 1e-3\nstep = 5\n")
    with pytest.raises(ValueError, match="sets step, which is not a setting here"):
        configure([str(f)], ns)
    from state.config import CONFIG_DIR, read
    from state.st import PRESETS, TRAIN_DEFAULTS
    cpu = read(os.path.join(CONFIG_DIR, "st_cpu.py"))
    assert {k: v for k, v in cpu.items() if k != "preset"} == {**TRAIN_DEFAULTS["cpu"], **{
        k: PRESETS["cpu"][k] for k in cpu if k in PRESETS["cpu"]}}


# -----------------------------------------------------------------------------
# training lowers the loss on real data


def test_training_lowers_loss_on_real_data(gbm_path, tmp_path):
    from state.prepare import prepare
    from state.sampler import SetSampler
    D = prepare([str(gbm_path)], tmp_path / "gbm", pert_col="perturbation", control="control",
                context_col="cell_type", keep={"cell_type": ["A172", "T98G", "U87MG"]})
    torch.manual_seed(0)
    cfg = STConfig.from_name("tiny", n_in=D.n_genes, n_pert=len(D.pert_names), set_size=32)
    m = StateTransition(cfg)
    opt = m.configure_optimizer(lr=1e-3)
    rows = np.arange(D.n_cells)
    fixed = SetSampler(D, rows, set_size=32, batch_size=8, seed=123, train=True).next()

    def eval_loss():
        m.eval()
        with torch.no_grad():
            l = m(fixed["ctrl"], fixed["pert"], tgt=fixed["tgt"])[0].item()
        m.train()
        return l
    before = eval_loss()
    s = SetSampler(D, rows, set_size=32, batch_size=8, seed=0, train=True)
    for _ in range(40):
        b = s.next()
        loss, _ = m(b["ctrl"], b["pert"], tgt=b["tgt"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 10.0)
        opt.step()
        opt.zero_grad()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_config_file_that_fails_is_one_line(tmp_path):
    """A config file with a syntax error, a line that raises, bytes that are not UTF-8 or a wrong type is the
    user's mistake: a UserError naming the file (and its line), not a traceback."""
    from state.errors import UserError
    ns = {"lr": 1e-4, "steps": 10}
    f = tmp_path / "c.py"
    for text, want in ((b"lr = = 1\n", r"c.py:1: not valid Python"),
                       (b"import os\nlr = 1/0\n", r"c.py:2: running the config file failed \(ZeroDivisionError"),
                       (b"from state.nothere import x\n", r"c.py:1: running the config file failed"),
                       (b"lr = 1e-3 \xff\xfe\n", r"c.py:1: not valid Python"),
                       (b"lr = 1e-3\x00\n", r"c.py: not valid Python"),
                       (b"lr = 'abc'\n", r"c.py: --lr: expected float")):
        f.write_bytes(text)
        with pytest.raises(UserError, match=want):
            configure([str(f)], ns)
    assert ns == {"lr": 1e-4, "steps": 10}
