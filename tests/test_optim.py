"""Tests for kdjax.optim: optimizers (torch semantics), weight-decay mask, schedules, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.optim import (
    DEFAULT_LEARNING_RATES,
    OPTIMIZERS,
    SCHEDULES,
    default_learning_rate,
    learning_rate_at,
    make_optimizer,
    make_schedule,
    resolve_learning_rate,
    weight_decay_mask,
)

# ----------------------------------------------------------------------------- helpers

_rng = np.random.default_rng(0)
_X = _rng.normal(size=(64, 8)).astype(np.float32)
_W_TRUE = _rng.normal(size=(8, 2)).astype(np.float32)
_Y = _X @ _W_TRUE + np.array([0.5, -1.0], np.float32)


def _init_params():
    return {'dense': {'kernel': jnp.zeros((8, 2)), 'bias': jnp.zeros((2,))}}


def _loss(params):
    pred = _X @ params['dense']['kernel'] + params['dense']['bias']
    return jnp.mean((pred - _Y) ** 2)


def _train(opt, steps=20):
    params = _init_params()
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(_loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(steps):
        params, state = step(params, state)
    return float(_loss(_init_params())), float(_loss(params)), params


# ----------------------------------------------------------------------------- optimizers

# Per-optimizer settings for a 20-step linear regression.  Adadelta is used with the
# torch learning rate 1.0; its default eps=1e-6 makes the first updates ~1e-3 in size
# (it "warms itself up"), so a short test run uses eps=1e-2.
_SETTINGS = {
    'sgd': (0.1, {}),
    'adam': (0.1, {}),
    'adamw': (0.1, {}),
    'rmsprop': (0.05, {}),
    'adagrad': (0.5, {}),
    'adadelta': (1.0, {'eps': 1e-2}),
}


def test_settings_cover_all_optimizers():
    assert set(_SETTINGS) == set(OPTIMIZERS)


@pytest.mark.parametrize('name', OPTIMIZERS)
@pytest.mark.parametrize('weight_decay', [0.0, 1e-4])
def test_every_optimizer_lowers_loss(name, weight_decay):
    lr, kw = _SETTINGS[name]
    start, end, params = _train(make_optimizer(name, lr, weight_decay=weight_decay, **kw))
    assert np.isfinite(end)
    assert end < 0.5 * start, (name, start, end)
    assert jax.tree.structure(params) == jax.tree.structure(_init_params())


def test_optimizer_with_schedule_and_clipping():
    sched = make_schedule('cosine', base_lr=0.1, total_steps=20, steps_per_epoch=5, warmup_epochs=1)
    start, end, _ = _train(make_optimizer('sgd', sched, grad_clip_norm=5.0, nesterov=True))
    assert end < 0.5 * start


def _torch_sgd_reference(params, grads_fn, lr, mu, wd, steps, nesterov=True, decay_all=True):
    """Hand-written torch.optim.SGD (dampening=0) on a dict of numpy arrays."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    buf = {k: None for k in p}
    for _ in range(steps):
        grads = grads_fn(p)
        for k in p:
            g = grads[k].astype(np.float64)
            if decay_all or p[k].ndim > 1:
                g = g + wd * p[k]
            buf[k] = g.copy() if buf[k] is None else mu * buf[k] + g
            g = g + mu * buf[k] if nesterov else buf[k]
            p[k] = p[k] - lr * g
    return p


@pytest.mark.parametrize('decay_all', [True, False])
def test_sgd_nesterov_matches_torch_formula(decay_all):
    rng = np.random.default_rng(1)
    params = {'w': rng.normal(size=(3, 4)), 'b': rng.normal(size=(4,))}
    target = rng.normal(size=(3, 4))

    def grads_np(p):  # gradient of 0.5*|w - target|^2 + 0.5*sum(b^3)/3-ish nonlinearity
        return {'w': (p['w'] - target) * np.cos(p['w']), 'b': p['b'] ** 2 - 0.3}

    lr, mu, wd = 0.05, 0.9, 5e-2
    ref = _torch_sgd_reference(params, grads_np, lr, mu, wd, 3, nesterov=True, decay_all=decay_all)

    opt = make_optimizer('sgd', lr, momentum=mu, nesterov=True, weight_decay=wd, decay_all=decay_all)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = opt.init(p)
    for _ in range(3):
        g = {k: jnp.asarray(v, jnp.float32) for k, v in grads_np({k: np.asarray(v, np.float64) for k, v in p.items()}).items()}
        u, state = opt.update(g, state, p)
        p = optax.apply_updates(p, u)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)
    if not decay_all:  # the bias really is not decayed: differs from the decay_all reference
        ref_all = _torch_sgd_reference(params, grads_np, lr, mu, wd, 3, decay_all=True)
        assert not np.allclose(ref_all['b'], ref['b'])


