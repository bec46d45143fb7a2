"""HyperVAE: message-passing encoder over edges and hyperedges, slot decoder, losses and KL schedules."""
