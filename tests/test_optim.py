import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit import optim
from jaxfit import params as params_lib

# Parameter names as the CLIP / GPT-style models will spell them.
CLIP_LIKE = {
    "logit_scale": np.zeros(()),
    "text_model": {
        "embeddings": {
            "token_embedding": {"embedding": np.zeros((10, 4))},
            "position_embedding": {"embedding": np.zeros((6, 4))},
        },
        "layers": {  # scanned: leading [num_layers] axis
            "layer_norm1": {"scale": np.zeros((2, 4)), "bias": np.zeros((2, 4))},
            "self_attn": {"q_proj": {"kernel": np.zeros((2, 4, 4)), "bias": np.zeros((2, 4))}},
        },
        "final_layer_norm": {"scale": np.zeros(4), "bias": np.zeros(4)},
    },
    "vision_model": {
        "embeddings": {
            "class_embedding": np.zeros(4),
            "patch_embedding": {"kernel": np.zeros((2, 2, 3, 4))},
        },
        "pre_layrnorm": {"scale": np.zeros(4), "bias": np.zeros(4)},
    },
    "text_projection": {"kernel": np.zeros((4, 3))},
}


def _cfg(**kw):
    cfg = optim.default_optim_config()
    cfg.update(kw)
    return cfg


def test_schedule_warmup_peak_cosine_end():
    cfg = _cfg(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    s = optim.make_schedule(cfg, total_steps=110)
    np.testing.assert_allclose(s(0), 0.0)
    np.testing.assert_allclose(s(5), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(s(10), 1e-3, rtol=1e-6)
    # Cosine half-way between peak and end: (1 + 0.1) / 2 * lr.
    np.testing.assert_allclose(s(60), 0.55e-3, rtol=1e-5)
    np.testing.assert_allclose(s(110), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(s(500), 1e-4, rtol=1e-5)


def test_schedule_and_name_errors():
    with pytest.raises(ValueError, match="warmup_steps=10, total_steps=10"):
        optim.make_schedule(_cfg(warmup_steps=10), total_steps=10)
    with pytest.raises(ValueError, match="'sgd'"):
        optim.make_optimizer(_cfg(name="sgd"), 100, CLIP_LIKE)


def test_default_decay_mask():
    mask = params_lib.flatten(optim.decay_mask(CLIP_LIKE, optim.default_optim_config().no_decay))
    decayed = sorted(k for k, v in mask.items() if v)
    assert decayed == [
        "text_model/embeddings/token_embedding/embedding",
        "text_model/layers/self_attn/q_proj/kernel",
        "text_projection/kernel",
        "vision_model/embeddings/patch_embedding/kernel",
    ]


def _torch_adamw_reference(params, grads_seq, cfg, schedule, decay):
    """torch.optim.AdamW with optax-style global-norm clipping, in float64."""
    torch = pytest.importorskip("torch")
    names = list(params)
    tp = {n: torch.tensor(np.asarray(params[n], np.float64), requires_grad=True) for n in names}
    groups = [
        {"params": [tp[n] for n in names if decay[n]], "weight_decay": cfg.weight_decay},
        {"params": [tp[n] for n in names if not decay[n]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    for step, grads in enumerate(grads_seq):
        g = {n: np.asarray(grads[n], np.float64) for n in names}
        norm = np.sqrt(sum((x**2).sum() for x in g.values()))
        if norm >= cfg.grad_clip_norm:
            g = {n: x / norm * cfg.grad_clip_norm for n, x in g.items()}
        for n in names:
            tp[n].grad = torch.tensor(g[n], dtype=torch.float64)
        for group in opt.param_groups:
            group["lr"] = float(schedule(step))
        opt.step()
    return {n: tp[n].detach().numpy() for n in names}


def test_updates_match_torch_adamw():
    rng = np.random.default_rng(0)
    params = {
        "dense/kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "dense/bias": rng.normal(size=(3,)).astype(np.float32),
        "ln/scale": rng.normal(size=(3,)).astype(np.float32),
        "logit_scale": np.float32(2.6),
    }
    cfg = _cfg(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.3, grad_clip_norm=1.0)
    tx, schedule = optim.make_optimizer(cfg, total_steps=6, params=params)
    # Step 2's gradient is large, so clipping is exercised; others are below the threshold.
    grads_seq = [
        jax.tree.map(
            lambda x, s=s: (0.05 if s != 2 else 5.0) * rng.normal(size=np.shape(x)), params
        )
        for s in range(5)
    ]
    grads_seq = [jax.tree.map(lambda g: np.asarray(g, np.float32), g) for g in grads_seq]

    @jax.jit
    def run(p):
        state = tx.init(p)
        for g in grads_seq:
            updates, state = tx.update(g, state, p)
            p = jax.tree.map(lambda a, u: a + u, p, updates)
        return p

    got = run(params)
    decay = params_lib.flatten(optim.decay_mask(params, cfg.no_decay))
    assert decay == {
        "dense/kernel": True,
        "dense/bias": False,
        "ln/scale": False,
        "logit_scale": False,
    }
    ref = _torch_adamw_reference(params, grads_seq, cfg, schedule, decay)
    for name in params:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-7, err_msg=name)
        assert not np.allclose(got[name], params[name])


def test_no_clipping_when_disabled():
    params = {"w": jnp.ones(3)}
    big = {"w": jnp.full(3, 1e3)}
    clipped, _ = optim.make_optimizer(_cfg(warmup_steps=0, grad_clip_norm=1.0), 10, params)
    unclipped, _ = optim.make_optimizer(_cfg(warmup_steps=0, grad_clip_norm=0), 10, params)
    # Adam is scale invariant except for eps; compare the first moments instead.
    _, s1 = clipped.update(big, clipped.init(params), params)
    _, s2 = unclipped.update(big, unclipped.init(params), params)
    mu1 = [x for x in jax.tree.leaves(s1) if x.shape == (3,)][0]
    mu2 = [x for x in jax.tree.leaves(s2) if x.shape == (3,)][0]
    np.testing.assert_allclose(mu1, 0.1 * np.full(3, 1 / np.sqrt(3)), rtol=1e-5)
    np.testing.assert_allclose(mu2, 0.1 * np.full(3, 1e3), rtol=1e-5)
