"""One training run: model, optimizer, jit-compiled steps, evaluation, JSON.

A chunk of ``steps_per_call`` training steps is one jit-compiled call (a
``jax.lax.scan`` over the chunk's batches), so Python dispatch does not
dominate at batch size 1 or 2; with ``steps_per_call=1`` each step is its own
call. The last chunk of a segment is padded and its padded steps masked out,
so a run compiles its step once. Images stay ``uint8`` on the host and are
scaled to ``[0, 1]`` inside the compiled function; the time spent gathering
batches on the host (data) and in the compiled calls (step) is measured
separately.
"""

import datetime
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnp_optax
from bnp_optax.experiments import _bn4
from bnp_optax.experiments import _config
from bnp_optax.experiments import _cost
from bnp_optax.experiments import _data
from bnp_optax.experiments import _deps
from bnp_optax.experiments import _methods
from bnp_optax.experiments import _models
from bnp_optax.experiments import _modern
from bnp_optax.experiments import _normfree
from bnp_optax.experiments import _qscale
from bnp_optax.experiments import _results

RunConfig = _config.RunConfig


class Interrupted(Exception):
  """Training stopped at a step boundary on a signal (SIGINT or SIGTERM)."""

  def __init__(self, signum: int):
    super().__init__(f'interrupted by signal {signum}')
    self.signum = signum


def prepare_data(config: RunConfig, ds: _data.Dataset) -> _data.Dataset:
  """Holds out the validation split, applies the subsets, checks the batch.

  Args:
    config: the run.
    ds: the full dataset, as :func:`_data.load` returns it.

  Returns:
    The data the run trains and evaluates on: with ``validation_split``,
    the held-out examples in ``x_val, y_val`` and never in ``x_train``
    (``train_subset`` draws from the rest).
  """
  if config.validation_split:
    ds = _data.hold_out(ds, config.validation_split)
  ds = _data.subset(ds, config.train_subset, config.test_subset)
  check_data(config, ds)
  return ds


def check_data(config: RunConfig, ds: _data.Dataset) -> None:
  """Raises ValueError when ``ds`` (prepared) does not fit the run."""
  if bool(config.validation_split) != (ds.x_val is not None):
    raise ValueError(
        f'--validation-split {config.validation_split} but the data '
        + ('holds a validation split' if ds.x_val is not None else
           'holds none') + ': prepare it with prepare_data')
  if config.batch_size > len(ds.x_train):
    raise ValueError(
        f'batch size {config.batch_size} is larger than the training set '
        f'({len(ds.x_train)} examples of {ds.name})')
  steps_per_epoch = len(ds.x_train) // config.batch_size
  if config.evals_per_epoch > steps_per_epoch:
    raise ValueError(
        f'--evals-per-epoch {config.evals_per_epoch} is more than the '
        f'{steps_per_epoch} steps per epoch ({len(ds.x_train)} examples, '
        f'batch size {config.batch_size})')


def _schedule(config: RunConfig, lr: float, steps_per_epoch: int):
  boundaries = [int(e * steps_per_epoch) for e in config.lr_decay_epochs]
  if not boundaries and not config.warmup_steps:
    return lr

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    decays = sum(jnp.where(count >= b, 1.0, 0.0) for b in boundaries)
    value = lr * jnp.power(0.1, decays) if boundaries else jnp.asarray(lr)
    if config.warmup_steps:
      frac = jnp.clip(count / config.warmup_steps, 0.0, 1.0)
      warm = config.warmup_init + (lr - config.warmup_init) * frac
      value = jnp.where(count < config.warmup_steps, warm, value)
    return value

  return schedule


