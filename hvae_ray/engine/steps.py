"""Step strategies of the dense engine: one optimiser step over ``accum`` micro-batches, eager, compiled
(``torch.compile`` of each micro-batch's loss) or replayed from a CUDA graph. The population's step
(:mod:`hvae_ray.engine.population`) is built from the same :func:`batch_loss`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch

from hvae_ray.config import COMPONENTS, Config
from hvae_ray.data.dense import DenseBatch, DenseFeaturizer
from hvae_ray.engine.runtime import Precision
from hvae_ray.model.hypervae import VAEOutput
from hvae_ray.model.losses import dense_reconstruction_terms, kl_divergence, weighted_loss

log = logging.getLogger(__name__)

STAT_KEYS = (*COMPONENTS, "kl", "total")  # the columns of a step's statistics rows


def loss_weights(cfg: Config) -> dict[str, float]:
    return {c: getattr(cfg.loss_weights, c) for c in COMPONENTS}


def batch_loss(out: VAEOutput, batch: DenseBatch, node_stats, particle_loss: str,
               free_bits: float | torch.Tensor, weights: Mapping[str, float | torch.Tensor],
               beta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one micro-batch and its statistics row (len(STAT_KEYS),) float64: each
    reconstruction term, the KL and the loss. ``free_bits``, ``weights`` and ``beta`` may be tensors."""
    terms = dense_reconstruction_terms(out.decoded, batch, node_stats, particle_loss)
    kl = kl_divergence(out.mu, out.logvar, free_bits, weight=batch.weight)
    loss = weighted_loss(terms, kl, beta, weights)
    return loss, torch.stack([*(terms[c] for c in COMPONENTS), kl, loss]).detach().double()


def scheduled_lr(epoch: int, cfg: Config) -> float:
    """The learning rate of ``epoch``: ``learning_rate`` (constant), or a cosine from it down to
    ``lr_min_ratio`` of it at the last epoch (Loshchilov & Hutter, "SGDR", arXiv:1608.03983, one cycle)."""
    if cfg.lr_schedule != "cosine":
        return cfg.learning_rate
    progress = min(1.0, epoch / max(1, cfg.epochs - 1))
    r = cfg.lr_min_ratio
    return cfg.learning_rate * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: in place where it is a tensor (a captured step reads it there)."""
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


EMA_WARMUP = 10.0  # the average's decay after t steps is min(decay, (1 + t) / (EMA_WARMUP + t))


def average_decay(decay: torch.Tensor | float, steps: torch.Tensor) -> torch.Tensor:
    """The moving average's decay after ``steps`` optimiser steps (float64): ``min(decay, (1 + t) / (10 + t))``.
    Early steps weigh more, so the average forgets its random start: without the warm-up an average at
    0.999 still holds 0.999^t of the initial weights (6 % after 2,800 steps), and its validation loss trails
    the trained weights' for hundreds of epochs. The warm-up is TensorFlow's ``ExponentialMovingAverage``
    ``num_updates`` rule; the average is Polyak & Juditsky's (SIAM J. Control Optim. 30, 1992)."""
    t = steps.double()
    warm = (1 + t) / (EMA_WARMUP + t)
    return torch.minimum(warm, decay.double()) if torch.is_tensor(decay) else warm.clamp(max=decay)  # no host copy


def optimizer_steps(opt: torch.optim.Optimizer) -> torch.Tensor:
    """The steps the optimiser has taken (AdamW's ``step`` state: on the device when it is capturable)."""
    return opt.state[opt.param_groups[0]["params"][0]]["step"]


def update_average(average: list[torch.Tensor] | None, params, decay: float, steps: torch.Tensor) -> None:
    """The exponential moving average of the weights after a step: a ← a + (1 − d)(p − a), with d the
    warmed-up :func:`average_decay` after ``steps`` optimiser steps."""
    if average is None:
        return
    weight = (1 - average_decay(decay, steps)).float()
    w = weight if weight.device == average[0].device else float(weight)  # AdamW's CPU count: a host number
    with torch.no_grad():
        for a, p in zip(average, params):
            a.lerp_(p.detach(), w)


@contextlib.contextmanager
def holding(model: torch.nn.Module, weights: list[torch.Tensor] | None):
    """``model`` with ``weights`` copied into its parameters for the duration (its own back after); the
    model as it is when ``weights`` is None."""
    if weights is None:
        yield model
        return
    params = list(model.parameters())
    own = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, o in zip(params, own):
                p.copy_(o)


