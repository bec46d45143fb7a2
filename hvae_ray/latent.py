"""Latent codes of a trained HyperVAE: encode jets, decode codes, and a prior fitted to the posterior.

A VAE samples jets by decoding z ~ N(0, 1). When the KL weight is small the aggregate posterior
q(z) = E_x q(z | x) sits far from N(0, 1), and prior samples fall where the decoder never trained.
Ex-post density estimation (Ghosh et al., "From variational to deterministic autoencoders",
arXiv:1903.12436) fits a density to the training jets' latent codes after training and samples from
it instead: here a RealNVP normalizing flow (:class:`FlowPrior`) fitted by maximum likelihood to
draws from the training jets' posteriors, or a Gaussian mixture with diagonal covariances
(:class:`GaussianMixture`), fitted by EM (Dempster, Laird and Rubin 1977) to their posterior means.

Decoding z ~ q(z | x) of real jets (``encode`` then a reparameterised draw) gives the model's own
reconstructions: no prior, however well fitted, can generate better jets than these, so their
metrics bound what any prior can reach.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hvae_ray.config import Config
from hvae_ray.data.dense import DenseFeaturizer, FeatureNormaliser
from hvae_ray.errors import DataError

__all__ = ["PRIOR_FILE", "PRIOR_KINDS", "FlowPrior", "GaussianMixture", "encode", "decode", "posterior_codes",
           "save_prior", "load_prior", "decoded_jets"]

#: The fitted prior's file, beside ``checkpoint.pt`` in a checkpoint folder.
PRIOR_FILE = "prior.pt"


@torch.no_grad()
def encode(model, normaliser: FeatureNormaliser, cfg: Config, particles: np.ndarray, mask: np.ndarray,
           device: torch.device | str = "cpu", batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Posterior q(z | x) of each jet: (mu (N, Z), logvar (N, Z)) float32. particles (N, P, 3) physical
    (η_rel, φ_rel, pT_rel), mask (N, P) bool."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    featurize = DenseFeaturizer(normaliser, cfg.data.knn, device)
    mus, logvars = [], []
    for s in range(0, len(particles), batch_size):
        p = torch.as_tensor(np.ascontiguousarray(particles[s:s + batch_size]), dtype=torch.float32).to(device)
        m = torch.as_tensor(np.ascontiguousarray(mask[s:s + batch_size]), dtype=torch.bool).to(device)
        mu, logvar = model.encode(featurize(p, m))
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
    model.train(was_training)
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy()


def posterior_codes(mu: np.ndarray, logvar: np.ndarray, seed: int = 0) -> np.ndarray:
    """One draw z = mu + σ ε from each jet's posterior (seeded). Returns (N, Z) float32."""
    eps = np.random.default_rng(seed).standard_normal(mu.shape)
    return (mu + np.exp(0.5 * logvar) * eps).astype(np.float32)