def test_plain_sgd_momentum_zero():
    opt = make_optimizer('sgd', 0.1, momentum=0.0)
    p = {'w': jnp.ones((2, 2))}
    u, _ = opt.update({'w': jnp.full((2, 2), 2.0)}, opt.init(p), p)
    np.testing.assert_allclose(np.asarray(u['w']), -0.2)


def test_adamw_matches_optax_adamw_with_mask():
    p = {'k': jnp.linspace(-1, 1, 6).reshape(2, 3), 'b': jnp.array([0.3, -0.2, 0.1])}
    g = {'k': jnp.full((2, 3), 0.5), 'b': jnp.array([1.0, -1.0, 0.5])}
    ours = make_optimizer('adamw', 1e-2, weight_decay=0.1)
    ref = optax.adamw(1e-2, weight_decay=0.1, mask=weight_decay_mask)
    u1, _ = ours.update(g, ours.init(p), p)
    u2, _ = ref.update(g, ref.init(p), p)
    for k in p:
        np.testing.assert_allclose(np.asarray(u1[k]), np.asarray(u2[k]), rtol=1e-6)


def test_coupled_weight_decay_for_adam_is_before_the_optimizer():
    # Coupled L2 goes through Adam's normalisation: with zero gradient the first Adam step
    # on a decayed kernel is ~ -lr * sign(p) (not -lr*wd*p as decoupled decay would give).
    p = {'k': jnp.full((2, 2), 2.0), 'b': jnp.full((2,), 2.0)}
    g = jax.tree.map(jnp.zeros_like, p)
    opt = make_optimizer('adam', 0.01, weight_decay=1e-3)
    u, _ = opt.update(g, opt.init(p), p)
    np.testing.assert_allclose(np.asarray(u['k']), -0.01, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(u['b']), 0.0)
    dec = make_optimizer('adamw', 0.01, weight_decay=1e-3)  # decoupled: -lr * wd * p
    u, _ = dec.update(g, dec.init(p), p)
    np.testing.assert_allclose(np.asarray(u['k']), -0.01 * 1e-3 * 2.0, rtol=1e-5)


def test_grad_clip_is_first():
    p = {'w': jnp.zeros((2, 2))}
    g = {'w': jnp.full((2, 2), 100.0)}  # global norm 200
    opt = make_optimizer('sgd', 1.0, momentum=0.0, grad_clip_norm=1.0)
    u, _ = opt.update(g, opt.init(p), p)
    np.testing.assert_allclose(float(optax.tree.norm(u)), 1.0, rtol=1e-5)


def test_global_norm_is_optax_tree_norm_in_one_reduction():
    """The step's norms (grad, update, param) over all leaves at once: optax.tree.norm's value
    (float32 for any leaf dtype, 0 for no leaves)."""
    from kdjax.step import global_norm

    rng = np.random.default_rng(1)
    tree = {'a': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            'b': [jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16), jnp.float32(-2.0)]}
    want = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))
    got = jax.jit(global_norm)(tree)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    np.testing.assert_allclose(float(got), float(optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))),
                               rtol=1e-6)
    assert float(global_norm({})) == 0.0
    assert not np.isfinite(float(global_norm({'x': jnp.array([1.0, jnp.inf])})))


# ----------------------------------------------------------------------------- mask