def make_optimizer(config: RunConfig, lr: float,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """The method's optimizer: [weight decay], [BNP], then SGD/momentum/Adam.

  The base optimizer is ``config.resolved_optimizer()`` (the method's when
  the run gives none). For bn4, Summers and Dinneen's weight decay on the
  normalisation's ``gamma`` and ``beta`` comes first: ``wd * p`` added to
  the gradient of the bn4 layers' ``scale`` and ``bias`` only
  (``add_decayed_weights`` masked by ``_bn4.norm_param_mask``), coupled L2,
  so Adam rescales it with the rest of the gradient.
  """
  schedule = _schedule(config, lr, steps_per_epoch)
  method = _methods.METHODS[config.method]
  # AdamW and Muon take the weight decay decoupled; the others as L2.
  decoupled = config.resolved_optimizer() in _methods.DECOUPLED_WEIGHT_DECAY
  base = _methods.OPTIMIZERS[config.resolved_optimizer()](schedule, config)
  parts = []
  if method.clip == 'agc':
    parts.append(_modern.agc())
  norm_wd = config.resolved_bn4().get('norm_weight_decay')
  if norm_wd:
    parts.append(optax.add_decayed_weights(norm_wd,
                                           mask=_bn4.norm_param_mask))
  if config.weight_decay and not decoupled:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  if method.bnp and method.bnp_variant == 'centring':
    parts.append(_modern.scale_by_bnp_centring(rho=config.rho))
  elif method.bnp:
    parts.append(bnp_optax.scale_by_bnp(eps1=config.eps1, eps2=config.eps2,
                                        rho=config.rho,
                                        debias=config.bnp_debias))
    if config.bnp_q != 'paper':
      parts.append(_qscale.undo_q_scaling(config.bnp_q))
  return optax.chain(*parts, base)


def make_model(config: RunConfig, num_classes: int):
  method = _methods.METHODS[config.method]
  if method.arch:
    return _normfree.make_model(config.model, method.arch, num_classes,
                                resnet_blocks=config.resnet_blocks)
  return _models.make_model(
      config.model, method.norm, num_classes, init_scale=config.init_scale,
      conv_bias=method.conv_bias,
      resnet_blocks=config.resnet_blocks, bn4=config.bn4_settings())


def _to_float(x):
  return x.astype(jnp.float32) / 255.0


def _augment(key, x):
  """Random crop from a 4-pixel zero padding and random horizontal flip."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  k1, k2, k3 = jax.random.split(key, 3)
  dy = jax.random.randint(k1, (n,), 0, 9)
  dx = jax.random.randint(k2, (n,), 0, 9)
  flip = jax.random.bernoulli(k3, 0.5, (n,))

  def one(img, oy, ox, f):
    crop = jax.lax.dynamic_slice(img, (oy, ox, 0), (h, w, img.shape[-1]))
    return jnp.where(f, crop[:, ::-1, :], crop)

  return jax.vmap(one)(padded, dy, dx, flip)


class Trainer:
  """The compiled training chunk and evaluation of one run."""

  def __init__(self, config: RunConfig, num_classes: int, input_shape,
               steps_per_epoch: int):
    self.config = config
    self.method = _methods.METHODS[config.method]
    self.model = make_model(config, num_classes)
    self.lr, self.lr_source = config.resolved_learning_rate()
    self.tx = make_optimizer(config, self.lr, steps_per_epoch)
    key = jax.random.key(config.seed)
    init_key, data_key = jax.random.split(key)
    x0 = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
    variables = dict(self.model.init(init_key, x0, train=False))
    params = variables.pop('params')
    # Raw key data, so that the carry can be masked with jnp.where.
    self.state = (params, variables, self.tx.init(params),
                  jax.random.key_data(data_key))
    self.num_params = sum(int(np.prod(p.shape))
                          for p in jax.tree.leaves(params))

  def _loss(self, params, model_state, x, y):
    variables = {'params': params, **model_state}
    mutable = list(model_state)
    if self.method.bnp:
      out, layer_stats = bnp_optax.linen.apply(
          self.model, variables, x, train=True, mutable=mutable)
    else:
      out = self.model.apply(variables, x, train=True, mutable=mutable)
      layer_stats = None
    logits, new_state = out
    return _models.cross_entropy(logits, y), (dict(new_state), layer_stats)

  def step(self, state, x, y):
    """One training step on a uint8 batch; returns the new state and loss."""
    params, model_state, opt_state, key_data = state
    key, aug_key = jax.random.split(jax.random.wrap_key_data(key_data))
    x = _to_float(x)
    if self.config.augment:
      x = _augment(aug_key, x)
    (loss, (model_state, layer_stats)), grads = jax.value_and_grad(
        self._loss, has_aux=True)(params, model_state, x, y)
    # optax.chain hands layer_stats to BNP only; None without BNP.
    updates, opt_state = self.tx.update(grads, opt_state, params,
                                        layer_stats=layer_stats)
    params = optax.apply_updates(params, updates)
    return (params, model_state, opt_state, jax.random.key_data(key)), loss

  def chunk(self, state, xs, ys, valid):
    """``len(xs)`` steps in one scan; steps with ``valid=False`` are no-ops."""

    def body(state, inputs):
      x, y, ok = inputs
      new_state, loss = self.step(state, x, y)
      new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state,
                               state)
      return new_state, jnp.where(ok, loss, 0.0)

    if len(xs) == 1:
      # No loop: XLA's CPU backend runs convolutions inside a while loop
      # (a scan) an order of magnitude slower than outside one (measured:
      # 3.4 s against 0.2 s per step of flax_mnist_cnn at batch size 128).
      state, loss = body(state, (xs[0], ys[0], valid[0]))
      return state, loss[None]
    return jax.lax.scan(body, state, (xs, ys, valid))

  def evaluate(self, state, x, y, weight):
    params, model_state, _, _ = state
    logits = self.model.apply({'params': params, **model_state},
                              _to_float(x), train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.sum(correct * weight), jnp.sum(losses * weight)


def auto_steps_per_call(batch_size: int, steps_per_epoch: int, *,
                        model: str = 'fc',
                        platform: str | None = None) -> int:
  """Steps per compiled call when ``--steps-per-call`` is not given.

  About 1024 examples per call, at most an epoch, so that Python dispatch
  does not dominate small steps; but one step per call for a model with
  convolutions on CPU, where a scan makes the convolutions slow (see
  ``_models.Model.convolutional``).

  Args:
    batch_size: examples per step.
    steps_per_epoch: steps in one epoch.
    model: the model's name.
    platform: the JAX backend (default: ``jax.default_backend()``).

  Returns:
    The number of steps per compiled call.
  """
  platform = platform or jax.default_backend()
  if _models.MODELS[model].convolutional and platform == 'cpu':
    return 1
  return max(1, min(steps_per_epoch, math.ceil(1024 / batch_size)))


class _Conditioning:
  """Figure 8: condition numbers of the output neuron's Hessian per step."""

  def __init__(self, trainer: 'Trainer'):
    # pylint: disable=g-import-not-at-top
    from bnp_optax import diagnostics
    self.diagnostics = diagnostics
    self.trainer = trainer
    self.layer = f'Dense_{len(trainer.model.hidden)}'
    self.rows = []

  def before(self, state, x, y):
    params, model_state, _, _ = state
    return self.diagnostics.neuron_hessian(
        self.trainer.model, {'params': params, **model_state}, _to_float(x),
        jax.tree_util.Partial(_models.cross_entropy, labels=jnp.asarray(y)),
        layer=self.layer, neuron=0)

  def after(self, step, loss, nh, state):
    d = self.diagnostics
    config = self.trainer.config
    running = optax.tree_utils.tree_get(
        state[2], 'ScaleByBNPState').running_stats[self.layer]
    # The P applied to this step's gradient: the running statistics after
    # this step's update (Algorithm 2, steps 2-3).
    c = d.conditioning(nh.hessian, running, eps1=config.eps1,
                       eps2=config.eps2)
    # The theory's P with this batch's own statistics (Theorem 3).
    batch = d.conditioning(nh.hessian, d.patch_statistics(nh.inputs),
                           eps1=config.eps1, eps2=config.eps2)
    # Without the regularisers (eps1 = eps2 = 0), as in Eq. 12.
    plain = d.conditioning(nh.hessian, running, eps1=0.0, eps2=0.0)
    self.rows.append(dict(
        step=step, loss=_results.finite_or_none(loss),
        kappa_hessian=c.kappa_hessian,
        kappa_preconditioned=c.kappa_preconditioned, kappa_d=c.kappa_d,
        kappa_preconditioned_batch=batch.kappa_preconditioned, rank=c.rank,
        kappa_preconditioned_eps0=plain.kappa_preconditioned,
        kappa_d_eps0=plain.kappa_d, size=int(nh.hessian.shape[0])))


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  # One generator per epoch, so that a resumed run draws the same orders.
  return np.random.default_rng([seed, 2, epoch]).permutation(n)


def _progress_bar(config, total, initial):
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _deps.MissingDependency('tqdm', 'the progress bar') from e
  return tqdm(total=total, initial=initial, unit='step', leave=False,
              dynamic_ncols=True, mininterval=0.5,
              desc=f'{config.method} s{config.seed}')


class _Checkpoints:
  """Orbax checkpoints of one run, one per evaluation (the last one kept)."""

  def __init__(self, directory):
    try:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise _deps.MissingDependency('orbax-checkpoint', 'checkpointing') from e
    self.ocp = ocp
    # Orbax wants absolute paths.
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=False,
            create=True))

  def latest(self):
    return self.manager.latest_step()

  def save(self, step, state, meta):
    ocp = self.ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore(self, step, like):
    ocp = self.ocp
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def close(self):
    self.manager.close()