@torch.no_grad()
def decode(model, normaliser: FeatureNormaliser, z: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
           batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Jets of latent codes z (N, Z): particles (N, P, 3) physical and mask (N, P). A slot exists where
    its existence probability exceeds 1/2 (the most likely slot at least, so no jet is empty)."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    z = torch.as_tensor(z, dtype=torch.float32)
    parts, masks = [], []
    for s in range(0, len(z), batch_size):
        dec = model.decode(z[s:s + batch_size].to(device), with_edges=False)
        p, mask = decoded_jets(dec.particles, dec.exist_logits, normaliser)
        parts.append(p.cpu())
        masks.append(mask.cpu())
    model.train(was_training)
    return torch.cat(parts).numpy(), torch.cat(masks).numpy()


def decoded_jets(particles: torch.Tensor, exist_logits: torch.Tensor, normaliser: FeatureNormaliser
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The jets of a decoder's output, normalised particles (N, P, 3) and existence logits (N, P): physical
    particles (padding zeroed) and mask, a slot existing where its logit is positive (the most likely slot
    at least, so no jet is empty)."""
    logits = exist_logits.float()
    mask = logits > 0
    mask[torch.arange(len(logits)), logits.argmax(dim=1)] = True
    return normaliser.inverse_particles(particles.float()) * mask[..., None], mask


def _log_joint(x: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
               variances: torch.Tensor) -> torch.Tensor:
    """log w_k + log N(x | μ_k, diag σ²_k) for every point and component: (..., N, K), from x (..., N, Z)
    and x², weights (..., K), means and variances (..., K, Z); ``...``: mixtures fitted side by side."""
    # Σ_z (x − μ)²/σ² expanded into matrix products: no (N, K, Z) temporary.
    prec = 1.0 / variances  # (..., K, Z)
    quad = (x2 @ prec.transpose(-1, -2) - 2.0 * x @ (means * prec).transpose(-1, -2)
            + (means**2 * prec).sum(dim=-1)[..., None, :])
    log_norm = -0.5 * torch.log(2 * math.pi * variances).sum(dim=-1)
    return (torch.log(weights) + log_norm)[..., None, :] - 0.5 * quad.clamp(min=0.0)


def _kmeans_pp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k seeded k-means++ centres of x (N, Z): far points are more likely centres."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = d2.sum()
        centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(axis=1))
    return np.array(centres)


@dataclass
class GaussianMixture:
    """A mixture of K Gaussians with diagonal covariances in Z dimensions.

    weights: (K,) summing to 1; means: (K, Z); variances: (K, Z), all float64.
    """

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, components: int = 20, seed: int = 0, iterations: int = 200,
            tol: float = 1e-6, min_variance: float = 1e-6, device: torch.device | str | None = None
            ) -> GaussianMixture:
        """EM from a seeded k-means++ start; stops when the mean log-likelihood gains less than ``tol``.

        x: (N, Z). ``components`` is capped at N. ``min_variance`` floors each variance. The EM steps
        run in float64 on ``device`` (None: the CPU): a few dozen small matrix products per step, so
        on a GPU a fit of 20 components to 5,000 codes takes milliseconds.
        """
        return cls.fit_many([x], components, [seed], iterations, tol, min_variance, device)[0]

    @classmethod
    def fit_many(cls, xs: Sequence[np.ndarray], components: int = 20, seeds: Sequence[int] = (0,),
                 iterations: int = 200, tol: float = 1e-6, min_variance: float = 1e-6,
                 device: torch.device | str | None = None) -> list[GaussianMixture]:
        """:meth:`fit` of each set of codes of ``xs`` (all (N, Z), one N) with its seed of ``seeds``, as one
        batched EM: each iteration is a few batched matrix products for all the sets, and a set whose
        log-likelihood has settled keeps its mixture while the others go on, so each gets the mixture
        its own fit would."""
        x = np.stack([np.asarray(a, dtype=np.float64) for a in xs]) if len(xs) else np.zeros((0, 0, 0))
        if x.ndim != 3 or x.shape[1] < 1:
            raise ValueError(f"need codes of shape (N, Z) with N ≥ 1, got {x.shape[1:]}")
        k = int(min(components, x.shape[1]))
        dev = torch.device(device) if device is not None else torch.device("cpu")
        xt = torch.from_numpy(x).to(dev)  # (M, N, Z)
        x2 = xt**2
        weights = torch.full((len(x), k), 1.0 / k, dtype=torch.float64, device=dev)
        means = torch.from_numpy(np.stack([_kmeans_pp(a, k, seed) for a, seed in zip(x, seeds)])).to(dev)
        variances = xt.var(dim=1, unbiased=False).clamp(min=min_variance)[:, None].expand(-1, k, -1).clone()
        previous = torch.full((len(x),), -math.inf, dtype=torch.float64, device=dev)
        going = torch.ones(len(x), dtype=torch.bool, device=dev)
        for _ in range(iterations):
            log_r = _log_joint(xt, x2, weights, means, variances)  # (M, N, K)
            norm = torch.logsumexp(log_r, dim=2, keepdim=True)
            resp = torch.exp(log_r - norm)
            nk = resp.sum(dim=1) + 1e-12  # (M, K)
            on = going[:, None]
            weights = torch.where(on, nk / nk.sum(dim=1, keepdim=True), weights)
            new_means = (resp.transpose(1, 2) @ xt) / nk[..., None]
            new_vars = ((resp.transpose(1, 2) @ x2) / nk[..., None] - new_means**2).clamp(min=min_variance)
            means = torch.where(on[..., None], new_means, means)
            variances = torch.where(on[..., None], new_vars, variances)
            ll = norm[..., 0].mean(dim=1)
            going = going & (ll - previous >= tol)
            previous = ll
            if not bool(going.any()):
                break
        return [cls(*(t.cpu().numpy() for t in parts)) for parts in zip(weights, means, variances)]

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """log density of each point (N,)."""
        xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
        w, m, v = (torch.from_numpy(a) for a in (self.weights, self.means, self.variances))
        return torch.logsumexp(_log_joint(xt, xt**2, w, m, v), dim=1).numpy()

    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """n codes (n, Z) float32, seeded; ``temperature`` scales each component's standard deviation."""
        rng = np.random.default_rng(seed)
        comp = rng.choice(len(self.weights), size=n, p=self.weights)
        noise = rng.standard_normal((n, self.means.shape[1]))
        z = self.means[comp] + temperature * np.sqrt(self.variances[comp]) * noise
        return z.astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weights": torch.from_numpy(self.weights), "means": torch.from_numpy(self.means),
                "variances": torch.from_numpy(self.variances)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GaussianMixture:
        return cls(*(state[k].double().numpy() for k in ("weights", "means", "variances")))


class _Coupling(torch.nn.Module):
    """Affine coupling (Dinh, Sohl-Dickstein, Bengio, "Density estimation using Real NVP", arXiv:1605.08803):
    the dimensions outside ``mask`` are scaled and shifted by functions of those inside it."""

    def __init__(self, dim: int, hidden: int, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, 2 * dim))
        torch.nn.init.zeros_(self.net[-1].weight)  # starts as the identity
        torch.nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(kept).chunk(2, dim=-1)
        free = 1.0 - self.mask
        return torch.tanh(s) * free, t * free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """code → base direction: (y, log |det ∂y/∂x|)."""
        kept = x * self.mask
        s, t = self._scale_shift(kept)
        return kept + (1.0 - self.mask) * (x * torch.exp(s) + t), s.sum(dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept = y * self.mask
        s, t = self._scale_shift(kept)
        return kept + (1.0 - self.mask) * ((y - t) * torch.exp(-s))


class FlowPrior(torch.nn.Module):
    """A RealNVP normalizing flow over latent codes: ``layers`` affine couplings, each conditioning a
    seeded random half of the (standardised) dimensions on the other half, onto N(0, 1).

    Fitted after training to codes drawn from the training jets' posteriors by maximum likelihood
    (ex-post density estimation, Ghosh et al., arXiv:1903.12436; a flow rather than a mixture, as in
    Orzari et al., MLST 4 (2023) 045023): it follows the curved, correlated aggregate posterior a
    diagonal mixture can only tile. ``sample`` and ``log_prob`` take and give numpy arrays.
    """

    def __init__(self, dim: int, hidden: int = 128, layers: int = 8, seed: int = 0):
        super().__init__()
        self.dim, self.hidden, self.n_layers = dim, hidden, layers
        gen = torch.Generator().manual_seed(seed)
        masks = []
        for _ in range(layers):
            mask = torch.zeros(dim)
            mask[torch.randperm(dim, generator=gen)[: dim // 2]] = 1.0
            masks.append(mask)
        self.couplings = torch.nn.ModuleList(_Coupling(dim, hidden, m) for m in masks)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        u = (z - self.mean) / self.std
        log_det = -torch.log(self.std).sum().expand(z.shape[0])
        for c in self.couplings:
            u, ld = c(u)
            log_det = log_det + ld
        return -0.5 * (u.pow(2).sum(dim=-1) + self.dim * math.log(2 * math.pi)) + log_det

    @classmethod
    def fit(cls, codes: np.ndarray, hidden: int = 128, layers: int = 8, steps: int | None = None,
            batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, device: torch.device | str = "cpu") -> FlowPrior:
        """Maximum likelihood on ``codes`` (N, Z) with Adam (cosine-decayed learning rate), seeded.
        ``steps`` (default): 100 passes over the codes, at least 200 and at most 3,000 steps."""
        x = torch.as_tensor(np.asarray(codes), dtype=torch.float32)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need codes of shape (N, Z) with N ≥ 2, got {tuple(x.shape)}")
        if steps is None:
            steps = int(np.clip(100 * len(x) / batch_size, 200, 3000))
        torch.manual_seed(seed)
        flow = cls(x.shape[1], hidden, layers, seed)
        flow.mean.copy_(x.mean(dim=0))
        flow.std.copy_(x.std(dim=0).clamp(min=1e-4))
        flow = flow.to(device)
        x = x.to(device)
        opt = torch.optim.Adam(flow.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen).to(device)
                loss = -flow._log_prob(x[idx]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
                opt.step()
                sched.step()
        return flow.cpu().eval()

    @torch.no_grad()
    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return self._log_prob(torch.as_tensor(np.asarray(x), dtype=torch.float32)).double().numpy()

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """n codes (n, Z) float32, seeded; ``temperature`` scales the base N(0, 1) draws (below 1: fewer
        codes from the flow's tails, as in Kingma & Dhariwal, "Glow", arXiv:1807.03039)."""
        u = temperature * torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed))
        for c in reversed(self.couplings):
            u = c.inverse(u)
        return (u * self.std + self.mean).numpy().astype(np.float32)

    def to_state(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "layers": self.n_layers, "weights": self.state_dict()}

    @classmethod
    def from_state(cls, state: dict) -> FlowPrior:
        flow = cls(int(state["dim"]), int(state["hidden"]), int(state["layers"]))
        flow.load_state_dict(state["weights"])
        return flow.eval()


#: The fitted priors ``prior fit`` offers: a RealNVP flow or a diagonal Gaussian mixture.
PRIOR_KINDS = ("flow", "gmm")


def save_prior(checkpoint_dir: str | Path, prior: GaussianMixture | FlowPrior, meta: dict[str, int | float | str]
               ) -> Path:
    """Write the prior beside the checkpoint (atomic). ``meta`` records how it was fitted."""
    from hvae_ray.io_safe import atomic_write

    path = Path(checkpoint_dir) / PRIOR_FILE
    if isinstance(prior, FlowPrior):
        state = {"kind": "flow", **prior.to_state()}
    else:
        state = {"kind": "gaussian_mixture", **prior.state_dict()}
    return atomic_write(path, lambda f: torch.save({**state, "meta": dict(meta)}, f))


def load_prior(checkpoint_dir: str | Path, latent_dim: int) -> GaussianMixture | FlowPrior:
    """The fitted prior of a checkpoint folder (``weights_only``: no code can run); DataError if absent."""
    path = Path(checkpoint_dir) / PRIOR_FILE
    if not path.is_file():
        raise DataError(f"{path}: no fitted prior; fit one first (prior fit) or sample the standard prior")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("kind") == "flow":
            prior, dim = FlowPrior.from_state(state), int(state["dim"])
        else:
            prior = GaussianMixture.from_state_dict(state)
            dim = prior.means.shape[1]
    except Exception as e:  # noqa: BLE001 - any unreadable file is one error line
        raise DataError(f"{path}: not a readable prior ({e.__class__.__name__})") from e
    if dim != latent_dim:
        raise DataError(f"{path}: the prior has {dim} latent dimensions, the model {latent_dim}")
    return prior