def test_weight_decay_mask_excludes_1d_leaves():
    params = {
        'conv': {'kernel': jnp.ones((3, 3, 4, 8)), 'bias': jnp.ones((8,))},
        'bn': {'scale': jnp.ones((8,)), 'bias': jnp.ones((8,))},
        'dense': {'kernel': jnp.ones((8, 10)), 'bias': jnp.ones((10,))},
        'temperature': jnp.ones(()),
    }
    mask = weight_decay_mask(params)
    assert mask == {
        'conv': {'kernel': True, 'bias': False},
        'bn': {'scale': False, 'bias': False},
        'dense': {'kernel': True, 'bias': False},
        'temperature': False,
    }
    # And the optimizer uses it: with zero grads only kernels move under coupled decay + SGD.
    opt = make_optimizer('sgd', 0.1, momentum=0.0, weight_decay=0.5)
    u, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    assert float(jnp.abs(u['conv']['kernel']).max()) > 0
    assert float(jnp.abs(u['dense']['kernel']).max()) > 0
    for leaf in (u['conv']['bias'], u['bn']['scale'], u['bn']['bias'], u['dense']['bias'], u['temperature']):
        assert float(jnp.abs(leaf).max()) == 0.0
    opt_all = make_optimizer('sgd', 0.1, momentum=0.0, weight_decay=0.5, decay_all=True)
    u, _ = opt_all.update(jax.tree.map(jnp.zeros_like, params), opt_all.init(params), params)
    np.testing.assert_allclose(np.asarray(u['bn']['scale']), -0.05)


# ----------------------------------------------------------------------------- schedules


def test_multistep_boundaries_repdistiller():
    s = make_schedule('multistep', base_lr=0.05, total_steps=2400, steps_per_epoch=10,
                      decay_epochs=(150, 180, 210), decay_factor=0.1)
    expect = {0: 0.05, 1499: 0.05, 1500: 0.005, 1799: 0.005, 1800: 5e-4, 2099: 5e-4,
              2100: 5e-5, 2399: 5e-5}
    for step, v in expect.items():
        assert learning_rate_at(s, step) == pytest.approx(v, rel=1e-5), step


def test_multistep_with_warmup_keeps_absolute_boundaries():
    s = make_schedule('multistep', base_lr=0.1, total_steps=300, steps_per_epoch=10,
                      warmup_epochs=2, decay_epochs=(10, 20))
    assert learning_rate_at(s, 0) == 0.0
    assert learning_rate_at(s, 10) == pytest.approx(0.05)
    assert learning_rate_at(s, 20) == pytest.approx(0.1)
    assert learning_rate_at(s, 99) == pytest.approx(0.1)
    assert learning_rate_at(s, 100) == pytest.approx(0.01)
    assert learning_rate_at(s, 200) == pytest.approx(0.001)


def test_warmup_ramps_linearly():
    s = make_schedule('constant', base_lr=0.4, total_steps=100, steps_per_epoch=10, warmup_epochs=1)
    vals = [learning_rate_at(s, i) for i in range(12)]
    np.testing.assert_allclose(vals[:11], 0.04 * np.arange(11), rtol=1e-5, atol=1e-8)
    assert vals[11] == pytest.approx(0.4)


def test_cosine_ends_at_end_lr_factor():
    s = make_schedule('cosine', base_lr=0.2, total_steps=100, steps_per_epoch=10,
                      warmup_epochs=1, end_lr_factor=0.01)
    assert learning_rate_at(s, 10) == pytest.approx(0.2)
    assert learning_rate_at(s, 55) == pytest.approx(0.2 * (0.01 + 0.99 * 0.5), rel=1e-4)
    assert learning_rate_at(s, 100) == pytest.approx(0.002, rel=1e-4)
    assert learning_rate_at(s, 150) == pytest.approx(0.002, rel=1e-4)
    vals = [learning_rate_at(s, i) for i in range(10, 101)]
    assert all(a >= b - 1e-9 for a, b in zip(vals, vals[1:]))


def test_linear_and_step_and_constant():
    lin = make_schedule('linear', base_lr=1.0, total_steps=100, steps_per_epoch=10, end_lr_factor=0.1)
    assert learning_rate_at(lin, 0) == pytest.approx(1.0)
    assert learning_rate_at(lin, 50) == pytest.approx(0.55)
    assert learning_rate_at(lin, 100) == pytest.approx(0.1)
    st = make_schedule('step', base_lr=1.0, total_steps=1000, steps_per_epoch=10, step_epochs=30, decay_factor=0.5)
    assert [learning_rate_at(st, i) for i in (0, 299, 300, 599, 600)] == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    st_w = make_schedule('step', base_lr=1.0, total_steps=1000, steps_per_epoch=10, step_epochs=30,
                         decay_factor=0.5, warmup_epochs=5)
    assert [learning_rate_at(st_w, i) for i in (25, 50, 299, 300)] == pytest.approx([0.5, 1, 1, 0.5])
    c = make_schedule('constant', base_lr=0.3, total_steps=10, steps_per_epoch=1)
    assert learning_rate_at(c, 7) == pytest.approx(0.3)
    assert learning_rate_at(0.25, 1000) == 0.25


