import sys, collections, time
import torch
import decoquant as dq
from decoquant.bench.e2e_decode import random_model, decoquant_config
from decoquant import cache as cache_mod
dev = torch.device("cuda")
model = random_model(32, dev)
ids = torch.randint(0, 32000, (1, 4096), device=dev)
from torch.profiler import profile, ProfilerActivity
# host time inside settle / append per layer
T = collections.defaultdict(float)
def timed(name, fn):
    def w(self, *a, **k):
        t0 = time.perf_counter(); r = fn(self, *a, **k); T[name] += time.perf_counter() - t0; return r
    return w
cache_mod.CompressedKVStore.settle = timed("settle", cache_mod.CompressedKVStore.settle)
cache_mod.CompressedKVStore._compress_blocks = timed("compress_blocks", cache_mod.CompressedKVStore._compress_blocks)
with torch.no_grad():
    for preset in ["paper", "channel64-token"]:
        mk = lambda: dq.DecoQuantCache(decoquant_config(f"decoquant:{preset}", 4), model.config, fused=True)
        for _ in range(3):
            model(input_ids=ids, past_key_values=mk(), logits_to_keep=1)
        torch.cuda.synchronize()
        T.clear()
        t0 = time.perf_counter()
        model(input_ids=ids, past_key_values=mk(), logits_to_keep=1)
        torch.cuda.synchronize()
        print(f"## {preset}: total {1e3*(time.perf_counter()-t0):.1f} ms; " + ", ".join(f"{k} {1e3*v:.1f} ms" for k, v in T.items()), flush=True)
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            model(input_ids=ids, past_key_values=mk(), logits_to_keep=1)
            torch.cuda.synchronize()
        rows = [e for e in prof.key_averages(group_by_stack_n=12) if e.key in ("cudaMalloc", "cudaStreamSynchronize", "cudaFree")]
        for e in rows:
            print(f"  {e.key} n={e.count} self={e.self_cpu_time_total/1e3:.2f} ms")
            for fr in e.stack[:12]:
                print("     ", fr)
