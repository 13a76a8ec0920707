"""Language-model pieces: text data, adapters, the LM task's losses, tied heads, LM attacks."""
import json
import math

import pytest
import torch
from torch import nn

from sophon_fast import functional
from sophon_fast.attacks import lm as lm_attacks
from sophon_fast.data import text
from sophon_fast.models import lm
from sophon_fast.tasks.lm import LanguageModelTask

V, T = 97, 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return text.train_tokenizer(300, corpora=("python",), chars_per_corpus=40_000)


def _gpt2(**kw):
    return lm.gpt2(V, n_layer=1, n_embd=16, n_head=2, n_positions=T, seed=0, **kw)


def _llama(**kw):
    return lm.llama(V, n_layer=1, hidden=16, n_head=2, n_kv_head=1, max_positions=T, seed=0, **kw)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _batch(n=4, seed=1, pad_rows=2):
    """(input_ids, labels): random tokens; the last ``pad_rows`` rows end in padding (-100 labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (n, T), generator=g)
    labels = ids.clone()
    for i in range(pad_rows):
        cut = T - 3 - 2 * i
        ids[n - 1 - i, cut:] = 1
        labels[n - 1 - i, cut:] = -100
    return ids, labels


# ---- data -------------------------------------------------------------------------------------
def test_tokenizer_is_deterministic_and_cached(tmp_path):
    a = text.train_tokenizer(300, corpora=("python",), chars_per_corpus=40_000)
    b = text.train_tokenizer(300, corpora=("python",), chars_per_corpus=40_000, cache_dir=str(tmp_path))
    assert a.to_str() == b.to_str()
    assert len(list(tmp_path.iterdir())) == 1
    c = text.train_tokenizer(300, corpora=("python",), chars_per_corpus=40_000, cache_dir=str(tmp_path))
    assert c.to_str() == a.to_str() and c.get_vocab_size() == 300
    assert text.special_ids(a) == (0, 1)


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        text.train_tokenizer(100, corpora=("python",))
    with pytest.raises(ValueError, match="unknown text corpus"):
        text.texts("klingon", "train")
    with pytest.raises(ValueError, match="split"):
        text.texts("python", "valid")


def test_splits_are_disjoint_and_stable():
    train, test = text.texts("python", "train"), text.texts("python", "test")
    assert train and test and not set(train) & set(test)
    assert 0.02 < len(test) / (len(train) + len(test)) < 0.25
    assert text.texts("python", "test", max_chars=1) == test[:1]


def test_blocks_shapes_and_padding_labels(tokenizer):
    docs = ["def f(x):\n    return x\n", "import os\n", "class A:\n    pass\n"]
    ids, labels = text.encode_blocks(docs, tokenizer, block_size=8)
    eos, pad = text.special_ids(tokenizer)
    stream = [i for d in docs for i in tokenizer.encode(d).ids + [eos]]
    assert ids.dtype == labels.dtype == torch.int64 and ids.shape == labels.shape
    assert ids.shape == (math.ceil(len(stream) / 8), 8)
    flat_ids, flat_labels = ids.reshape(-1), labels.reshape(-1)
    assert flat_ids[:len(stream)].tolist() == stream
    assert torch.equal(flat_labels[:len(stream)], flat_ids[:len(stream)])
    assert (flat_ids[len(stream):] == pad).all() and (flat_labels[len(stream):] == text.IGNORE_INDEX).all()
    ids2, _ = text.encode_blocks(docs, tokenizer, block_size=4, max_blocks=2)
    assert ids2.shape == (2, 4)
    with pytest.raises(ValueError, match="block_size"):
        text.encode_blocks(docs, tokenizer, block_size=1)


@pytest.mark.skipif("english" not in text.available(), reason="Debian package fortunes not installed")
def test_fortunes_corpus_loads(tokenizer):
    ids, labels = text.load("english", "test", tokenizer, block_size=16, max_blocks=3)
    assert ids.shape == (3, 16) and (labels != text.IGNORE_INDEX).all()


# ---- adapters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [_gpt2, _llama, lambda: _llama(tie=True)], ids=["gpt2", "llama", "llama_tied"])
def test_adapter_hidden_times_head_is_the_logits(build):
    model = build().double().eval()
    ids, _ = _batch()
    adapter = lm.adapter_for(model)
    weight, bias = adapter.head_params(model)
    hidden = adapter.hidden_states(model, ids)
    assert hidden.shape == (4, T, weight.shape[1]) and weight.shape[0] == V
    expected = model(input_ids=ids).logits
    torch.testing.assert_close(nn.functional.linear(hidden, weight, bias), expected, rtol=1e-12, atol=1e-12)
    assert adapter.is_tied(model) == model.config.tie_word_embeddings


def test_hf_adapter_refuses_transformed_logits():
    with pytest.raises(ValueError, match="logit_scale"):
        lm.adapter_for(_gpt2(logit_scale=0.5))
    assert isinstance(lm.adapter_for(_gpt2(logit_scale=1.0)), lm.HFCausalLMAdapter)


def test_callable_adapter_for_a_custom_module():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(V, 8), nn.Linear(8, V)

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))

    model = Tiny().double()
    adapter = lm.CallableAdapter(lambda m, ids, mask: torch.tanh(m.emb(ids)), lambda m: m.out, lambda m: m.emb)
    ids, labels = _batch()
    torch.testing.assert_close(adapter.logits(model, ids), model(ids))
    assert not adapter.is_tied(model)
    with pytest.raises(ValueError, match="no language-model adapter"):
        lm.adapter_for(model)
    task = LanguageModelTask(adapter=adapter)
    loss = task.attacker_loss(model, task.prepare(model, (ids, labels), "x"), torch.Generator())
    assert torch.isfinite(loss)


# ---- task losses against the model's own logits (fp64) ------------------------------------------
def _direct(model, ids, labels, loss):
    z = model(input_ids=ids).logits[:, :-1].reshape(-1, V)
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    z, y = z[keep], y[keep]
    logp = torch.log_softmax(z, -1)
    p_y = logp.gather(1, y[:, None]).squeeze(1).exp()
    rows = {"ce": -logp.gather(1, y[:, None]).squeeze(1),
            "ice": -torch.log1p(-p_y),
            "ice_reference_code": -torch.log_softmax(-z, -1).gather(1, y[:, None]).squeeze(1),
            "klu": torch.logsumexp(z, -1) - z.mean(-1) - math.log(V),
            "neg_entropy": (logp.exp() * logp).sum(-1)}[loss]
    return rows.mean()


@pytest.mark.parametrize("path", ["fused_linear", "materialised"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("loss", ["ce", "ice", "ice_reference_code", "klu", "neg_entropy"])
def test_task_losses_match_direct_computation(build, loss, path, monkeypatch):
    if path == "materialised":
        monkeypatch.delattr(functional, "linear_suppression_loss", raising=False)
    elif loss not in getattr(functional, "LINEAR_LOSSES", ()):
        pytest.skip(f"sophon_fast.functional.linear_suppression_loss does not compute {loss!r}")
    model = build().double()
    task = LanguageModelTask()
    batch = task.prepare(model, _batch(), "test")
    gen = torch.Generator()
    got = task.attacker_loss(model, batch, gen) if loss == "ce" else task.suppression_loss(model, batch, loss, gen)
    params = [p for p in model.parameters()]
    g_got = torch.autograd.grad(got, params)
    want = _direct(model, *batch, loss)
    g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    if loss == "ce":
        torch.testing.assert_close(task.train_loss(model, batch, gen), want)


@pytest.mark.parametrize("path", ["fused_linear", "materialised"])
def test_evaluate_is_token_weighted_loss_and_restores_mode(path, monkeypatch):
    if path == "materialised":
        monkeypatch.delattr(functional, "linear_suppression_loss", raising=False)
    model = _gpt2().double().train()
    task = LanguageModelTask(eval_batch_size=3)
    batch = task.prepare(model, _batch(n=5), "test")
    value = task.evaluate(model, batch)
    assert model.training
    model.eval()
    assert value == pytest.approx(_direct(model, *batch, "ce").item(), rel=1e-10)
    assert not LanguageModelTask.higher_is_better


def test_prepare_validates():
    model, task = _gpt2(), LanguageModelTask()
    ids, labels = _batch()
    with pytest.raises(ValueError, match="input_ids must lie"):
        task.prepare(model, (ids + V, labels), "restricted")
    with pytest.raises(ValueError, match="label .* is outside"):
        task.prepare(model, (ids, labels.masked_fill(labels == -100, -5)), "restricted")
    with pytest.raises(ValueError, match="shape"):
        task.prepare(model, (ids, labels[:, 1:]), "restricted")
    with pytest.raises(ValueError, match="T >= 2"):
        task.prepare(model, ids[:, :1], "restricted")
    with pytest.raises(ValueError, match="ignore_index"):
        task.prepare(model, (ids, torch.full_like(labels, -100)), "restricted")
    with pytest.raises(ValueError, match="unknown suppression loss"):
        task.suppression_loss(model, task.prepare(model, ids, "x"), "dos", torch.Generator())
    out = task.prepare(model, (ids, labels, torch.ones_like(ids)), "original")
    assert len(out) == 3 and out[0].dtype == torch.int64


def test_attention_mask_matches_model():
    model = _llama().double()
    ids, labels = _batch()
    mask = (labels != -100).long()
    task = LanguageModelTask()
    batch = task.prepare(model, (ids, labels, mask), "x")
    z = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(lm.adapter_for(model).logits(model, ids, mask), z)


# ---- tied heads ---------------------------------------------------------------------------------
def test_tied_head_is_refused_by_default():
    model, task = _gpt2(), LanguageModelTask()
    emb = model.get_input_embeddings().weight.detach().clone()
    assert task.head(model) is None
    with pytest.raises(ValueError, match="tied to the input embedding"):
        task.reinit_head(model, torch.Generator().manual_seed(0))
    assert torch.equal(model.get_input_embeddings().weight, emb)


def test_untie_keeps_function_and_reinit_spares_embedding():
    model = _gpt2().double()
    task = LanguageModelTask()
    ids, labels = _batch()
    before = model(input_ids=ids).logits
    emb = model.get_input_embeddings().weight.detach().clone()
    n = lm.num_parameters(model)
    assert lm.untie_head(model) and not lm.untie_head(model)
    assert not lm.adapter_for(model).is_tied(model) and not model.config.tie_word_embeddings
    assert lm.num_parameters(model) == n + V * 16
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    head = task.head(model)
    assert head is model.get_output_embeddings()
    task.reinit_head(model, torch.Generator().manual_seed(0))
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert not torch.equal(head.weight, emb)


# ---- attacks ------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays():
    a = lm_attacks.LMAttack(steps=20, warmup=0.2)
    f = [a.lr_factor(s) for s in range(20)]
    assert f[0] < f[1] < f[3] and max(f) == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(f[4:], f[5:])) and f[-1] < 0.05
    assert a.eval_steps()[0] == 0 and a.eval_steps()[-1] == 20


def test_lora_step_changes_only_adapter_weights():
    model = _gpt2()
    data = _batch(n=6)
    attack = lm_attacks.LMAttack(method="lora", rank=4, lr=1e-2, steps=1, batch_size=3, evals=1)
    _, attacked = lm_attacks.run(model, data, data, attack, return_model=True)
    original = dict(model.named_parameters())
    lora = {n: p for n, p in attacked.get_base_model().named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in lora.items())
    for name, p in attacked.get_base_model().named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad
            assert torch.equal(p, original[name.replace(".base_layer", "")]), name
    for p in model.parameters():
        assert p.requires_grad


def test_attack_suite_schema_and_curves():
    protected, unprotected = _gpt2(), _llama()
    train, test = _batch(n=6, seed=2), _batch(n=3, seed=3)
    attacks = [lm_attacks.LMAttack(method="full", lr=1e-2, steps=4, batch_size=2, evals=2),
               lm_attacks.LMAttack(method="lora", rank=2, lr=1e-2, steps=2, batch_size=2, evals=1)]
    out = json.loads(json.dumps(lm_attacks.evaluate_suite(protected, unprotected, train, test, attacks, seed=3)))
    assert out["metric"] == lm_attacks.METRIC and out["higher_is_better"] is False
    assert [a["name"] for a in out["attacks"]] == ["full-adamw-lr0.01", "lora-r2-adamw-lr0.01"]
    first = out["attacks"][0]
    assert first["steps"] == [0, 2, 4]
    for who in ("protected", "unprotected", "scratch"):
        assert len(first[who]) == 3 and all(math.isfinite(x) for x in first[who])
    task = LanguageModelTask()
    assert first["protected"][0] == pytest.approx(task.evaluate(protected, task.prepare(protected, test, "t")))
    assert first["unprotected"][0] == pytest.approx(task.evaluate(unprotected, task.prepare(unprotected, test, "t")))
    assert first["protected"][-1] < first["protected"][0]
    assert first["scratch"][0] != pytest.approx(first["protected"][0])


def test_full_attack_trains_frozen_parameters_too():
    model, data = _gpt2(), _batch(n=6)
    for p in model.parameters():
        p.requires_grad_(False)
    _, attacked = lm_attacks.run(model, data, data, lm_attacks.LMAttack(lr=1e-2, steps=1, batch_size=3, evals=1),
                                 return_model=True)
    assert all(not torch.equal(a, b) for a, b in zip(attacked.parameters(), model.parameters()))
    assert not any(p.requires_grad for p in model.parameters())


def test_attack_is_deterministic_and_rejects_bad_settings():
    model, data = _gpt2(), _batch(n=6)
    for method in ("full", "lora"):       # LoRA's factors too, whatever the global RNG's state
        attack = lm_attacks.LMAttack(method=method, lr=1e-2, steps=3, batch_size=2, evals=3)
        torch.manual_seed(1)
        first = lm_attacks.run(model, data, data, attack, seed=5)
        state = torch.get_rng_state()
        assert lm_attacks.run(model, data, data, attack, seed=5) == first, method
        assert torch.equal(torch.get_rng_state(), state), method       # the caller's global RNG is untouched
        torch.manual_seed(2)
        assert lm_attacks.run(model, data, data, attack, seed=5) == first, method
        assert lm_attacks.run(model, data, data, attack, seed=6) != first, method
    with pytest.raises(ValueError, match="method"):
        lm_attacks.LMAttack(method="prefix")
    with pytest.raises(ValueError, match="hyper-parameters"):
        lm_attacks.LMAttack(steps=2, evals=3)


def test_simulated_lora_adapts_the_layers_peft_adapts_the_same_way():
    """Task.lora_targets names exactly the layers the LoRA attack adapts (peft, all-linear, head excluded, tied or
    untied), and lora_weight (W + 2 B A, transposed for GPT-2's Conv1D) computes what peft computes."""
    from torch.func import functional_call
    from sophon_fast.tasks.base import lora_weight
    for untie in (False, True):
        model, task, (ids, _) = _gpt2().double(), LanguageModelTask(), _batch()
        if untie:
            lm.untie_head(model)
        targets = task.lora_targets(model)
        plain = model(ids).logits
        peft_model = lm_attacks._lora(model, lm_attacks.LMAttack(method="lora", rank=2))
        adapted = {n.replace("base_model.model.", "").replace(".base_layer", ""): m
                   for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        assert sorted(n[:-len(".weight")] for n, _, _ in targets) == sorted(adapted)
        assert not any("lm_head" in n or "wte" in n for n, _, _ in targets)
        g = torch.Generator().manual_seed(0)
        weights = {}
        for n, w, transposed in targets:
            layer = adapted[n[:-len(".weight")]]
            a = torch.randn(layer.lora_A["default"].weight.shape, generator=g, dtype=torch.float64)
            b = torch.randn(layer.lora_B["default"].weight.shape, generator=g, dtype=torch.float64)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
            weights[n] = lora_weight(w.detach(), a, b, transposed)
        want = peft_model(ids).logits
        assert not torch.allclose(want, plain)                  # the factors change the function
        peft_model.unload()                                     # peft adapted ``model`` in place: back to plain
        got = functional_call(model, weights, (ids,)).logits
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fresh_block_of_a_language_model_keeps_only_the_embeddings():
    """fresh="block" for an LM draws every layer between the embeddings and the head (GPT-2's Conv1D as
    transformers initialises it): the meta-gradient of such a trajectory reaches only the embeddings."""
    import sophon_fast as sf
    from sophon_fast.engine.config import Strategy
    from sophon_fast.tasks.base import fresh_parameters
    model, task = _gpt2(attn_implementation="eager").double(), LanguageModelTask(second_order=True)
    block = task.block(model)
    assert len(block) == 7 and model.transformer.wte not in block and model.lm_head not in block
    g = torch.Generator().manual_seed(0)
    (w, vw), (b, vb) = fresh_parameters(model.transformer.h[0].mlp.c_fc, g)
    assert vw.shape == w.shape and abs(float(vw.std()) - 0.02) < 0.003 and not vb.any()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = sf.protect(model, _batch(n=8, seed=4), _batch(n=18, seed=5), task=task, mode="reference",
                     meta_gradient="unrolled", loss="ice", iterations=1, inner_steps=2, ntr_steps=0, progress=False,
                     strategies=[Strategy("adam", lr=1e-2, batch_size=6, query_size=2, attacker="fresh_block")])
    for n, p in res.model.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith(("transformer.wte", "transformer.wpe")), n


def test_protect_with_a_simulated_lora_attacker():
    import sophon_fast as sf
    from sophon_fast.engine.config import Strategy
    model = _gpt2().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = sf.ProtectConfig(task="lm", loss="ice", mode="reference", iterations=2, inner_steps=3, progress=False,
                           strategies=[Strategy("adam", lr=1e-2, batch_size=6, query_size=2, attacker={"kind": "lora", "rank": 2})], ntr_steps=0)
    res = sf.protect(model, _batch(n=16, seed=4), _batch(n=16, seed=5), cfg, task=LanguageModelTask())
    assert len(res.history) == 2 and all(math.isfinite(r["fts_loss"]) for r in res.history)
    after = dict(res.model.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in ("transformer.h.0.attn.c_attn.weight",
                                                              "transformer.wte.weight"))
    assert sorted(after) == sorted(before)          # no factor is left in the model


# ---- protect on a tiny GPT-2 ------------------------------------------------------------------
def _protect(model, mode="fast", loss="ice", attacker="as_is", iterations=2, **kw):
    import sophon_fast as sf
    from sophon_fast.engine.config import Strategy

    cfg = sf.ProtectConfig(task="lm", loss=loss, mode=mode, iterations=iterations, inner_steps=3, **kw,
                           strategies=[Strategy("sgd", lr=1e-2, batch_size=6, query_size=2, attacker=attacker)],
                           ntr_batch_size=4, evaluation={"every": 1, "size": None, "max_drop": None}, progress=False)
    return sf.protect(model, _batch(n=16, seed=4), _batch(n=16, seed=5), cfg, task=LanguageModelTask(),
                      original_test=_batch(n=4, seed=6))


@pytest.mark.parametrize("loss", ["ice", "klu", "neg_entropy"])
def test_protect_fast_matches_reference_fp64(loss):
    fast, ref = (_protect(_gpt2().double(), mode, loss) for mode in ("fast", "reference"))
    assert len(fast.history) == len(ref.history) == 2
    for a, b in zip(fast.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(fast.model.parameters(), _gpt2().double().parameters()))


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_activation_checkpointing_on_gives_what_it_gives_off(mode, build):
    """Hugging Face activation checkpointing left on by the user: the same result as with it off, and it stays on.
    The reference mode back-propagates after ``functional_call`` has returned, where a checkpointed layer's
    recompute would read the model's own weights instead of the simulated attacker's (1e-3 off before the fix);
    it switches the flags off while a simulated attacker runs. The fast mode runs checkpointed throughout."""
    from torch.utils.checkpoint import checkpoint

    calls = []

    def counted(fn, *args, **kw):
        calls.append(1)
        return checkpoint(fn, *args, use_reentrant=False, **kw)

    plain = _protect(build().double(), mode)
    m = build().double()
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    layers = [x for x in m.modules() if getattr(x, "gradient_checkpointing", False) is True]
    assert layers
    for x in layers:
        x._gradient_checkpointing_func = counted
    res = _protect(m, mode)
    assert calls                                               # checkpointing did run (NTR at least)
    assert all(x.gradient_checkpointing is True for x in layers)
    for a, b in zip(res.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unrolled_meta_gradient_is_refused_for_language_models():
    with pytest.raises(ValueError, match="no second derivative.*second_order=True"):
        _protect(_gpt2(), "reference", meta_gradient="unrolled", iterations=1)


def test_unrolled_meta_gradient_for_a_language_model_is_the_exact_derivative():
    """LanguageModelTask(second_order=True), eager attention: theta0 - theta1 (outer SGD, lr 1) equals the
    derivative of sum_k ICE(theta'_k(theta)) / K written out here: the attacker's SGD steps on next-token CE
    (create_graph; torch's cross_entropy with ignore_index on the shifted logits: transformers' own loss casts them to
    fp32) and the reference ICE over the shifted, unpadded logits."""
    import sophon_fast as sf
    from torch.func import functional_call
    from sophon_fast.engine.config import Strategy
    from sophon_fast.reference.losses import inverse_cross_entropy
    model = _gpt2(attn_implementation="eager").double()
    train = _batch(n=18, seed=5)
    K, lr = 3, 0.5
    task = LanguageModelTask(second_order=True)
    res = sf.protect(model, _batch(n=8, seed=4), train, task=task, mode="reference", meta_gradient="unrolled",
                     loss="ice", iterations=1, inner_steps=K, fts_optimizer="sgd", alpha=1e4, clip_norm=None,
                     ntr_steps=0, progress=False, strategies=[Strategy("sgd", lr=lr, batch_size=6, query_size=2,
                                                                    attacker="as_is")])
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in model.named_parameters()]
    theta0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    def logits(theta, ids):
        return functional_call(model, dict(zip(names, theta)), (ids,)).logits[:, :-1].reshape(-1, V)

    theta, total = theta0, 0.0
    for k in range(K):
        idx = perm[6 * k:6 * (k + 1)]
        ids, labels = train[0][idx], train[1][idx]
        ce = nn.functional.cross_entropy(logits(theta, ids[:4]), labels[:4, 1:].reshape(-1), ignore_index=-100)
        g = torch.autograd.grad(ce, theta, create_graph=True)
        theta = [t - lr * gi for t, gi in zip(theta, g)]
        z, y = logits(theta, ids[4:]), labels[4:, 1:].reshape(-1)
        total = total + inverse_cross_entropy(z[y != -100], y[y != -100]) / K
    want = torch.autograd.grad(total, theta0)
    for n, t0, p, w in zip(names, theta0, res.model.parameters(), want):
        assert rel(t0.detach() - p.detach(), w) <= 1e-9, n


def test_protect_tied_head_reinit_is_refused_and_untie_allows_it():
    with pytest.raises(ValueError, match="head"):
        _protect(_gpt2(), attacker="reinit_head", iterations=1)
    model = _gpt2()
    lm.untie_head(model)
    out = _protect(model, attacker="reinit_head", iterations=1).model
    assert not lm.adapter_for(out).is_tied(out)


# ---- the demo's pieces at toy sizes -------------------------------------------------------------
@pytest.mark.skipif("english" not in text.available(), reason="Debian package fortunes not installed")
def test_lm_demo_prepare_caches_and_attack_all_reports(tmp_path, monkeypatch):
    from sophon_fast.apps import lm_demo

    toy = lm_demo.DemoSizes(vocab_size=300, tokenizer_chars=20_000, block_size=16, n_layer=1, n_embd=16, n_head=2, pretrain_steps=4,
                            train_blocks=8, test_blocks=2, attack_steps=2, attack_batch=2, attack_evals=1)
    monkeypatch.setattr(lm_demo, "sizes", lambda quick: toy)
    said = []
    first = lm_demo.prepare(True, seed=0, cache_dir=str(tmp_path), say=said.append)
    again = lm_demo.prepare(True, seed=0, cache_dir=str(tmp_path), say=said.append)
    assert "reusing" in said[-1] and len(first.pretrain_curve) == 5
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert first.restricted_train[0].shape == (8, 16) and first.original_test[0].shape == (2, 16)
    out = json.loads(json.dumps(lm_demo.attack_all(again.model, again, quick=True, say=None)))
    assert out["domains"] == {"original": "english", "restricted": "python"}
    assert out["original"]["protected"] == pytest.approx(out["original"]["unprotected"])
    assert len(out["attacks"]) == 5 and all(len(a["scratch"]) == 2 for a in out["attacks"])
    assert out["attacks"][0]["protected"] == out["attacks"][0]["unprotected"]
    from sophon_fast.recipes import language_model
    assert language_model(True).task == "lm"
