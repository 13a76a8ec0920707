"""protect on torch.distributed (gloo, 2 processes started here): the weights of a 1-process run of the same
trajectories, resume, and a clear error when a rank dies; the same for a model sharded with FSDP2.

``SOPHON_TEST_BACKEND=nccl`` runs the ranks on NCCL, one GPU each (benchmarks/run_gpu.sh does so on a machine
with 2 GPUs or more); the one-process runs they are compared with stay on the CPU."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sophon_fast as sf
from sophon_fast.defences import TrapConfig
from sophon_fast.distributed import DistributedError

WORLD = 2
BACKEND = os.environ.get("SOPHON_TEST_BACKEND", "gloo")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).double()


def data(seed, n=120):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def config(**kw):
    strats = [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8, attacker="reinit_head"),
              sf.Strategy("adam", lr=1e-3, batch_size=20, query_size=5, steps=2)]
    base = dict(loss="ice", iterations=3, inner_steps=3, strategies=strats, trajectories=2, ntr_steps=2,
                ntr_batch_size=16, progress=False, defences=[TrapConfig(weight=0.3, margin=0.5)])
    return sf.ProtectConfig(**{**base, **kw})


def flat(m):
    """Every weight in one vector on the CPU (sharded weights gathered: every rank must call it)."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).cpu()
                      for p in m.parameters()])


def shard(net):
    """FSDP2: each Linear its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard
    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    return fully_shard(net)


def lm_model():
    from sophon_fast.models import lm
    net = lm.gpt2(61, n_layer=2, n_embd=16, n_head=2, n_positions=10, seed=0).double()
    lm.untie_head(net)
    return net


def lm_data(seed, n=24, pad_rows=3):
    """(input_ids, labels) with padding at the end of the last rows: ranks get unequal counted tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 61, (n, 10), generator=g)
    labels = ids.clone()
    for i in range(pad_rows):
        labels[n - 1 - i, 4 + i:] = -100
    return ids, labels


def lm_config(**kw):
    strats = [sf.Strategy("sgd", lr=1e-2, batch_size=8, query_size=3, attacker="reinit_head"),
              sf.Strategy("adam", lr=1e-3, batch_size=7, query_size=3)]
    return sf.ProtectConfig(**{**dict(task="lm", loss="klu", iterations=2, inner_steps=2, strategies=strats,
                                      trajectories=2, ntr_steps=1, ntr_batch_size=6, progress=False), **kw})


