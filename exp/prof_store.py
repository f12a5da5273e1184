import sys, time
import torch
import decoquant as dq
from decoquant.bench.e2e_decode import decoquant_config
from decoquant.cache import CompressedKVStore
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
ctx = 4096
k = torch.randn(1, 32, ctx, 128, device=dev, dtype=torch.float16)
v = torch.randn(1, 32, ctx, 128, device=dev, dtype=torch.float16)
for preset in ["paper", "channel64-token"]:
    cfg = decoquant_config(f"decoquant:{preset}", 4)
    for _ in range(3):
        s = CompressedKVStore(cfg, fused=True); s.append(k, v)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        s = CompressedKVStore(cfg, fused=True); s.append(k, v)
    torch.cuda.synchronize()
    print(f"## {preset}: {(time.perf_counter()-t0)/10*1e3:.2f} ms per store append (4k x 32 heads, K+V)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        s = CompressedKVStore(cfg, fused=True); s.append(k, v)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="count", row_limit=45, max_name_column_width=45))
