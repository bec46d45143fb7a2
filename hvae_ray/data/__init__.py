"""Jets: generation (Pythia 8 + FastJet), file formats, and hypergraph building."""

from hvae_ray.data.jets import JET_FEATURES, MAX_PARTICLES, PARTICLE_FEATURES, JetSample

__all__ = ["JET_FEATURES", "MAX_PARTICLES", "PARTICLE_FEATURES", "JetSample"]
