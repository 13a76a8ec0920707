"""The generation task: noise schedule, DDPM UNet, DiffusionTask losses, diffusion attacks and demo report."""
import json
import math

import pytest
import torch
from torch import nn

from sophon_fast import models
from sophon_fast.attacks import diffusion as dattacks
from sophon_fast.io import load_model, save_model
from sophon_fast.models.diffusion import DDPMUNet, NoiseSchedule
from sophon_fast.tasks.diffusion import DiffusionTask, eps_mse

T = 1000


def _linear_betas(T=T):
    """The linear schedule written out: beta_t = 1e-4 + (0.02 - 1e-4) t / (T - 1), fp64."""
    return torch.tensor([1e-4 + (0.02 - 1e-4) * t / (T - 1) for t in range(T)], dtype=torch.float64)


def _tiny_unet(seed=0):
    return models.build("ddpm_unet_small", widths=(8, 16), norm_groups=4, seed=seed)


class Recorder(nn.Module):
    """A denoiser eps(x, t) = w * x that records the timesteps and inputs it was called with."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x, t))
        return self.w * x


# ---------------------------------------------------------------- schedule


def test_schedule_tables_match_closed_forms():
    s = NoiseSchedule().double()
    betas = _linear_betas()
    torch.testing.assert_close(s.betas, betas, rtol=1e-6, atol=0)
    ac = torch.exp(torch.cumsum(torch.log1p(-betas), 0))
    torch.testing.assert_close(s.alphas_cumprod, ac, rtol=1e-6, atol=0)
    assert s.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - betas[1].item()), rel=1e-6)
    assert math.sqrt(1 - s.alphas_cumprod[1].item()) == pytest.approx(0.0148, abs=1e-4)   # "t = 1" noise std
    # q(x_{t-1} | x_t, x0) by Gaussian conditioning: precision 1/(1 - ac_prev) + alpha/beta
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    alphas = 1 - betas
    var = 1 / (1 / (1 - ac_prev[1:]) + alphas[1:] / betas[1:])
    torch.testing.assert_close(s.posterior_variance[1:], var, rtol=1e-5, atol=0)
    assert s.posterior_variance[0].item() == 0.0
    coef1 = var * ac_prev[1:].sqrt() / (1 - ac_prev[1:])
    torch.testing.assert_close(s.posterior_mean_coef1[1:], coef1, rtol=1e-5, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef2[1:], var * alphas[1:].sqrt() / betas[1:], rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [1, 300, 999])
def test_q_sample_moments(t):
    s = NoiseSchedule().double()
    n = 200_000
    gen = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    xt = s.q_sample(x0, torch.full((n,), t, dtype=torch.long), torch.randn(n, 1, generator=gen, dtype=torch.float64))
    ac = torch.prod(1 - _linear_betas()[:t + 1]).item()
    sd = math.sqrt(1 - ac)
    assert xt.mean().item() == pytest.approx(math.sqrt(ac) * 0.7, abs=5 * sd / math.sqrt(n))
    assert xt.var().item() == pytest.approx(1 - ac, abs=5 * (1 - ac) * math.sqrt(2 / n))


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timesteps"):
        NoiseSchedule(1)
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule(10, 0.02, 1e-4)
    s = NoiseSchedule(10)
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        s.q_sample(x, torch.zeros(3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="noise"):
        s.p_step(x, x, 0, x)
    with pytest.raises(ValueError, match="noise"):
        s.p_step(x, x, 3, None)


def test_p_step_is_the_posterior_sample():
    s = NoiseSchedule(50).double()
    gen = torch.Generator().manual_seed(0)
    x_t, eps, noise = (torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64) * 0.3 for _ in range(3))
    t = 17
    ac, ac_prev, beta = s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]
    x0 = ((x_t - (1 - ac).sqrt() * eps) / ac.sqrt()).clamp(-1, 1)
    var = beta * (1 - ac_prev) / (1 - ac)
    mean = (ac_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ac_prev) * x_t) / (1 - ac)
    # the tables are stored in fp32: agreement to their precision
    torch.testing.assert_close(s.p_step(eps, x_t, t, noise), mean + var.sqrt() * noise, rtol=1e-6, atol=1e-6)


def test_sampling_with_the_exact_denoiser_of_a_point_mass_returns_the_point():
    s = NoiseSchedule(30).double()
    target = torch.linspace(-0.8, 0.8, 16, dtype=torch.float64).view(1, 1, 4, 4)

    class Oracle(nn.Module):
        def forward(self, x, t):   # eps = (x_t - sqrt(ac) x0) / sqrt(1 - ac) for the only x0
            ac = s.alphas_cumprod[t].view(-1, 1, 1, 1)
            return (x - ac.sqrt() * target) / (1 - ac).sqrt()

    out = s.sample(Oracle(), 5, (1, 4, 4), torch.Generator().manual_seed(1))
    # fp32 tables: sqrt(ac) and sqrt(1 - ac) are rounded separately, amplified by 1 / sqrt(1 - ac[0]) = 100
    torch.testing.assert_close(out, target.expand(5, -1, -1, -1), rtol=0, atol=1e-5)
    again = s.sample(Oracle(), 5, (1, 4, 4), torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


# ---------------------------------------------------------------- UNet


def test_unet_shapes_groupnorm_and_arch_record(tmp_path):
    m = _tiny_unet()
    assert isinstance(m, DDPMUNet)
    assert any(isinstance(mod, nn.GroupNorm) for mod in m.modules())
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    x = torch.randn(3, 1, 28, 28)
    out = m(x, torch.tensor([0, 1, 999]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert m(x, torch.tensor(5)).shape == x.shape
    assert m.sophon_arch["name"] == "ddpm_unet_small"
    path = save_model(m, tmp_path / "unet.safetensors")
    again = load_model(path)
    t = torch.tensor([3, 4, 5])
    torch.testing.assert_close(again(x, t), m.eval()(x, t))
    with pytest.raises(ValueError, match="expected x"):
        m(torch.randn(2, 3, 28, 28), t[:2])
    with pytest.raises(ValueError, match="norm_groups"):
        models.build("ddpm_unet_small", widths=(6, 16), norm_groups=4)
    with pytest.raises(ValueError, match="divisible"):
        models.build("ddpm_unet_small", image_size=30, widths=(8, 16, 16), norm_groups=4)


def test_unet_builds_on_the_seed():
    a, b, c = _tiny_unet(3), _tiny_unet(3), _tiny_unet(4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


# ---------------------------------------------------------------- task


def _direct(model, x0, timestep, seed):
    """The task's draw written out in fp64: t, then eps, from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.ones(x0.shape[0], dtype=torch.long) if timestep == "fixed1" else torch.randint(0, T, (x0.shape[0],),
                                                                                             generator=gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    ac = torch.cumprod(1 - _linear_betas(), 0)[t].view(-1, 1, 1, 1)
    pred = model(ac.sqrt() * x0 + (1 - ac).sqrt() * eps, t)
    return pred, eps


