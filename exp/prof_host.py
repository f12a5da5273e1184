import sys, collections
import torch
import decoquant as dq
from decoquant.bench.e2e_decode import random_model, decoquant_config
dev = torch.device("cuda")
model = random_model(32, dev)
ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
ids = torch.randint(0, 32000, (1, ctx), device=dev)
from torch.profiler import profile, ProfilerActivity
with torch.no_grad():
    for preset in ["paper", "channel64-token"]:
        mk = lambda: dq.DecoQuantCache(decoquant_config(f"decoquant:{preset}", 4), model.config, fused=True)
        for _ in range(2):
            model(input_ids=ids, past_key_values=mk(), logits_to_keep=1)
        torch.cuda.synchronize()
        cache = mk()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
        print(f"## {preset}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