def _segments(config: RunConfig, steps_per_epoch: int,
              total_steps: int) -> list[tuple[int, int]]:
  """The training's ``(first step, end step)`` between evaluations.

  ``evals_per_epoch`` equal parts of every epoch; with a budget,
  ``budget_evals`` equal parts of the budget's ``total_steps``.
  """
  if config.budget is not None:
    cuts = sorted({round(total_steps * k / config.budget_evals)
                   for k in range(config.budget_evals + 1)})
    return list(zip(cuts[:-1], cuts[1:]))
  cuts = [round(steps_per_epoch * k / config.evals_per_epoch)
          for k in range(config.evals_per_epoch + 1)]
  return [(e * steps_per_epoch + a, e * steps_per_epoch + b)
          for e in range(config.epochs) for a, b in zip(cuts[:-1], cuts[1:])]


# Fields that do not change what one training step computes.
_NOT_STEP_COST = ('seed', 'learning_rate', 'budget', 'budget_evals',
                  'train_subset', 'test_subset', 'validation_split', 'epochs',
                  'evals_per_epoch', 'warmup_steps', 'warmup_init',
                  'lr_decay_epochs', 'conditioning_every', 'steps_per_call')


def _cost_key(config: RunConfig) -> str:
  """The fields that decide a step's cost (the cost is measured once)."""
  identity = _config.canonical(config)
  for k in _NOT_STEP_COST:
    identity.pop(k, None)
  return json.dumps(identity, sort_keys=True)


