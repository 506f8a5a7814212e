"""One training run: the compiled step, the batches, evaluation, the loop.

:class:`Trainer` holds the run's model, optimizer and compiled functions,
:class:`Batches` cuts the epochs into evaluation segments and chunks,
:class:`Evaluator` measures the test set and the held-out split, and
:func:`train` is the loop over them that returns the result
(``_results``), saving checkpoints (``_checkpoints``) and taking Figure 8's
condition numbers (``_conditioning``) on the way.

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
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnp_optax
from bnp_optax.experiments import _bn4
from bnp_optax.experiments import _checkpoints
from bnp_optax.experiments import _conditioning
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

  def __init__(self, signum: int, step: int | None = None):
    super().__init__(f'interrupted by signal {signum}')
    self.signum = signum
    self.step = step  # The steps the interrupted run had done, if known.


# Without a progress bar (not a terminal, or --no-progress), a line with the
# step count at most this often, so that a long stretch between evaluations
# (batch size 1: tens of seconds) shows that training goes on.
PROGRESS_EVERY_S = 10.0


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


def make_optimizer(config: RunConfig, lr: float, steps_per_epoch: int, *,
                   layer_specs=None) -> optax.GradientTransformation:
  """The method's optimizer: [weight decay], [BNP], then SGD/momentum/Adam.

  The base optimizer is ``config.resolved_optimizer()`` (the method's when
  the run gives none). For bn4, Summers and Dinneen's weight decay on the
  normalisation's ``gamma`` and ``beta`` comes first: ``wd * p`` added to
  the gradient of the bn4 layers' ``scale`` and ``bias`` only
  (``add_decayed_weights`` masked by ``_bn4.norm_param_mask``), coupled L2,
  so Adam rescales it with the rest of the gradient. With ``adamw`` the
  weight decay is AdamW's own (decoupled, after BNP), not added to the
  gradient. ``layer_specs`` go to ``scale_by_bnp`` (needed for
  ``DenseGeneral`` kernels, e.g. the ViT's attention).
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
                                        debias=config.bnp_debias,
                                        graft=method.graft,
                                        layer_specs=layer_specs))
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
    key = jax.random.key(config.seed)
    init_key, data_key = jax.random.split(key)
    x0 = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
    variables = dict(self.model.init(init_key, x0, train=False))
    layer_specs = None
    if self.method.bnp:
      # Every layer's kernel layout up front (traced, nothing computed):
      # DenseGeneral kernels (the ViT's attention) need it.
      layer_specs = bnp_optax.linen.layer_specs(
          self.model, variables, x0, train=True,
          mutable=[k for k in variables if k != 'params'])
    self.tx = make_optimizer(config, self.lr, steps_per_epoch,
                             layer_specs=layer_specs)
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

  def compile_chunk(self, xs_shape: tuple[int, ...]):
    """:meth:`chunk` compiled for uint8 images of shape ``xs_shape``.

    Args:
      xs_shape: ``(steps per call, batch size, *image shape)``.
    """
    steps, batch = xs_shape[:2]
    return jax.jit(self.chunk).lower(
        self.state, jax.ShapeDtypeStruct(xs_shape, jnp.uint8),
        jax.ShapeDtypeStruct((steps, batch), jnp.int32),
        jax.ShapeDtypeStruct((steps,), jnp.bool_)).compile()

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


class Segment(NamedTuple):
  """The training steps between two evaluations.

  Attributes:
    epoch: the epoch (fractional) at its end, where the evaluation is.
    order: the epoch's order of the training examples.
    chunks: ``(first step in the epoch, steps)`` of each compiled call.
  """

  epoch: float
  order: np.ndarray
  chunks: list[tuple[int, int]]