def test_schedule_works_under_jit():
    for name in SCHEDULES:
        s = make_schedule(name, base_lr=0.1, total_steps=100, steps_per_epoch=10, warmup_epochs=1,
                          decay_epochs=(5,), step_epochs=3)
        v = jax.jit(s)(jnp.asarray(50))
        assert np.isfinite(float(v)) and 0 <= float(v) <= 0.1 + 1e-6, name


# ----------------------------------------------------------------------------- errors


def test_unknown_optimizer_message():
    with pytest.raises(ValueError) as e:
        make_optimizer('adamax', 0.1)
    assert str(e.value) == ("unknown optimizer 'adamax'; choose one of: "
                            "adadelta, adagrad, adam, adamw, dot, rmsprop, sgd")


def test_unknown_schedule_message():
    with pytest.raises(ValueError) as e:
        make_schedule('exp', base_lr=0.1, total_steps=10, steps_per_epoch=1)
    assert str(e.value) == ("unknown schedule 'exp'; choose one of: "
                            "constant, cosine, linear, multistep, step")


def test_names_are_case_insensitive():
    make_optimizer('SGD', 0.1)
    make_schedule('Cosine', base_lr=0.1, total_steps=10, steps_per_epoch=1)


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='sgd', learning_rate=-0.1), 'learning_rate'),
    (dict(name='sgd', learning_rate=0.1, weight_decay=-1.0), 'weight_decay'),
    (dict(name='sgd', learning_rate=0.1, momentum=0.0, nesterov=True), 'nesterov'),
    (dict(name='sgd', learning_rate=0.1, grad_clip_norm=0.0), 'grad_clip_norm'),
    (dict(name='adagrad', learning_rate=0.1, nesterov=True), 'nesterov'),
    (dict(name='rmsprop', learning_rate=0.1, nesterov=True), 'nesterov'),
    (dict(name='adam', learning_rate=0.1, b2=1.0), 'b2'),
    (dict(name='rmsprop', learning_rate=0.1, rmsprop_decay=1.0), 'rmsprop_decay'),
    (dict(name='adadelta', learning_rate=0.1, adadelta_rho=-0.1), 'adadelta_rho'),
    (dict(name='adam', learning_rate=0.1, eps=-1.0), 'eps'),
])
def test_bad_optimizer_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(**kwargs)


@pytest.mark.parametrize('kwargs, match', [
    (dict(base_lr=-0.1), 'base_lr'),
    (dict(decay_epochs=()), 'non-empty'),
    (dict(decay_epochs=(180, 150)), 'increasing'),
    (dict(decay_epochs=(150, 150)), 'increasing'),
    (dict(decay_epochs=(-5, 150)), 'positive'),
    (dict(decay_epochs=(1, 150), warmup_epochs=5), 'warmup'),
    (dict(steps_per_epoch=0), 'steps_per_epoch'),
    (dict(decay_factor=0.0), 'decay_factor'),
])
def test_bad_schedule_args(kwargs, match):
    base = dict(base_lr=0.1, total_steps=2400, steps_per_epoch=10, decay_epochs=(150, 180))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_schedule('multistep', **base)


def test_cosine_needs_steps_after_warmup():
    with pytest.raises(ValueError, match='total_steps'):
        make_schedule('cosine', base_lr=0.1, total_steps=10, steps_per_epoch=10, warmup_epochs=1)


# ----------------------------------------------------------------------------- default learning rates


def test_default_learning_rates_are_the_references():
    assert set(DEFAULT_LEARNING_RATES) == set(OPTIMIZERS) | {'dot'}
    # torch.optim defaults (Adadelta's 1.0 is also Zeiler's); sgd: RepDistiller's CIFAR 0.05; DOT: sgd's.
    assert DEFAULT_LEARNING_RATES == {
        'sgd': 0.05, 'adam': 1e-3, 'adamw': 1e-3, 'rmsprop': 1e-2, 'adagrad': 1e-2, 'adadelta': 1.0, 'dot': 0.05}
    assert default_learning_rate('AdaDelta') == 1.0
    with pytest.raises(ValueError, match="unknown optimizer 'adamax'"):
        default_learning_rate('adamax')