def _measure_cost(config: RunConfig, ds: _data.Dataset, chunk_fn, state,
                  spc: int, steps_per_epoch: int,
                  compile_s: float) -> dict[str, Any]:
  """The step-cost ratio against plain SGD (see ``_cost.py``)."""
  key = _cost_key(config)
  found = _cost.cached(key)
  if found is not None:
    return found
  lr, _ = config.resolved_learning_rate()
  reference = RunConfig(
      model=config.model, dataset=config.dataset, method='vanilla',
      optimizer='sgd', batch_size=config.batch_size, learning_rate=lr,
      seed=config.seed, augment=config.augment,
      resnet_blocks=config.resnet_blocks, init_scale=config.init_scale)
  ref = Trainer(reference, ds.num_classes, ds.x_train.shape[1:],
                steps_per_epoch)
  bs = config.batch_size
  xs = ds.x_train[:spc * bs].reshape((spc, bs) + ds.x_train.shape[1:])
  ys = ds.y_train[:spc * bs].reshape((spc, bs))
  valid = np.ones(spc, bool)
  start = time.perf_counter()
  ref_fn = jax.jit(ref.chunk).lower(ref.state, xs, ys, valid).compile()
  sgd_compile_s = time.perf_counter() - start
  cost = _cost.paired_ratio(chunk_fn, (state, xs, ys, valid), ref_fn,
                            (ref.state, xs, ys, valid), steps_per_call=spc)
  if key == _cost_key(reference):
    # The run is the reference itself: its ratio is 1 by definition (the
    # measured one, timing noise around 1, is kept beside it).
    cost.update(ratio_measured=cost['ratio'], ratio=1.0)
  cost.update(
      method_compile_s=compile_s, sgd_compile_s=sgd_compile_s,
      memory=_cost.memory(chunk_fn), sgd_memory=_cost.memory(ref_fn),
      reference='vanilla network, plain SGD, same model, batch and '
      'augmentation', backend=jax.default_backend(),
      measured=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      cached=False)
  _cost.remember(key, cost)
  return cost