def shard_lm(net, bf16=False):
    """FSDP2 for a transformers model: each block, the decoder (the task calls ``base_model``), the root;
    ``bf16``: fp32 shards computing in bf16 (MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    for block in net.transformer.h:
        fully_shard(block, **kw)
    fully_shard(net.transformer, **kw)
    return fully_shard(net, **kw)


def _worker(rank, tmp, cfg_dict, restricted_seeds, die_at, sharded=False):
    device = "cpu"
    if BACKEND == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(BACKEND, init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    if cfg_dict.get("task") == "lm":
        net = lm_model().to(device)
        if sharded == "bf16":
            net = shard_lm(net.float(), bf16=True)
        elif sharded:
            net = shard_lm(net)
        res = sf.protect(net, lm_data(1), lm_data(2), sf.ProtectConfig.from_dict(cfg_dict))
        torch.save(flat(res.model), f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()
        return
    net = model().to(device)
    net = shard(net) if sharded else net
    if die_at is not None and rank == 1:
        calls = [0]

        def hook(mod, args):
            calls[0] += 1
            if calls[0] == die_at:
                os._exit(3)
        net.register_forward_pre_hook(hook)
    try:
        res = sf.protect(net, data(1), [data(s) for s in restricted_seeds], sf.ProtectConfig.from_dict(cfg_dict))
        torch.save(flat(res.model), f"{tmp}/rank{rank}.pt")
    except DistributedError as e:
        with open(f"{tmp}/error{rank}.txt", "w") as f:
            f.write(str(e))
    finally:
        if die_at is None:
            dist.destroy_process_group()


def run_ranks(tmp, cfg, restricted_seeds=(2,), die_at=None, timeout=120, sharded=False):
    """Start WORLD spawned ranks and wait for all of them; returns the seconds they took."""
    os.makedirs(tmp, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp), cfg.to_dict(), list(restricted_seeds), die_at, sharded))
             for r in range(WORLD)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, timeout - (time.monotonic() - t0)))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "the ranks hung"
    return time.monotonic() - t0


@pytest.mark.parametrize("mode", ["fast", "reference", "fast-unrolled"])
def test_two_ranks_give_the_weights_of_one_process(tmp_path, mode):
    """2 trajectories per iteration (one per rank), 2 restricted domains, a defence and NTR split over ranks."""
    cfg = config(mode=mode.split("-")[0], meta_gradient="unrolled" if mode.endswith("unrolled") else "first_order")
    run_ranks(tmp_path, cfg, restricted_seeds=(2, 3))
    one = flat(sf.protect(model(), data(1), [data(2), data(3)], cfg).model)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)
    assert not torch.equal(one, flat(model()))
    assert float((r0 - one).norm() / one.norm()) <= 1e-9


def test_resume_under_two_ranks_equals_the_uninterrupted_run(tmp_path):
    full = config(iterations=4)
    run_ranks(tmp_path / "a", full)
    ck = sf.Checkpointing(str(tmp_path / "ck"), every=1, resume=True)
    run_ranks(tmp_path / "b", config(iterations=2, checkpoint=ck))        # stopped after 2 iterations
    run_ranks(tmp_path / "c", config(iterations=4, checkpoint=ck))        # resumed by both ranks
    want = torch.load(tmp_path / "a" / "rank0.pt")
    for r in range(WORLD):
        assert torch.equal(torch.load(tmp_path / "c" / f"rank{r}.pt"), want)


@pytest.mark.skipif(BACKEND != "gloo", reason="gloo sees the closed connection; NCCL waits for its timeout")
def test_a_dead_rank_is_a_clear_error_not_a_hang(tmp_path):
    seconds = run_ranks(tmp_path, config(iterations=20), die_at=40, timeout=90)   # rank 1 exits mid-run
    msg = (tmp_path / "error0.txt").read_text()
    assert "another rank probably died" in msg and "rank 0 of 2" in msg
    assert seconds < 90


def test_fsdp2_sharded_model_gives_the_weights_of_one_process(tmp_path):
    """FSDP2 shards: every rank runs every trajectory on its rows (uneven: 15 support rows split 7/8), the
    reduce-scatter sums the shares; a head re-initialisation, Adam and SGD inner steps, NTR, clipping, a defence."""
    _sharded_equals_one_process(tmp_path, config(in_place=True, clip_norm=0.5))


def _sharded_equals_one_process(tmp_path, cfg):
    """Two FSDP2 ranks on restricted domains 2 and 3 give the same weights, those of one process (1e-9)."""
    run_ranks(tmp_path, cfg, restricted_seeds=(2, 3), sharded=True)
    one = flat(sf.protect(model(), data(1), [data(2), data(3)], cfg).model)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)
    assert not torch.equal(one, flat(model()))
    assert float((r0 - one).norm() / one.norm()) <= 1e-9


def test_fsdp2_every_first_order_attacker_kind_gives_the_weights_of_one_process(tmp_path):
    """Fresh heads (drawn in full on every rank, each keeping its shard; a constant of the meta-gradient), a probe
    on the frozen body, and the simulated schedules (warm-up + cosine, benign-first steps, late query weights)."""
    strats = [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8, attacker="fresh_head"),
              sf.Strategy("adam", lr=1e-3, batch_size=20, query_size=5, attacker="probe", benign_steps=1,
                          schedule="warmup_cosine", warmup=2),
              sf.Strategy("momentum", lr=1e-2, batch_size=24, query_size=8, attacker="as_is", query_weighting="late")]
    _sharded_equals_one_process(tmp_path, config(in_place=True, strategies=strats, trajectories=3, defences=[]))


def test_fsdp2_resume_equals_the_uninterrupted_run(tmp_path):
    run_ranks(tmp_path / "a", config(in_place=True, iterations=4), sharded=True)
    ck = sf.Checkpointing(str(tmp_path / "ck"), every=1, resume=True)
    run_ranks(tmp_path / "b", config(in_place=True, iterations=2, checkpoint=ck), sharded=True)
    assert sorted(os.listdir(tmp_path / "ck")) == ["protect.rank0-of-2.pt", "protect.rank1-of-2.pt"]
    run_ranks(tmp_path / "c", config(in_place=True, iterations=4, checkpoint=ck), sharded=True)
    want = torch.load(tmp_path / "a" / "rank0.pt")
    for r in range(WORLD):
        assert torch.equal(torch.load(tmp_path / "c" / f"rank{r}.pt"), want)


def test_fsdp2_language_model_gives_the_weights_of_one_process(tmp_path):
    """A GPT-2 sharded block by block: the head used outside its module's forward, padding that gives the
    ranks unequal counted tokens (weighted exactly by Task.loss_weight), a head re-initialisation. The outer
    Adam turns gradient components that are zero up to rounding into steps of lr * noise / eps, so the ranks'
    other summation order shows at ~1e-10 here (outer SGD: ~1e-14)."""
    cfg = lm_config(in_place=True)
    run_ranks(tmp_path, cfg, sharded=True, timeout=180)
    one = flat(sf.protect(lm_model(), lm_data(1), lm_data(2), cfg).model)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)
    assert not torch.equal(one, flat(lm_model()))
    assert float((r0 - one).norm() / one.norm()) <= 1e-9


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store1", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_settings_are_checked(one_rank_group):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    net = shard(model())
    lora = [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8, attacker={"kind": "lora", "rank": 2})]
    for bad, msg in ((dict(in_place=True, mode="reference"), "mode='fast'"), (dict(), "in_place=True"),
                     (dict(in_place=True, device="cpu"), "device=None"),
                     (dict(in_place=True, meta_gradient="unrolled"), "unrolled' does not run on an FSDP2-sharded"),
                     (dict(in_place=True, strategies=lora), "lora attacker, which does not run on an FSDP2")):
        with pytest.raises(ValueError, match=msg):
            sf.protect(net, data(1), data(2), config(**bad))
    half = model().to(torch.bfloat16)
    fully_shard(half, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="fp32 shards"):
        sf.protect(half, data(1), data(2), config(in_place=True, defences=[]))
    one = sf.protect(shard(model()), data(1), data(2), config(in_place=True)).model     # 1 rank: runs as usual
    want = flat(sf.protect(model(), data(1), data(2), config()).model)
    assert float((flat(one) - want).norm() / want.norm()) <= 1e-9


def test_fsdp2_bf16_compute_keeps_fp32_shards_and_follows_the_fp32_run(tmp_path):
    """fp32 shards computing in bf16 (FSDP2's MixedPrecisionPolicy; the head cast to the hidden states' dtype):
    the shards stay fp32 and the protection's update points the way of a one-process fp32 run's."""
    cfg = lm_config(in_place=True)
    run_ranks(tmp_path, cfg, sharded="bf16", timeout=180)
    base = flat(lm_model().float())
    one = flat(sf.protect(lm_model().float(), lm_data(1), lm_data(2), cfg).model)
    r0 = torch.load(tmp_path / "rank0.pt")
    assert r0.dtype == torch.float32 and torch.isfinite(r0).all()
    u, v = r0 - base, one - base
    assert float(u @ v / (u.norm() * v.norm())) > 0.9