def test_resolve_learning_rate():
    assert resolve_learning_rate('adadelta') == 1.0
    assert resolve_learning_rate('adadelta', None, 0.5) == 0.5  # default x the stage's scale
    assert resolve_learning_rate('adadelta', 0.2) == 0.2  # an explicit rate wins over the default
    assert resolve_learning_rate('sgd', 0.1, 0.2) == pytest.approx(0.02)
    with pytest.raises(ValueError, match='learning_rate_scale'):
        resolve_learning_rate('sgd', None, -1.0)
    # A config's rate tuned for one optimizer applies to that optimizer only.
    tuned = {'adam': 3e-3}
    assert resolve_learning_rate('adam', None, 1.0, tuned) == 3e-3
    assert resolve_learning_rate('adam', None, 10 / 3, tuned) == pytest.approx(1e-2)
    assert resolve_learning_rate('adadelta', None, 1.0, tuned) == 1.0
    assert resolve_learning_rate('adam', 0.02, 1.0, tuned) == 0.02  # an explicit rate wins
    with pytest.raises(ValueError, match="tuned learning rate for unknown optimizer 'adamax'"):
        resolve_learning_rate('adam', None, 1.0, {'adamax': 1e-3})


@pytest.fixture(scope='module')
def digits_teacher(tmp_path_factory):
    """A 5-epoch digits teacher (the default cnn_small; test accuracy ~0.99), trained once."""
    from experiments.configs import digits
    from kdjax import train

    workdir = str(tmp_path_factory.mktemp('teacher'))
    config = digits.get_config()
    config.stages, config.teacher.epochs = 'teacher', 5
    train.run(config, workdir)
    return workdir


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_digits_default_distils_with_every_optimizer(name, digits_teacher, tmp_path):
    """`python -m experiments.digits --config.optimizer.name=<name>` gives each optimizer its own
    default rate (the config's Adam-tuned 3e-3 stays with Adam), times the student's scale: the KD
    student reaches >= 0.95 with all six. (With Adam's rate kept, adadelta's student was 0.203.)
    Shrunk: a 5-epoch teacher, 20 student epochs instead of 60."""
    from experiments.configs import digits
    from kdjax import train

    config = digits.get_config()
    config.optimizer.name = name  # the only change to the default, besides the run's length
    config.stages, config.student.epochs, config.teacher.checkpoint = 'student', 20, digits_teacher
    summary = train.run(config, str(tmp_path / 'run'))
    assert summary['student']['test_accuracy'] >= 0.95, (name, summary['student'])


# ----------------------------------------------------------------------------- DOT

from kdjax import optim  # noqa: E402

_D = np.random.default_rng(7)
_A, _C = _D.normal(size=(3, 4)), np.abs(_D.normal(size=(4,))) + 0.5
_BM, _E = _D.normal(size=(3, 4)), _D.normal(size=(2, 3))
_DOT_P0 = {'w': _D.normal(size=(3, 4)), 'h': _D.normal(size=(4,)), 'u': _D.normal(size=(2, 3))}


# A toy problem with all three kinds of parameter: 'w' is reached by both losses (the student),
# 'h' by the task loss only (layers after a hint), 'u' by the distillation loss only (an adapter).
def _task_loss(p, xp=jnp):
    return xp.sum(xp.cos(p['w']) * _A) + 0.5 * xp.sum(p['h'] ** 2 * _C)


def _kd_loss(p, xp=jnp):
    return 0.5 * xp.sum((p['w'] - _BM) ** 2) + xp.sum(xp.sin(p['u']) * _E)


def _np_task_grads(p):  # torch: only the parameters in the task loss's graph have a .grad
    return {'w': -np.sin(p['w']) * _A, 'h': p['h'] * _C}


def _np_kd_grads(p):
    return {'w': p['w'] - _BM, 'u': np.cos(p['u']) * _E}