def train(config: RunConfig, ds: _data.Dataset, *, progress: bool = True,
          log=print, stop=None, checkpoint_dir=None, resume: bool = False,
          keep_state: bool = False) -> dict[str, Any]:
  """Trains one configuration on ``ds`` and returns its result dict.

  Args:
    config: the run, already validated.
    ds: the dataset, already subset by :func:`prepare_data`.
    progress: show a tqdm progress bar with the running loss (the caller
      decides; the CLI shows one only on a terminal).
    log: called with one line per evaluation.
    stop: called between steps; a non-zero return (a signal number) stops
      the run there with :class:`Interrupted`, nothing half-done kept.
    checkpoint_dir: save an orbax checkpoint there at each evaluation.
    resume: continue from the last checkpoint in ``checkpoint_dir``.
    keep_state: also return the final ``(params, model state, optimizer
      state, key data)`` under ``'state'`` (not JSON).

  Returns:
    The result, in the JSON schema ``_results.SCHEMA``.
  """
  start = time.perf_counter()
  bs = config.batch_size
  n_train = len(ds.x_train)
  steps_per_epoch = n_train // bs
  spc = config.steps_per_call or auto_steps_per_call(
      bs, steps_per_epoch, model=config.model)
  spc = min(spc, steps_per_epoch)
  if config.conditioning_every:
    spc = 1  # The diagnostics look at every step's batch.
  trainer = Trainer(config, ds.num_classes, ds.x_train.shape[1:],
                    steps_per_epoch)
  state = trainer.state
  conditioning = _Conditioning(trainer) if config.conditioning_every else None

  xs_shape = (spc, bs) + ds.x_train.shape[1:]
  compile_start = time.perf_counter()
  chunk_fn = jax.jit(trainer.chunk).lower(
      state, jax.ShapeDtypeStruct(xs_shape, jnp.uint8),
      jax.ShapeDtypeStruct((spc, bs), jnp.int32),
      jax.ShapeDtypeStruct((spc,), jnp.bool_)).compile()
  check_data(config, ds)
  eval_fn = jax.jit(trainer.evaluate)
  compile_s = time.perf_counter() - compile_start

  def run_eval(state, xs=ds.x_test, ys=ds.y_test):
    eval_bs = min(len(xs), max(bs, 500))
    correct, total_loss = 0.0, 0.0
    for i in range(0, len(xs), eval_bs):
      x = xs[i:i + eval_bs]
      y = ys[i:i + eval_bs]
      w = np.ones(len(x), np.float32)
      pad = eval_bs - len(x)
      if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
        w = np.concatenate([w, np.zeros(pad, np.float32)])
      c, loss_sum = eval_fn(state, x, y, w)
      correct += float(c)
      total_loss += float(loss_sum)
    n = len(xs)
    return correct / n, total_loss / n

  def validation(state):
    """The held-out split's metrics (never the test set's), or none."""
    if ds.x_val is None:
      return {}
    acc, loss = run_eval(state, ds.x_val, ds.y_val)
    return dict(validation_accuracy=acc,
                validation_loss=_results.finite_or_none(loss))

  checkpoints = _Checkpoints(checkpoint_dir) if checkpoint_dir else None
  timing = dict(data_s=0.0, step_s=0.0, train_s=0.0, eval_s=0.0)
  step = 0
  resumed_from = None
  if checkpoints is not None and resume and checkpoints.latest() is not None:
    state, meta = checkpoints.restore(checkpoints.latest(), state)
    history = meta['history']
    step = meta['step']
    timing = meta['timing']
    if conditioning is not None:
      conditioning.rows = meta['conditioning']
    resumed_from = step
    if log is not None:
      log(f'resumed {config.run_name()} from its checkpoint at step {step} '
          f'(epoch {history[-1]["epoch"]:.2f})')
  else:
    eval_start = time.perf_counter()
    acc0, loss0 = run_eval(state)
    val0 = validation(state)
    timing['eval_s'] = time.perf_counter() - eval_start
    history = [dict(epoch=0.0, step=0, train_loss=None,
                    test_accuracy=acc0,
                    test_loss=_results.finite_or_none(loss0),
                    time_s=0.0, **val0)]
  total_steps = steps_per_epoch * config.epochs
  cost = None
  if config.budget is not None:
    cost = _measure_cost(config, ds, chunk_fn, state, spc, steps_per_epoch,
                         compile_s)
    total_steps = _cost.budget_steps(config.budget, cost['ratio'])
  bar = _progress_bar(config, total_steps, step) if progress else None
  orders = {}

  def order_of(epoch):
    if epoch not in orders:
      orders.clear()
      orders[epoch] = _epoch_order(config.seed, epoch, n_train)
    return orders[epoch]

  try:
    for seg_start, seg_end in _segments(config, steps_per_epoch,
                                        total_steps):
      if seg_end <= step:
        continue  # Done before the checkpoint this run resumed from.
      seg_losses = []
      c0 = seg_start
      while c0 < seg_end:
        if stop is not None and stop():
          raise Interrupted(stop())
        t0 = time.perf_counter()
        epoch, pos = divmod(c0, steps_per_epoch)
        # A chunk never crosses an evaluation or an epoch boundary.
        count = min(spc, seg_end - c0, steps_per_epoch - pos)
        idx = order_of(epoch)[pos * bs:(pos + count) * bs]
        c0 += count
        xs = ds.x_train[idx].reshape((count, bs) + ds.x_train.shape[1:])
        ys = ds.y_train[idx].reshape((count, bs))
        valid = np.ones(spc, bool)
        if count < spc:
          valid[count:] = False
          xs = np.concatenate(
              [xs, np.zeros((spc - count,) + xs.shape[1:], xs.dtype)])
          ys = np.concatenate(
              [ys, np.zeros((spc - count, bs), ys.dtype)])
        measure = conditioning is not None and (
            step % config.conditioning_every == 0)
        nh = conditioning.before(state, xs[0], ys[0]) if measure else None
        t1 = time.perf_counter()
        state, losses = chunk_fn(state, xs, ys, valid)
        losses = np.asarray(losses)[:count]
        t2 = time.perf_counter()
        if measure:
          conditioning.after(step, losses[0], nh, state)
        timing['data_s'] += t1 - t0
        timing['step_s'] += t2 - t1
        timing['train_s'] += t2 - t0
        seg_losses.append(losses)
        step += count
        if bar is not None:
          bar.update(count)
          bar.set_postfix(loss=f'{float(np.mean(losses)):.4f}',
                          refresh=False)
      seg_loss = float(np.mean(np.concatenate(seg_losses)))
      t3 = time.perf_counter()
      acc, test_loss = run_eval(state)
      val = validation(state)
      timing['eval_s'] += time.perf_counter() - t3
      history.append(dict(
          epoch=seg_end / steps_per_epoch, step=step,
          train_loss=_results.finite_or_none(seg_loss), test_accuracy=acc,
          test_loss=_results.finite_or_none(test_loss),
          time_s=timing['train_s'], **val))
      line = (f'{config.model} {config.dataset} bs{bs} {config.method} '
              f'seed {config.seed}: epoch {history[-1]["epoch"]:.2f} '
              f'train loss {seg_loss:.4f} '
              + (f'validation acc {val["validation_accuracy"]:.2%} '
                 if val else '')
              + f'test acc {acc:.2%} ({timing["train_s"]:.1f}s)')
      if checkpoints is not None and step < total_steps:
        meta = dict(step=step, history=history, timing=timing)
        if conditioning is not None:
          meta['conditioning'] = conditioning.rows
        checkpoints.save(step, state, meta)
        line += ', checkpoint saved'
      if bar is not None:
        bar.write(line)
      elif log is not None:
        log(line)
  finally:
    if bar is not None:
      bar.close()
    if checkpoints is not None:
      checkpoints.close()
  # A non-finite training or validation loss anywhere: the run diverged
  # (its parameters may be NaN while its accuracy still reads ~10%).
  diverged = any(p['train_loss'] is None for p in history[1:]) or any(
      'validation_loss' in p and p['validation_loss'] is None
      for p in history)
  cfg = _config.canonical(config)
  cfg.update(
      learning_rate_source=trainer.lr_source,
      method_label=trainer.method.label, norm=trainer.method.norm,
      bnp=trainer.method.bnp, num_train=n_train, num_test=len(ds.x_test),
      num_classes=ds.num_classes, input_shape=list(ds.x_train.shape[1:]),
      data_source=ds.source, steps_per_epoch=steps_per_epoch,
      **({} if ds.x_val is None else dict(num_validation=len(ds.x_val))),
      resolved_steps_per_call=spc, num_params=trainer.num_params)
  result = {
      'schema': _results.SCHEMA,
      'name': config.run_name(),
      'group': config.group_hash(),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'config': cfg,
      'versions': _results.versions(),
      'history': history,
      'final': dict(train_loss=history[-1]['train_loss'],
                    test_accuracy=history[-1]['test_accuracy'],
                    diverged=diverged,
                    **{k: history[-1][k] for k in (
                        'validation_accuracy', 'validation_loss')
                       if k in history[-1]}),
      'timing': dict(
          total_s=time.perf_counter() - start, compile_s=compile_s,
          train_s=timing['train_s'], data_s=timing['data_s'],
          step_s=timing['step_s'], eval_s=timing['eval_s'], steps=step,
          data_us_per_step=1e6 * timing['data_s'] / max(step, 1),
          step_us_per_step=1e6 * timing['step_s'] / max(step, 1),
          resumed_from_step=resumed_from),
  }
  if conditioning is not None:
    result['conditioning'] = conditioning.rows
  if cost is not None:
    result['cost'] = dict(cost, budget_steps=total_steps)
  if keep_state:
    result['state'] = state
  return result