@pytest.mark.parametrize("timestep", ["fixed1", "uniform"])
def test_task_losses_match_direct_formulas_fp64(timestep):
    model = _tiny_unet().double()
    task = DiffusionTask(timestep, NoiseSchedule().double())
    x0 = torch.rand(4, 1, 28, 28, dtype=torch.float64) * 2 - 1
    (batch,) = [task.prepare(model, (x0, torch.zeros(4, dtype=torch.long)), "restricted")]
    pred, eps = _direct(model, x0, timestep, 7)
    mse, dos = ((pred - eps) ** 2).mean(), (pred ** 2).mean()
    g = lambda: torch.Generator().manual_seed(7)   # noqa: E731
    torch.testing.assert_close(task.attacker_loss(model, batch, g()), mse)
    torch.testing.assert_close(task.train_loss(model, batch, g()), mse)
    torch.testing.assert_close(task.suppression_loss(model, batch, "dos", g()), dos)
    torch.testing.assert_close(task.suppression_loss(model, batch, "mse_neg", g()), -mse)
    loss = task.suppression_loss(model, batch, "dos", g())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fixed1_and_uniform_timesteps():
    x0 = torch.zeros(256, 1, 4, 4)
    seen = {}
    for timestep in ("fixed1", "uniform"):
        model = Recorder()
        DiffusionTask(timestep).attacker_loss(model, (x0,), torch.Generator().manual_seed(0))
        seen[timestep] = model.calls[0][1]
    assert seen["fixed1"].dtype == torch.long and bool((seen["fixed1"] == 1).all())
    t = seen["uniform"]
    assert int(t.min()) >= 0 and int(t.max()) < T and t.unique().numel() > 100