def _np_dot_reference(p, steps, lr_fn, momentum, delta, wd):
    """mdistiller DistillationOrientedTrainer (engine/dot.py), restated in numpy, float64: one
    step = step_kd() after loss_kd.backward(), then step() after loss_ce.backward(); both
    gradients at the same parameters; buffers None until a parameter first has a gradient."""
    m_task, m_kd = momentum - delta, momentum + delta  # engine/trainer.py DOT.init_optimizer
    p = {k: np.array(v, np.float64) for k, v in p.items()}
    task_buf, kd_buf = {}, {}
    for step in range(steps):
        g_task, g_kd, lr = _np_task_grads(p), _np_kd_grads(p), lr_fn(step)
        for k, g in g_task.items():  # dot(): task-loss pass
            d_p = g + wd * p[k]
            if k not in task_buf:
                task_buf[k] = d_p.copy()
            elif k in g_kd:
                task_buf[k] = m_task * task_buf[k] + d_p
            else:
                task_buf[k] = (m_kd + m_task) / 2.0 * task_buf[k] + d_p
            p[k] = p[k] - lr * task_buf[k]
        for k, d_p in g_kd.items():  # dot(): kd-loss pass
            if k not in kd_buf:
                kd_buf[k] = d_p.copy()
            elif k in g_task:
                kd_buf[k] = m_kd * kd_buf[k] + d_p
            else:
                d_p = d_p + wd * p[k]
                kd_buf[k] = (m_kd + m_task) / 2.0 * kd_buf[k] + d_p
            p[k] = p[k] - lr * kd_buf[k]
    return p


def _run_dot(tx, steps):
    p = {k: jnp.asarray(v, jnp.float32) for k, v in _DOT_P0.items()}

    @jax.jit
    def step(p, s):
        g_task, g_kd = jax.grad(_task_loss)(p), jax.grad(_kd_loss)(p)
        u, s = tx.update(g_task, s, p, kd_grads=g_kd)
        return optax.apply_updates(p, u), s

    s = tx.init(p)
    for _ in range(steps):
        p, s = step(p, s)
    return p


@pytest.mark.parametrize('wd', [0.0, 0.05])
def test_dot_matches_the_reference_update(wd):
    lr_fn = lambda step: 0.1 / (1.0 + step)  # noqa: E731  (the rate of update number `step`)
    ref = _np_dot_reference(_DOT_P0, 5, lr_fn, 0.9, 0.075, wd)
    got = _run_dot(optim.dot(lambda c: 0.1 / (1.0 + c), 0.9, 0.075, weight_decay=wd,
                             decay_all=True), 5)
    for k in ref:
        np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=2e-5, atol=1e-6)
    # The sign of delta matters: the swapped momenta (larger one on the task loss) differ.
    swapped = _np_dot_reference(_DOT_P0, 5, lr_fn, 0.9, -0.075, wd)
    assert not np.allclose(swapped['w'], ref['w'], rtol=1e-4)


def test_dot_momenta_by_hand():
    # Constant gradients 1 (task) and 10 (distillation), lr 1: the buffers after two steps are
    # 1 + (0.9 - 0.075) = 1.825 and 10 * (1 + 0.9 + 0.075) = 19.75.
    tx = optim.dot(1.0, momentum=0.9, delta=0.075)
    p = {'b': jnp.zeros((2,))}
    s = tx.init(p)
    g_t, g_k = {'b': jnp.ones((2,))}, {'b': jnp.full((2,), 10.0)}
    u1, s = tx.update(g_t, s, p, kd_grads=g_k)
    u2, s = tx.update(g_t, s, p, kd_grads=g_k)
    np.testing.assert_allclose(np.asarray(u1['b']), -11.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u2['b']), -(1.825 + 19.75), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s[0].task['b']), 1.825, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s[0].kd['b']), 19.75, rtol=1e-6)