def step_mode(device: torch.device, world: int, precision: Precision, cuda_graphs: bool | None) -> str:
    """'cuda-graph', or 'eager: <why not>' (said once, in the log and by ``fit``)."""
    why = None
    if device.type != "cuda":
        why = f"no CUDA graphs on {device.type}"
    elif world > 1:
        why = "data-parallel (DDP) steps are not captured"
    elif precision.scaler.is_enabled():
        why = "fp16 loss scaling synchronises with the host"
    elif cuda_graphs is False:
        why = "CUDA graphs turned off"
    return "cuda-graph" if why is None else f"eager: {why}"


class DenseStep:
    """One optimiser step of one model: ``step(pos, valid, eps)`` with positions (accum, B) into the
    training jets, validity (accum, B) and reparameterisation noise (accum, B, Z) returns the (accum,
    len(STAT_KEYS)) statistics rows. Static shapes and no host synchronisation, so on CUDA (``graphed``)
    the whole step is captured once in a CUDA graph and replayed; ``compiled`` compiles each
    micro-batch's loss with ``torch.compile``. ``beta`` is a device scalar the caller sets per epoch."""

    def __init__(self, cfg: Config, model: torch.nn.Module, net: torch.nn.Module, opt: torch.optim.Optimizer,
                 precision: Precision, featurize: DenseFeaturizer, jets: tuple[torch.Tensor, torch.Tensor],
                 node_stats, graphed: bool, compiled: bool, average: list[torch.Tensor] | None = None):
        self.cfg, self.model, self.net, self.opt, self.precision = cfg, model, net, opt, precision
        self.average = average  # the weights' moving average, updated after each step (None: off)
        self.featurize, self.jets, self.node_stats = featurize, jets, node_stats
        self.graphed = graphed
        precision.graphed = graphed
        self.beta = torch.zeros((), device=jets[0].device)
        self.weights = loss_weights(cfg)
        self._micro = torch.compile(self._micro_loss, dynamic=False) if compiled else self._micro_loss
        self._graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, pos: torch.Tensor, valid: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if not self.graphed:
            return self._step(pos, valid, eps)
        if self._graph is None:
            self._capture()
        self._pos.copy_(pos)
        self._valid.copy_(valid)
        self._eps.copy_(eps)
        self._graph.replay()
        return self._rows.clone()

    def reset(self) -> None:
        """Forget the captured graph (the optimiser's state tensors were replaced by a restore)."""
        self._graph = None

    def _step(self, pos: torch.Tensor, valid: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        accum = pos.shape[0]
        scaler = self.precision.scaler
        rows = []
        for k in range(accum):
            loss, row = self._micro(pos[k], valid[k], eps[k])
            scaler.scale(loss / accum).backward()
            rows.append(row)
        if self.cfg.grad_clip > 0:
            scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        scaler.step(self.opt)
        scaler.update()
        self.opt.zero_grad(set_to_none=True)
        update_average(self.average, self.model.parameters(), self.cfg.ema_decay, optimizer_steps(self.opt))
        return torch.stack(rows)

    def _micro_loss(self, pos: torch.Tensor, valid: torch.Tensor, eps: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts, mask = self.jets
        batch = self.featurize(parts[pos], mask[pos], valid.float())
        with self.precision.autocast():
            out = self.net(batch, eps)
            return batch_loss(out, batch, self.node_stats, self.cfg.particle_loss, self.cfg.free_bits,
                              self.weights, self.beta)

    def _capture(self) -> None:
        """Capture :meth:`_step` in a CUDA graph. The warm-up steps that must precede the capture run on
        a side stream and are then undone (weights, optimiser state and RNG state restored), so the run
        is the same as an eager one."""
        cfg, dev = self.cfg, self.jets[0].device
        t0 = time.perf_counter()
        self._pos = torch.zeros(cfg.gradient_accumulation_steps, cfg.batch_size, dtype=torch.long, device=dev)
        self._valid = torch.ones_like(self._pos, dtype=torch.bool)
        self._eps = torch.zeros(*self._pos.shape, cfg.model.latent_dim, device=dev)
        rng_cpu, rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state(dev)
        with undone(list(self.model.parameters()), self.opt, self.average or []):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            self.model.train()
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(self._pos, self._valid, self._eps)
            torch.cuda.current_stream(dev).wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._rows = self._step(self._pos, self._valid, self._eps)
        torch.set_rng_state(rng_cpu)
        torch.cuda.set_rng_state(rng_cuda, dev)
        torch.cuda.empty_cache()  # the warm-up's blocks, cached for the side stream, are not used again
        self._graph = graph
        log.info("training step captured in a CUDA graph in %.2f s", time.perf_counter() - t0)


class undone:
    """A context that puts ``params`` and the optimiser's tensor state back as they were on entry
    (state created inside it is zeroed): a CUDA graph's warm-up steps leave no trace."""

    def __init__(self, params: list[torch.Tensor], opt: torch.optim.Optimizer | None = None,
                 extra: list[torch.Tensor] = ()):
        self.params, self.opt, self.extra = params, opt, list(extra)

    def _state(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out = [(t, t.detach().clone()) for t in (*self.params, *self.extra)]
        if self.opt is not None:
            for p in self.params:
                for v in self.opt.state.get(p, {}).values():
                    if torch.is_tensor(v):
                        out.append((v, v.detach().clone()))
        return out

    def __enter__(self):
        self._saved = self._state()
        return self

    def __exit__(self, *exc) -> None:
        saved = {id(t): copy for t, copy in self._saved}
        with torch.no_grad():
            for t, _ in self._state():
                t.copy_(saved[id(t)]) if id(t) in saved else t.zero_()


BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which a Trainer uses


class PopulationStep:
    """One optimiser step of ``slots`` same-shape models at once (the population's step).

    The members' weights and AdamW moments are stacked along a leading slot axis; their per-member
    scalars (learning rate, weight decay, clipping norm, step count, β, free bits, loss weights) are device
    tensors. ``step(pos, valid, eps)`` with positions and validity (K, accum, B) and noise (K, accum, B, Z)
    featurises all members' batches together, computes every member's loss with ``vmap(loss)`` over
    ``functional_call`` of ``model`` (randomness per member) and takes each member's gradient by one
    ``autograd.grad`` of their sum through the batched ops (members share no op), clips each member's
    gradient to its norm and applies each member's AdamW, on the active slots only; it returns the
    (K, accum, len(STAT_KEYS)) statistics rows. On CUDA (``graphed``) the step is captured once, with every
    slot in it: a member joining or leaving writes its slot's rows and flips ``active`` in place, so one
    graph serves the population's life (an idle slot computes and is discarded, rather than a graph per
    occupancy, which would capture again at every change of a sweep's ragged occupancy).
    """

    def __init__(self, shape: Config, model: torch.nn.Module, slots: int, featurize: DenseFeaturizer,
                 jets: tuple[torch.Tensor, torch.Tensor], node_stats, precision: Precision, graphed: bool):
        from torch.func import vmap

        self.shape, self.model, self.featurize, self.jets = shape, model, featurize, jets
        self.node_stats, self.precision, self.graphed = node_stats, precision, graphed
        dev, k = jets[0].device, slots
        self.params = {n: torch.zeros(k, *p.shape, device=dev) for n, p in model.named_parameters()}
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.average = {n: torch.zeros_like(p) for n, p in self.params.items()}  # = params at ema_decay 0
        f64 = {"dtype": torch.float64, "device": dev}
        self.hyper = {name: torch.zeros(k, **f64) for name in ("lr", "weight_decay", "grad_clip", "steps")}
        self.ema_decay = torch.zeros(k, **f64)
        self.beta = torch.zeros(k, device=dev)
        self.free_bits = torch.zeros(k, device=dev)
        self.weights = {c: torch.zeros(k, device=dev) for c in COMPONENTS}
        self.active = torch.zeros(k, dtype=torch.bool, device=dev)
        self._losses = vmap(self._member_loss, randomness="different")
        self._graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def load(self, slot: int, cfg: Config, params: dict[str, torch.Tensor],
             moments: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, float]],
             average: dict[str, torch.Tensor] | None = None) -> None:
        """Write a member into ``slot``: its weights (and their moving average: the weights when None), AdamW
        moments and step count, and its scalars."""
        for name, p in params.items():
            m, v, _ = moments[name]
            self.params[name][slot].copy_(p)
            self.average[name][slot].copy_(average[name] if average is not None else p)
            self.exp_avg[name][slot].copy_(m if m is not None else torch.zeros_like(p))
            self.exp_avg_sq[name][slot].copy_(v if v is not None else torch.zeros_like(p))
        self.hyper["steps"][slot] = next(iter(moments.values()))[2]  # one AdamW step count for all parameters
        for key, value in (("lr", cfg.learning_rate), ("weight_decay", cfg.weight_decay),
                           ("grad_clip", cfg.grad_clip)):
            self.hyper[key][slot] = value
        self.free_bits[slot] = cfg.free_bits
        self.ema_decay[slot] = cfg.ema_decay
        for c in COMPONENTS:
            self.weights[c][slot] = getattr(cfg.loss_weights, c)
        self.active[slot] = True

    def __call__(self, pos: torch.Tensor, valid: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """One optimiser step of every slot: positions and validity (K, accum, B), noise (K, accum, B, Z);
        returns (K, accum, 8) statistics rows. Replayed from a CUDA graph on CUDA."""
        if not self.graphed:
            return self._step(pos, valid, eps)
        if self._graph is None:
            self._capture(pos, valid, eps)
        self._io[0].copy_(pos)
        self._io[1].copy_(valid)
        self._io[2].copy_(eps)
        self._graph.replay()
        return self._rows.clone()

    def _member_loss(self, params, x, mask, edges, pair_mask, hyperedges, incidence, weight, eps, beta, free_bits,
                     weights):
        from torch.func import functional_call

        batch = DenseBatch(x, mask, edges, pair_mask, hyperedges, incidence, weight)
        out = functional_call(self.model, params, (batch, eps))
        loss, row = batch_loss(out, batch, self.node_stats, self.shape.particle_loss, free_bits, weights, beta)
        return loss / self.shape.gradient_accumulation_steps, row

    def _step(self, pos: torch.Tensor, valid: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        k, accum, b = pos.shape
        parts, mask = self.jets
        grads, rows = None, []
        for a in range(accum):
            flat = pos[:, a].reshape(-1)
            batch = self.featurize(parts[flat], mask[flat], valid[:, a].reshape(-1).float())  # (K·B, ...)
            fields = [t.view(k, b, *t.shape[1:]) for t in (batch.x, batch.mask, batch.edges, batch.pair_mask,
                                                           batch.hyperedges, batch.incidence, batch.weight)]
            with self._attention(), torch.enable_grad():
                leaves = {n: p.detach().requires_grad_() for n, p in self.params.items()}
                loss, row = self._losses(leaves, *fields, eps[:, a], self.beta, self.free_bits, self.weights)
                # Members share no op, so the gradient of the sum is each member's gradient of its own loss
                g = dict(zip(leaves, torch.autograd.grad(loss.sum(), list(leaves.values()))))
            grads = g if grads is None else {n: grads[n] + g[n] for n in grads}
            rows.append(row)
        self._adamw(grads)
        return torch.stack(rows, dim=1)

    @torch.no_grad()
    def validation_batches(self, slots: Sequence[int], val_jets: tuple[torch.Tensor, torch.Tensor], size: int
                           ) -> dict[int, list[tuple[int, dict[str, torch.Tensor], torch.Tensor]]]:
        """Each of ``slots``' (jets, terms, KL) over ``val_jets`` in batches of ``size``, as
        :func:`~hvae_ray.engine.paths.dense_val_batches` yields them for one model (eval mode, the member's
        averaged weights, the config's autocast), for all the members at once: each batch is featurised
        once and every slot's forward pass runs in one ``vmap`` over the weights. Every slot runs, idle
        or not, as in the step: the kernels' shapes, and so a member's numbers to the last bit, do not
        depend on which other slots are occupied."""
        from torch.func import functional_call, vmap

        params = self.average
        parts, mask = val_jets
        out: dict[int, list] = {s: [] for s in slots}

        def member(p, batch):
            o = functional_call(self.model, p, (batch,))
            terms = dense_reconstruction_terms(o.decoded, batch, self.node_stats, self.shape.particle_loss)
            return terms, kl_divergence(o.mu, o.logvar)

        with self._eval():
            for s in range(0, parts.shape[0], size):
                batch = self.featurize(parts[s : s + size], mask[s : s + size])
                with self._attention(), self.precision.autocast():
                    terms, kl = vmap(member, in_dims=(0, None))(params, batch)
                for slot in slots:
                    out[slot].append((batch.num_graphs, {c: t[slot] for c, t in terms.items()}, kl[slot]))
        return out

    @torch.no_grad()
    def encode(self, jets: tuple[torch.Tensor, torch.Tensor], size: int) -> torch.Tensor:
        """Every slot's posterior means (K, N, Z) of ``jets`` (N of them) in batches of ``size``, as
        :func:`~hvae_ray.latent.encode` computes them for one model (eval mode, averaged weights, the config's
        autocast): each batch featurised once, the encoders in one ``vmap``."""
        from torch.func import functional_call, vmap

        params = _prefixed(self.average, "encoder.")
        parts, mask = jets
        means = []
        with self._eval():
            for s in range(0, parts.shape[0], size):
                batch = self.featurize(parts[s : s + size], mask[s : s + size])
                with self._attention(), self.precision.autocast():
                    mu = vmap(lambda p, b: functional_call(self.model.encoder, p, (b,))[0], in_dims=(0, None))(
                        params, batch)
                means.append(mu.float())
        return torch.cat(means, dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's decoding of its own codes ``z`` (K, N, Z) in batches of ``size``: normalised particles
        (K, N, P, 3) and existence logits (K, N, P), float32, as ``HyperVAE.decode(z, with_edges=False)``
        gives them for one model (eval mode, averaged weights)."""
        from torch.func import functional_call, vmap

        params = _prefixed(self.average, "decoder.")
        parts, logits = [], []

        def member(p, codes):
            dec = functional_call(self.model.decoder, p, (codes, False))
            return dec.particles.float(), dec.exist_logits.float()

        with self._eval(), self._attention():
            for s in range(0, z.shape[1], size):
                x, e = vmap(member)(params, z[:, s : s + size])
                parts.append(x)
                logits.append(e)
        return torch.cat(parts, dim=1), torch.cat(logits, dim=1)

    @contextlib.contextmanager
    def _eval(self):
        """Eval mode, without the transformer layers' fused inference kernel, which ``vmap`` cannot batch
        (it would loop over the members, with a warning): the layers' plain ops batch."""
        was_training, fast = self.model.training, torch.backends.mha.get_fastpath_enabled()
        self.model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
            self.model.train(was_training)

    def _attention(self):
        """The math kernel of scaled-dot-product attention: plain batched matrix products, which ``vmap``
        batches natively (it has no batching rule for the CPU's flash kernel and would loop over the
        members); over the decoder's 30 slots the fused kernels gain nothing."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)

    @torch.no_grad()
    def _adamw(self, grads: dict[str, torch.Tensor]) -> None:
        """Clip each member's gradient to its ``grad_clip`` norm, then one AdamW step per member, as
        ``clip_grad_norm_`` and ``torch.optim.AdamW`` compute them (the scalars in float64, as their
        Python floats are), on the active slots only."""
        h, active = self.hyper, self.active
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()], dim=1)
        total = torch.linalg.vector_norm(norms, dim=1)  # (K,)
        clip = h["grad_clip"].float()
        coef = torch.where(clip > 0, (clip / (total + 1e-6)).clamp(max=1.0), torch.ones_like(total))
        h["steps"] += active.double()
        steps = h["steps"].clamp(min=1)
        decay = (1 - h["lr"] * h["weight_decay"]).float()
        average_weight = (1 - average_decay(self.ema_decay, h["steps"])).float()  # as update_average's
        step_size = (h["lr"] / (1 - BETAS[0] ** steps)).float()
        bc2_sqrt = (1 - BETAS[1] ** steps).sqrt().float()
        for name, p in self.params.items():
            shape = (-1,) + (1,) * (p.dim() - 1)
            on = active.view(shape)
            g = grads[name] * coef.view(shape)
            m = torch.lerp(self.exp_avg[name], g, 1 - BETAS[0])
            v = (self.exp_avg_sq[name] * BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
            denom = (v.sqrt() / bc2_sqrt.view(shape)) + ADAM_EPS
            new = p * decay.view(shape) + (-step_size).view(shape) * m / denom
            p.copy_(torch.where(on, new, p))
            self.exp_avg[name].copy_(torch.where(on, m, self.exp_avg[name]))
            self.exp_avg_sq[name].copy_(torch.where(on, v, self.exp_avg_sq[name]))
            a = self.average[name]  # a + (1 - d)(p - a): exactly p at decay 0
            a.copy_(torch.where(on, torch.lerp(a, p, average_weight.view(shape)), a))

    def _capture(self, pos: torch.Tensor, valid: torch.Tensor, eps: torch.Tensor) -> None:
        """Capture :meth:`_step` in a CUDA graph after two warm-up steps on a side stream, which are undone."""
        dev = self.jets[0].device
        self._io = (pos.clone(), valid.clone(), eps.clone())
        state = [*self.params.values(), *self.exp_avg.values(), *self.exp_avg_sq.values(), *self.average.values(),
                 self.hyper["steps"]]
        rng_cpu, rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state(dev)
        with undone([], None, state):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(*self._io)
            torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._rows = self._step(*self._io)
        torch.set_rng_state(rng_cpu)
        torch.cuda.set_rng_state(rng_cuda, dev)
        torch.cuda.empty_cache()
        self._graph = graph


def _prefixed(params: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``params`` under ``prefix``, named without it: a submodule's parameters."""
    return {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}
