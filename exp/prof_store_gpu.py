import collections
import torch
from decoquant.bench.e2e_decode import decoquant_config
from decoquant.cache import CompressedKVStore
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
for ctx in (4096, 16384):
    k = torch.randn(1, 32, ctx, 128, device=dev, dtype=torch.float16)
    v = torch.randn(1, 32, ctx, 128, device=dev, dtype=torch.float16)
    for preset in ["paper", "channel64-token"]:
        cfg = decoquant_config(f"decoquant:{preset}", 4)
        for _ in range(3):
            s = CompressedKVStore(cfg, fused=True); s.append(k, v)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                s = CompressedKVStore(cfg, fused=True); s.append(k, v)
            torch.cuda.synchronize()
        agg = collections.Counter(); cnt = collections.Counter()
        for e in prof.events():
            if e.device_type.name == "CUDA":
                agg[e.name[:70]] += e.device_time_total; cnt[e.name[:70]] += 1
        print(f"## {ctx} {preset}: GPU time per append {sum(agg.values())/5/1e3:.3f} ms, kernels per append {sum(cnt.values())/5:.0f}")
        for kname, t in agg.most_common(30):
            print(f"   {t/5/1e3:7.3f} ms  x{cnt[kname]/5:.0f}  {kname}")