@pytest.mark.parametrize('decay_all', [False, True])
def test_dot_with_delta_zero_is_sgd_momentum_on_the_summed_gradient(decay_all):
    rng = np.random.default_rng(8)
    p0 = {'k': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
    task = lambda p: jnp.sum(jnp.cos(p['k'])) + jnp.sum(p['b'] ** 3) / 3  # noqa: E731
    kd = lambda p: 0.5 * jnp.sum((p['k'] @ p['b'] - 1.0) ** 2)  # noqa: E731
    dot_tx = optim.dot(0.05, momentum=0.9, delta=0.0, weight_decay=0.1, decay_all=decay_all)
    sgd_tx = make_optimizer('sgd', 0.05, momentum=0.9, weight_decay=0.1, decay_all=decay_all)
    pd, ps = p0, p0
    sd, ss = dot_tx.init(p0), sgd_tx.init(p0)
    for _ in range(4):
        ud, sd = dot_tx.update(jax.grad(task)(pd), sd, pd, kd_grads=jax.grad(kd)(pd))
        us, ss = sgd_tx.update(jax.grad(lambda p: task(p) + kd(p))(ps), ss, ps)
        pd, ps = optax.apply_updates(pd, ud), optax.apply_updates(ps, us)
    for k in p0:
        np.testing.assert_allclose(np.asarray(pd[k]), np.asarray(ps[k]), rtol=1e-5, atol=1e-6)


def test_dot_inside_partition_freezes_and_masks_kd_grads():
    params = {'student': {'a': jnp.ones((2, 2)), 'b': jnp.ones((2,))}}
    g_t = {'student': {'a': jnp.full((2, 2), 0.5), 'b': jnp.ones((2,))}}
    g_k = {'student': {'a': jnp.full((2, 2), 2.0), 'b': jnp.ones((2,))}}
    tx = optim.partition({'body': optim.dot(0.1), 'frozen': optax.set_to_zero()},
                         [('frozen', '^b$')], default='body')
    s = tx.init(params)
    for _ in range(2):
        u, s = tx.update(g_t, s, params, kd_grads=g_k)
    alone = optim.dot(0.1)
    sa = alone.init({'a': params['student']['a']})
    for _ in range(2):
        ua, sa = alone.update({'a': g_t['student']['a']}, sa, kd_grads={'a': g_k['student']['a']})
    np.testing.assert_allclose(np.asarray(u['student']['a']), np.asarray(ua['a']), rtol=1e-6)
    assert float(jnp.abs(u['student']['b']).max()) == 0.0


def test_dot_errors():
    tx = optim.dot(0.1)
    p = {'w': jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r'needs the distillation-loss gradient too'):
        tx.update(p, tx.init(p), p)
    with pytest.raises(ValueError, match=r'momentum \+ delta < 1'):
        optim.dot(0.1, momentum=0.95, delta=0.075)
    with pytest.raises(ValueError, match='delta must be'):
        optim.dot(0.1, delta=-0.1)
    with pytest.raises(ValueError, match='weight_decay > 0 needs params'):
        wd = optim.dot(0.1, weight_decay=1e-4)
        wd.update(p, wd.init(p), kd_grads=p)
    with pytest.raises(ValueError, match="optimizer 'dot' has no Nesterov variant"):
        make_optimizer('dot', 0.1, nesterov=True)


def test_dot_in_the_trainer(tmp_path):
    """optimizer.name=dot through the real step: with dot_delta=0 it is SGD-momentum on the summed
    loss (same final student, up to float rounding of g_task + g_kd), with the reference's 0.075
    it differs, and it works inside the prune stage's mask wrapper."""
    from kdjax import train
    from tests.test_train import final_params, tiny_digits_config

    def student(name, **extra):
        workdir = str(tmp_path / f"{name}-{len(extra)}-{extra.get('optimizer.dot_delta', '')}")
        train.run(tiny_digits_config(**{"teacher.model": "mlp", "optimizer.name": name, "optimizer.learning_rate": 0.05,
                                        "optimizer.weight_decay": 5e-4, **extra}), workdir)
        return final_params(workdir, "student")[1]["student"]

    sgd = student("sgd")
    teacher = {"stages": "student", "teacher.checkpoint": str(tmp_path / "sgd-0-")}  # the same teacher, trained once
    dot0 = student("dot", **{"optimizer.dot_delta": 0.0}, **teacher)
    dot = student("dot", **{"optimizer.dot_delta": 0.075}, **teacher)
    for layer in ("fc1", "head"):
        np.testing.assert_allclose(dot0[layer]["kernel"], sgd[layer]["kernel"], atol=2e-5)
        assert not np.allclose(dot[layer]["kernel"], sgd[layer]["kernel"], atol=1e-4)
    pruned = student("dot", **{"stages": "teacher,student,prune", "prune.epochs": 1, "prune.sparsity": 0.5})
    assert np.isfinite(pruned["fc1"]["kernel"]).all()
