"""cProfile of Trainer.generation_metrics (new code), fidelity config, after one epoch; top functions."""
import cProfile, pstats, sys, io, time
sys.path.insert(0, "benchmarks")
import torch, harness
from hvae_ray import engine
dev = torch.device("cuda"); torch.set_num_threads(1)
sets = sys.argv[2:]
cfg = harness.config(sets, {"device": "cuda"})
tr = engine.Trainer(cfg, engine.prepare(cfg, harness.load_sample(sys.argv[1], 30000), device=dev), dev)
tr.train_epoch(0); tr.generation_metrics(); torch.cuda.synchronize()
pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
for _ in range(3):
    tr.generation_metrics()
torch.cuda.synchronize(); pr.disable()
print(f"3 calls {time.perf_counter() - t:.3f} s")
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40); print(s.getvalue().replace(sys.prefix, "<prefix>"))
