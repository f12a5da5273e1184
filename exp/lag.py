import sys, time, cProfile, pstats
import torch
import decoquant as dq
from decoquant.bench.e2e_decode import random_model, decoquant_config
from decoquant.cache import CompressedKVStore
from transformers import DynamicCache
dev = torch.device("cuda")
model = random_model(32, dev)
ids = torch.randint(0, 32000, (1, 4096), device=dev)
def timed(mk, runs=5):
    ts = []
    for _ in range(runs + 1):
        c = mk(); torch.cuda.synchronize(); t0 = time.perf_counter()
        model(input_ids=ids, past_key_values=c, logits_to_keep=1); torch.cuda.synchronize()
        ts.append(1e3 * (time.perf_counter() - t0)); del c
    return sorted(ts[1:])[runs // 2]
with torch.no_grad():
    print("fp16", f"{timed(lambda: DynamicCache(config=model.config)):.1f}")
    for preset in ["paper", "channel64-token"]:
        cfg = decoquant_config(f"decoquant:{preset}", 4)
        for lag in (0, 1, 2):
            dq.DecoQuantCache._lag = lag
            print(preset, "lag", lag, f"{timed(lambda: dq.DecoQuantCache(cfg, model.config, fused=True)):.1f}", flush=True)
        print(preset, "serial", f"{timed(lambda: dq.DecoQuantCache(cfg, model.config, fused=True, overlap=False)):.1f}", flush=True)
    k = torch.randn(1, 32, 4096, 128, device=dev, dtype=torch.float16)
    for preset in ["paper", "channel64-token"]:
        cfg = decoquant_config(f"decoquant:{preset}", 4)
        for _ in range(3):
            CompressedKVStore(cfg, fused=True).append(k, k)
        torch.cuda.synchronize()
        pr = cProfile.Profile(); pr.enable()
        for _ in range(20):
            CompressedKVStore(cfg, fused=True).append(k, k)
        torch.cuda.synchronize()
        pr.disable()
        print("##", preset)
        pstats.Stats(pr).sort_stats("tottime").print_stats(22)
