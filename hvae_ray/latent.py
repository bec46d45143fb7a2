"""Latent codes of a trained HyperVAE: encode jets, decode codes, and a prior fitted to the posterior.

A VAE samples jets by decoding z ~ N(0, 1). When the KL weight is small the aggregate posterior
q(z) = E_x q(z | x) sits far from N(0, 1), and prior samples fall where the decoder never trained.
Ex-post density estimation (Ghosh et al., "From variational to deterministic autoencoders",
arXiv:1903.12436) fits a density to the training jets' latent codes after training and samples from
it instead: here a Gaussian mixture with diagonal covariances, fitted by EM (Dempster, Laird and
Rubin 1977) on the posterior means of the training split.

Decoding z ~ q(z | x) of real jets (``encode`` then a reparameterised draw) gives the model's own
reconstructions: no prior, however well fitted, can generate better jets than these, so their
metrics bound what any prior can reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hvae_ray.config import Config
from hvae_ray.data.dense import DenseFeaturizer, FeatureNormaliser
from hvae_ray.errors import DataError

__all__ = ["PRIOR_FILE", "GaussianMixture", "encode", "decode", "posterior_codes", "save_prior", "load_prior"]

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
        logits = dec.exist_logits.float()
        mask = logits > 0
        mask[torch.arange(len(logits)), logits.argmax(dim=1)] = True
        parts.append((normaliser.inverse_particles(dec.particles.float()) * mask[..., None]).cpu())
        masks.append(mask.cpu())
    model.train(was_training)
    return torch.cat(parts).numpy(), torch.cat(masks).numpy()


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
            tol: float = 1e-6, min_variance: float = 1e-6) -> GaussianMixture:
        """EM from a seeded k-means++ start; stops when the mean log-likelihood gains less than ``tol``.

        x: (N, Z). ``components`` is capped at N. ``min_variance`` floors each variance.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 1:
            raise ValueError(f"need codes of shape (N, Z) with N ≥ 1, got {x.shape}")
        rng = np.random.default_rng(seed)
        k = int(min(components, len(x)))
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):  # k-means++: far points are more likely centres
            d2 = np.min([((x - c) ** 2).sum(axis=1) for c in centres], axis=0)
            total = d2.sum()
            centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
        spread = np.maximum(x.var(axis=0), min_variance)
        gmm = cls(np.full(k, 1.0 / k), np.array(centres), np.tile(spread, (k, 1)))
        previous = -np.inf
        for _ in range(iterations):
            log_r = gmm._log_joint(x)  # (N, K)
            norm = np.logaddexp.reduce(log_r, axis=1, keepdims=True)
            resp = np.exp(log_r - norm)
            nk = resp.sum(axis=0) + 1e-12
            gmm.weights = nk / nk.sum()
            gmm.means = (resp.T @ x) / nk[:, None]
            gmm.variances = np.maximum((resp.T @ x**2) / nk[:, None] - gmm.means**2, min_variance)
            ll = float(norm.mean())
            if ll - previous < tol:
                break
            previous = ll
        return gmm

    def _log_joint(self, x: np.ndarray) -> np.ndarray:
        """log w_k + log N(x | μ_k, diag σ²_k) for every point and component: (N, K)."""
        diff2 = (x[:, None, :] - self.means[None]) ** 2 / self.variances[None]
        log_norm = -0.5 * (np.log(2 * np.pi * self.variances).sum(axis=1))
        return np.log(self.weights)[None] + log_norm[None] - 0.5 * diff2.sum(axis=2)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """log density of each point (N,)."""
        return np.logaddexp.reduce(self._log_joint(np.asarray(x, dtype=np.float64)), axis=1)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n codes (n, Z) float32, seeded."""
        rng = np.random.default_rng(seed)
        comp = rng.choice(len(self.weights), size=n, p=self.weights)
        z = self.means[comp] + np.sqrt(self.variances[comp]) * rng.standard_normal((n, self.means.shape[1]))
        return z.astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weights": torch.from_numpy(self.weights), "means": torch.from_numpy(self.means),
                "variances": torch.from_numpy(self.variances)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GaussianMixture:
        return cls(*(state[k].double().numpy() for k in ("weights", "means", "variances")))


def save_prior(checkpoint_dir: str | Path, gmm: GaussianMixture, meta: dict[str, int | float | str]) -> Path:
    """Write the prior beside the checkpoint (atomic). ``meta`` records how it was fitted."""
    path = Path(checkpoint_dir) / PRIOR_FILE
    tmp = path.with_suffix(".tmp")
    torch.save({"kind": "gaussian_mixture", **gmm.state_dict(), "meta": dict(meta)}, tmp)
    tmp.replace(path)
    return path


def load_prior(checkpoint_dir: str | Path, latent_dim: int) -> GaussianMixture:
    """The fitted prior of a checkpoint folder (``weights_only``: no code can run); DataError if absent."""
    path = Path(checkpoint_dir) / PRIOR_FILE
    if not path.is_file():
        raise DataError(f"{path}: no fitted prior; fit one first (prior fit) or sample the standard prior")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        gmm = GaussianMixture.from_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one error line
        raise DataError(f"{path}: not a readable prior ({e.__class__.__name__})") from e
    if gmm.means.shape[1] != latent_dim:
        raise DataError(f"{path}: the prior has {gmm.means.shape[1]} latent dimensions, the model {latent_dim}")
    return gmm
