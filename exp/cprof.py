import cProfile, pstats, time
import torch
from decoquant.bench.e2e_decode import decoquant_config
from decoquant.cache import CompressedKVStore
dev = torch.device("cuda")
k = torch.randn(1, 32, 4096, 128, device=dev, dtype=torch.float16)
for preset in ["paper", "channel64-token"]:
    cfg = decoquant_config(f"decoquant:{preset}", 4)
    for _ in range(5):
        CompressedKVStore(cfg, fused=True).append(k, k)
    torch.cuda.synchronize()
    # host time without waiting: a GPU busy-wait would hide it; just time 50 appends
    t0 = time.perf_counter()
    for _ in range(50):
        CompressedKVStore(cfg, fused=True).append(k, k)
    torch.cuda.synchronize()
    print(f"## {preset}: {(time.perf_counter()-t0)/50*1e3:.3f} ms per append")
    pr = cProfile.Profile(); pr.enable()
    for _ in range(50):
        CompressedKVStore(cfg, fused=True).append(k, k)
    torch.cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats("decoquant|triton/runtime/jit|driver.py", 40)
