"""Step strategies of the dense engine: one optimiser step over ``accum`` micro-batches, eager, compiled
(``torch.compile`` of each micro-batch's loss) or replayed from a CUDA graph. The population's step
(:mod:`hvae_ray.engine.population`) is built from the same :func:`batch_loss`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

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
                 node_stats, graphed: bool, compiled: bool):
        self.cfg, self.model, self.net, self.opt, self.precision = cfg, model, net, opt, precision
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
        with undone(list(self.model.parameters()), self.opt):
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