class Batches:
  """The training batches of a run: epochs, segments, padded chunks.

  Every epoch draws its own order of the training examples (from the
  seed and the epoch, so that a resumed run draws the same). An epoch is cut
  into ``evals_per_epoch`` segments and a segment into chunks of
  ``steps_per_call`` steps, its last chunk padded with masked steps so that
  every compiled call has the same shape.
  """

  def __init__(self, config: RunConfig, ds: _data.Dataset,
               steps_per_call: int):
    self.x, self.y = ds.x_train, ds.y_train
    self.seed = config.seed
    self.epochs = config.epochs
    self.batch_size = config.batch_size
    self.steps_per_epoch = len(ds.x_train) // config.batch_size
    self.steps_per_call = steps_per_call
    self.total_steps = self.steps_per_epoch * config.epochs
    self._cuts = [round(self.steps_per_epoch * k / config.evals_per_epoch)
                  for k in range(config.evals_per_epoch + 1)]
    self._budget_evals = config.budget_evals
    self._budget_cuts = None

  def set_budget_steps(self, total_steps: int) -> None:
    """Trains ``total_steps`` steps (``--budget``) instead of the epochs.

    Evaluations: ``budget_evals`` equally spaced ones, and one at the end of
    every epoch the budget crosses (a segment never spans two epochs).
    """
    self.total_steps = total_steps
    self.epochs = -(-total_steps // self.steps_per_epoch)
    cuts = {round(total_steps * k / self._budget_evals)
            for k in range(self._budget_evals + 1)}
    cuts |= set(range(0, total_steps, self.steps_per_epoch))
    self._budget_cuts = sorted(cuts)

  @property
  def chunk_shape(self) -> tuple[int, ...]:
    """The shape of a chunk's images: ``(steps, batch, *image)``."""
    return (self.steps_per_call, self.batch_size) + self.x.shape[1:]

  def segments(self, done: int = 0):
    """Yields the :class:`Segment` s after the first ``done`` steps.

    Args:
      done: steps already trained (a resumed run's, at a segment's end).
    """
    spe = self.steps_per_epoch
    if self._budget_cuts is not None:
      cuts = self._budget_cuts
      for start, end in zip(cuts[:-1], cuts[1:]):
        if end <= done:
          continue
        epoch = start // spe
        order = _epoch_order(self.seed, epoch, len(self.x))
        first = start - epoch * spe
        chunks = [(c, min(self.steps_per_call, end - start - (c - first)))
                  for c in range(first, first + end - start,
                                 self.steps_per_call)]
        yield Segment(end / spe, order, chunks)
      return
    for epoch in range(done // spe, self.epochs):
      order = _epoch_order(self.seed, epoch, len(self.x))
      for start, end in zip(self._cuts[:-1], self._cuts[1:]):
        if epoch * spe + end <= done:
          continue  # Done before the checkpoint this run resumed from.
        chunks = [(c, min(self.steps_per_call, end - c))
                  for c in range(start, end, self.steps_per_call)]
        yield Segment(epoch + end / spe, order, chunks)

  def chunk(self, order: np.ndarray, first: int, count: int):
    """``(xs, ys, valid)`` of ``count`` steps, padded to a full chunk."""
    bs, spc = self.batch_size, self.steps_per_call
    idx = order[first * bs:(first + count) * bs]
    xs = self.x[idx].reshape((count, bs) + self.x.shape[1:])
    ys = self.y[idx].reshape((count, bs))
    valid = np.ones(spc, bool)
    if count < spc:
      valid[count:] = False
      xs = np.concatenate(
          [xs, np.zeros((spc - count,) + xs.shape[1:], xs.dtype)])
      ys = np.concatenate([ys, np.zeros((spc - count, bs), ys.dtype)])
    return xs, ys, valid


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  # One generator per epoch, so that a resumed run draws the same orders.
  return np.random.default_rng([seed, 2, epoch]).permutation(n)


class Evaluator:
  """Accuracy and loss on the test set and the held-out split.

  The examples go through the compiled evaluation in batches of at least
  500 (or the training batch size), the last one padded and weighted out,
  so that it compiles once per set.
  """

  def __init__(self, trainer: Trainer, ds: _data.Dataset, batch_size: int):
    self._evaluate = jax.jit(trainer.evaluate)
    self.ds = ds
    self.batch_size = batch_size

  def accuracy_and_loss(self, state, xs, ys) -> tuple[float, float]:
    """The mean accuracy and loss of ``state`` on ``xs, ys``."""
    eval_bs = min(len(xs), max(self.batch_size, 500))
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
      c, loss_sum = self._evaluate(state, x, y, w)
      correct += float(c)
      total_loss += float(loss_sum)
    return correct / len(xs), total_loss / len(xs)

  def __call__(self, state) -> dict[str, float | None]:
    """The test metrics, and the held-out split's if the data has one."""
    acc, loss = self.accuracy_and_loss(state, self.ds.x_test, self.ds.y_test)
    metrics = dict(test_accuracy=acc,
                   test_loss=_results.finite_or_none(loss))
    if self.ds.x_val is not None:  # Never the test set's.
      acc, loss = self.accuracy_and_loss(state, self.ds.x_val, self.ds.y_val)
      metrics.update(validation_accuracy=acc,
                     validation_loss=_results.finite_or_none(loss))
    return metrics


class _Report:
  """Progress: a tqdm bar with the running loss, or lines.

  Without a bar, one line per evaluation and, in between, one with the
  step count at most every :data:`PROGRESS_EVERY_S` seconds.
  """

  def __init__(self, config: RunConfig, total: int, initial: int, *,
               progress: bool, log):
    self.log = log
    self.total = total
    self.step = initial
    self.last_line = time.perf_counter()
    self.bar = None
    if progress:
      try:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise _deps.MissingDependency('tqdm', 'the progress bar') from e
      self.bar = tqdm(total=total, initial=initial, unit='step', leave=False,
                      dynamic_ncols=True, mininterval=0.5,
                      desc=f'{config.method} s{config.seed}')

  def steps(self, step: int, losses: list[np.ndarray]) -> None:
    """Training reached ``step``; ``losses`` of the segment's chunks."""
    count, self.step = step - self.step, step
    if self.bar is not None:
      self.bar.update(count)
      self.bar.set_postfix(loss=f'{float(np.mean(losses[-1])):.4f}',
                           refresh=False)
    elif self.log is not None and (
        time.perf_counter() - self.last_line >= PROGRESS_EVERY_S):
      self.last_line = time.perf_counter()
      self.log(f'   step {step}/{self.total} '
               f'({100 * step / self.total:.0f}%), loss '
               f'{float(np.mean(np.concatenate(losses))):.4f} since '
               'the last evaluation')

  def line(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    elif self.log is not None:
      self.log(text)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _evaluation_line(config: RunConfig, point: dict,
                     train_loss: float) -> str:
  val = ('' if 'validation_accuracy' not in point else
         f'validation acc {point["validation_accuracy"]:.2%} ')
  return (f'{config.model} {config.dataset} bs{config.batch_size} '
          f'{config.method} seed {config.seed}: epoch {point["epoch"]:.2f} '
          f'train loss {train_loss:.4f} {val}'
          f'test acc {point["test_accuracy"]:.2%} ({point["time_s"]:.1f}s)')


def _start(state, evaluate, checkpoints, conditioning, config: RunConfig,
           *, resume: bool, log):
  """``(state, step, history, timing, resumed from)`` to start training at.

  The last checkpoint's with ``resume`` (if there is one), else the
  initial state's, evaluated (the history's first point, at step 0).
  """
  if resume and checkpoints is not None and checkpoints.latest() is not None:
    state, meta = checkpoints.restore(checkpoints.latest(), state)
    conditioning.rows = meta.get('conditioning', [])
    if log is not None:
      log(f'resumed {config.run_name()} from its checkpoint at step '
          f'{meta["step"]} (epoch {meta["history"][-1]["epoch"]:.2f})')
    return state, meta['step'], meta['history'], meta['timing'], meta['step']
  eval_start = time.perf_counter()
  history = [_results.history_point(0.0, 0, None, evaluate(state), 0.0)]
  timing = dict(data_s=0.0, step_s=0.0, train_s=0.0,
                eval_s=time.perf_counter() - eval_start)
  return state, 0, history, timing, None


def steps_per_call(config: RunConfig, steps_per_epoch: int) -> int:
  """The run's steps per compiled call: given, or chosen, at most an epoch."""
  if config.conditioning_every:
    return 1  # The diagnostics look at every step's batch.
  spc = config.steps_per_call or auto_steps_per_call(
      config.batch_size, steps_per_epoch, model=config.model)
  return min(spc, steps_per_epoch)


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
  check_data(config, ds)
  steps_per_epoch = len(ds.x_train) // config.batch_size
  batches = Batches(config, ds, steps_per_call(config, steps_per_epoch))
  trainer = Trainer(config, ds.num_classes, ds.x_train.shape[1:],
                    steps_per_epoch)
  conditioning = _conditioning.Conditioning(trainer.model, config)
  compile_start = time.perf_counter()
  chunk_fn = trainer.compile_chunk(batches.chunk_shape)
  evaluate = Evaluator(trainer, ds, config.batch_size)
  compile_s = time.perf_counter() - compile_start
  checkpoints = (_checkpoints.Checkpoints(
      checkpoint_dir, _config.canonical(config)) if checkpoint_dir else None)
  cost = None
  if config.budget is not None:
    cost = _measure_cost(config, ds, chunk_fn, trainer.state,
                         batches.steps_per_call, steps_per_epoch, compile_s)
    batches.set_budget_steps(_cost.budget_steps(config.budget,
                                                cost['ratio']))
  state, step, history, timing, resumed_from = _start(
      trainer.state, evaluate, checkpoints, conditioning, config,
      resume=resume, log=log)
  report = _Report(config, batches.total_steps, step, progress=progress,
                   log=log)
  try:
    for segment in batches.segments(step):
      losses = []
      for first, count in segment.chunks:
        if stop is not None and stop():
          raise Interrupted(stop(), step=step)
        t0 = time.perf_counter()
        xs, ys, valid = batches.chunk(segment.order, first, count)
        hessian = conditioning.before(step, state, xs[0], ys[0])
        t1 = time.perf_counter()
        state, chunk_losses = chunk_fn(state, xs, ys, valid)
        losses.append(np.asarray(chunk_losses)[:count])
        t2 = time.perf_counter()
        conditioning.after(step, losses[-1][0], hessian, state)
        timing['data_s'] += t1 - t0
        timing['step_s'] += t2 - t1
        timing['train_s'] += t2 - t0
        step += count
        report.steps(step, losses)
      train_loss = float(np.mean(np.concatenate(losses)))
      t3 = time.perf_counter()
      metrics = evaluate(state)
      timing['eval_s'] += time.perf_counter() - t3
      history.append(_results.history_point(
          segment.epoch, step, train_loss, metrics, timing['train_s']))
      line = _evaluation_line(config, history[-1], train_loss)
      if checkpoints is not None and step < batches.total_steps:
        checkpoints.save(step, state, dict(
            step=step, history=history, timing=timing,
            conditioning=conditioning.rows))
        line += ', checkpoint saved'
      report.line(line)
  finally:
    report.close()
    if checkpoints is not None:
      checkpoints.close()
  timing.update(total_s=time.perf_counter() - start, compile_s=compile_s,
                steps=step, resumed_from_step=resumed_from)
  result = _results.run_result(
      config, ds, timing, history, conditioning.rows,
      lr_source=trainer.lr_source, num_params=trainer.num_params,
      steps_per_call=batches.steps_per_call)
  if cost is not None:
    result['cost'] = dict(cost, budget_steps=batches.total_steps)
  if keep_state:
    result['state'] = state
  return result