def test_suppression_tmax_draws_the_suppression_timesteps_below_it_and_nothing_else():
    x0 = torch.zeros(256, 1, 4, 4)
    task = DiffusionTask("uniform", suppression_tmax=300)
    seen = {}
    for name, call in (("dos", lambda m: task.suppression_loss(m, (x0,), "dos", torch.Generator().manual_seed(0))),
                       ("mse_neg", lambda m: task.suppression_loss(m, (x0,), "mse_neg", torch.Generator().manual_seed(0))),
                       ("attacker", lambda m: task.attacker_loss(m, (x0,), torch.Generator().manual_seed(0))),
                       ("ntr", lambda m: task.train_loss(m, (x0,), torch.Generator().manual_seed(0)))):
        model = Recorder()
        call(model)
        seen[name] = model.calls[0][1]
    for name in ("dos", "mse_neg"):
        assert int(seen[name].max()) < 300 and seen[name].unique().numel() > 100
    for name in ("attacker", "ntr"):            # 256 draws from U{0..999}: all below 300 has probability 0.3^256
        assert int(seen[name].max()) >= 300
    # without suppression_tmax the suppression loss draws from U{0..T-1} on the same generator stream
    model = Recorder()
    DiffusionTask("uniform").suppression_loss(model, (x0,), "dos", torch.Generator().manual_seed(0))
    assert torch.equal(model.calls[0][1], seen["attacker"])


@pytest.mark.parametrize("tmax, timestep", [(0, "uniform"), (1001, "uniform"), (True, "uniform"), (2.5, "uniform"),
                                            (300, "fixed1")])
def test_suppression_tmax_rejects_bad_values(tmax, timestep):
    with pytest.raises(ValueError, match="suppression_tmax"):
        DiffusionTask(timestep, suppression_tmax=tmax)


def test_config_suppression_tmax_builds_the_task_and_a_conflicting_task_object_is_refused():
    import sophon_fast as sf
    from sophon_fast.engine import ProtectConfig
    from sophon_fast.engine.loop import _task_for

    cfg = ProtectConfig(task="diffusion", loss="mse_neg", timestep="uniform", suppression_tmax=300)
    task = _task_for(cfg, None)
    assert isinstance(task, DiffusionTask) and task.timestep == "uniform" and task.suppression_tmax == 300
    assert _task_for(cfg, DiffusionTask("uniform", suppression_tmax=300)) is not None
    for bad in (dict(task="diffusion", suppression_tmax=300),                      # timestep None: t = 1
                dict(task="diffusion", timestep="fixed1", suppression_tmax=300),
                dict(task="classification", suppression_tmax=300),
                dict(task="diffusion", timestep="uniform", suppression_tmax=0)):
        with pytest.raises(ValueError, match="suppression_tmax"):
            ProtectConfig(**bad)
    x = (torch.rand(8, 1, 28, 28) * 2 - 1,)
    for task in (DiffusionTask("uniform"), DiffusionTask("fixed1"), DiffusionTask("uniform", suppression_tmax=10)):
        with pytest.raises(ValueError, match="the config sets"):
            sf.protect(_tiny_unet(), x, x, cfg.replace(iterations=1), task=task)


def test_task_losses_create_every_tensor_on_the_model_device():
    model = _tiny_unet().to("meta")
    task = DiffusionTask("uniform")
    batch = (torch.empty(4, 1, 28, 28, device="meta"),)
    for name in ("dos", "mse_neg"):
        assert task.suppression_loss(model, batch, name, None).device.type == "meta"
    assert task.attacker_loss(model, batch, None).device.type == "meta"
    assert task.train_loss(model, batch, None).device.type == "meta"
    rec = Recorder().to("meta")
    DiffusionTask("fixed1").attacker_loss(rec, batch, None)
    assert all(x.device.type == "meta" and t.device.type == "meta" for x, t in rec.calls)


