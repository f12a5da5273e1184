"""host_cost's Python-only mode on CPU tensors: every kernel a fused decode call launches is replaced by a no-op
(a kernel left out would try a real launch and fail here), each layout gets its rows, and the kernels are back
afterwards."""

import json

import decoquant.kernels.triton.decode_attention as blocks
import decoquant.kernels.triton.merge as merge
from decoquant.bench.host_cost import main, no_launches


def test_python_only_times_every_layout_with_no_launch(capsys):
    before = blocks._decode_blocks_kernel, merge._merge_kernel, merge._window_kernel
    assert main(["--python-only", "--kv-heads", "1,4,32", "--head-dim", "64", "--context", "256", "--calls", "3",
                 "--window", "70"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["kv_heads"], r["kernel"], r["launches"]) for r in rows] == [
        (1, "mma+window", 2), (1, "mma", 3), (4, "mma+window", 2), (4, "mma", 3), (32, "rows", 3)]
    assert all(r["python_us"] > 0 and "host_us" not in r for r in rows)
    assert (blocks._decode_blocks_kernel, merge._merge_kernel, merge._window_kernel) == before


def test_no_launches_restores_the_kernels_after_an_error():
    before = blocks._decode_blocks_kernel
    try:
        with no_launches():
            assert blocks._decode_blocks_kernel is not before
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert blocks._decode_blocks_kernel is before