def test_prepare_accepts_image_containers_and_rejects_bad_input():
    model, task = _tiny_unet(), DiffusionTask()
    x = torch.rand(6, 1, 28, 28)
    for data in (x, (x,), (x, torch.arange(6)), torch.utils.data.TensorDataset(x),
                 torch.utils.data.TensorDataset(x, torch.arange(6))):
        (out,) = task.prepare(model, data, "original")
        assert torch.equal(out, x)
    with pytest.raises(ValueError, match="restricted images must be"):
        task.prepare(model, x[:, 0], "restricted")
    with pytest.raises(ValueError, match="restricted images must be"):
        task.prepare(model, (x * 255).to(torch.uint8), "restricted")
    with pytest.raises(ValueError, match="rejected original images"):
        task.prepare(model, torch.rand(2, 3, 28, 28), "original")

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(784, 10)

        def forward(self, x, t):
            return self.lin(x.flatten(1))

    with pytest.raises(ValueError, match="shaped like its input"):
        task.prepare(Classifier(), x, "original")


def test_task_contract_details():
    model, task = _tiny_unet(), DiffusionTask("uniform", eval_batch_size=3)
    assert task.higher_is_better is False and task.head(model) is None
    with pytest.raises(ValueError, match="no head"):
        task.reinit_head(model, torch.Generator())
    with pytest.raises(ValueError, match="suppression loss"):
        task.suppression_loss(model, (torch.zeros(2, 1, 28, 28),), "ice", torch.Generator())
    with pytest.raises(ValueError, match="timestep"):
        DiffusionTask("t1")
    data = task.prepare(model, torch.rand(5, 1, 28, 28) * 2 - 1, "original")
    value = task.evaluate(model, data)
    assert value == task.evaluate(model, data)   # a fixed generator: the same draws on every call
    assert value == pytest.approx(eps_mse(model, task.schedule, data[0], "uniform", 0, batch_size=2).item(), rel=1e-5)
    assert DiffusionTask("fixed1").evaluate(model, data) == pytest.approx(
        eps_mse(model, task.schedule, data[0], 1).item(), rel=1e-6)


# ---------------------------------------------------------------- attacks


def test_attack_validation_and_eval_points():
    a = dattacks.DiffusionAttack(optimizer="momentum", lr=1e-2, steps=250, eval_every=100)
    assert a.eval_points() == [0, 100, 200, 250] and a.name == "momentum-lr0.01-bs64-st250"
    assert dattacks.DiffusionAttack(steps=0).eval_points() == [0]
    for bad in ({"optimizer": "lbfgs"}, {"lr": 0.0}, {"timestep": "t1"}, {"eval_every": 0}):
        with pytest.raises(ValueError):
            dattacks.DiffusionAttack(**bad)
    assert len(dattacks.suite(quick=True)) == 2 and len(dattacks.suite()) == 3


def test_attack_suite_schema_on_a_tiny_budget(tmp_path):
    protected, unprotected = _tiny_unet(1), _tiny_unet(2)
    before = [p.detach().clone() for p in protected.parameters()]
    x_train, x_test = torch.rand(12, 1, 28, 28) * 2 - 1, torch.rand(5, 1, 28, 28) * 2 - 1
    attacks = [dattacks.DiffusionAttack(optimizer="adam", lr=1e-3, batch_size=4, steps=2, eval_every=1)]
    schedule = NoiseSchedule(20)
    out = dattacks.evaluate_suite(protected, unprotected, (x_train,), (x_test, torch.zeros(5)), attacks,
                                  schedule=schedule, samples=2, sample_dir=str(tmp_path))
    assert out["metric"] == "eps_mse" and out["higher_is_better"] is False
    (row,) = out["attacks"]
    assert row["steps"] == [0, 1, 2] and row["train_steps"] == 2
    for key in ("protected", "unprotected", "scratch", "protected_t1", "unprotected_t1", "scratch_t1"):
        assert len(row[key]) == 3 and all(v > 0 for v in row[key])
    assert row["protected"][0] != row["scratch"][0]
    assert (tmp_path / row["samples"]).stat().st_size > 0
    json.dumps(out, allow_nan=False)
    assert all(torch.equal(p, q) for p, q in zip(before, protected.parameters()))
    # the same attack on the same seed reproduces the curves; scratch is the architecture rebuilt on the seed
    again = dattacks.run(_tiny_unet(0), (x_train,), (x_test,), attacks[0], schedule=schedule)
    assert again["uniform"] == row["scratch"] and again["t1"] == row["scratch_t1"]
    alone = dattacks.evaluate_suite(protected, None, (x_train,), (x_test,), attacks, schedule=schedule, samples=0)
    assert alone["attacks"][0]["unprotected"] is None and alone["attacks"][0]["protected"] == row["protected"]


# ---------------------------------------------------------------- protect + demo report


def _tiny_protect(mode, timestep):
    import sophon_fast as sf
    from sophon_fast.engine import ProtectConfig, Strategy

    gen = torch.Generator().manual_seed(0)
    original, restricted = (torch.rand(40, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2))
    cfg = ProtectConfig(task="diffusion", loss="dos", mode=mode, iterations=2, inner_steps=2, ntr_steps=1,
                        ntr_batch_size=8, strategies=[Strategy("adam", lr=1e-3, batch_size=12, query_size=4)],
                        evaluation={"every": 2, "size": 10, "max_drop": None}, progress=False)
    return sf.protect(_tiny_unet().double(), (original,), (restricted,), cfg, task=DiffusionTask(timestep),
                      original_test=(original[:10],))


@pytest.mark.parametrize("timestep", ["fixed1", "uniform"])
def test_protect_runs_the_diffusion_task_and_fast_matches_reference(timestep):
    fast, ref = _tiny_protect("fast", timestep), _tiny_protect("reference", timestep)
    assert len(fast.history) == 2 and math.isfinite(fast.original_metric)
    start = _tiny_unet().double()
    assert not all(torch.equal(p, q) for p, q in zip(start.parameters(), fast.model.parameters()))
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    assert float((flat(fast.model) - flat(ref.model)).norm() / flat(ref.model).norm()) <= 1e-9   # fp64, as elsewhere


def test_demo_config_and_report(tmp_path):
    from sophon_fast.apps import diffusion_demo as dd
    from sophon_fast.engine.loop import _task_for

    quick, full = dd.demo_config(True), dd.demo_config(False)
    assert quick.task == "diffusion" and quick.loss == "mse_neg" and quick.suppression_tmax == 300
    assert isinstance(_task_for(full, None), DiffusionTask)
    assert quick.iterations * quick.inner_steps < full.iterations * full.inner_steps
    unprotected, protected = _tiny_unet(1), _tiny_unet(2)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    data = dd.DemoData(unprotected, x, x[:4], x, x[:4], NoiseSchedule(20), pretrain={"steps": 0})
    attacks = dattacks.evaluate_suite(protected, unprotected, x, x[:4], [dattacks.DiffusionAttack(
        batch_size=4, steps=1, eval_every=1)], schedule=data.schedule, samples=2, sample_dir=str(tmp_path))
    report = dd.build_report(data, protected, attacks, quick.to_dict(), {"total": 1.0}, quick=True)
    assert set(report) >= {"domains", "metric", "higher_is_better", "original", "attacks", "targets"}
    assert set(report["original"]) >= {"unprotected", "protected"} and report["higher_is_better"] is False
    row = report["attacks"][0]
    assert row["head_start"] == [s - u for s, u in zip(row["scratch"], row["unprotected"])]
    from sophon_fast.apps.report import write_report
    paths = write_report(report, str(tmp_path))
    assert json.loads(open(paths["json"]).read())["metric"] == "eps_mse"
    md = open(paths["md"]).read()
    assert f"]({row['samples']})" in md and (tmp_path / row["samples"]).exists()
