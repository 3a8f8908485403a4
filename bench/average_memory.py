"""Peak memory of averaging N experts, relative to one expert's checkpoint size.

    python bench/average_memory.py [--experts 8] [--hidden 768] [--layers 8]

Writes N random Llama-shaped fp32 checkpoints (about 250 MB each by default), then averages them
with `merge.average.average_checkpoints` in a child process that samples its anonymous resident
memory (RssAnon: heap and tensors, not the page cache of memory-mapped files) every 5 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
from elmforest.merge.average import average_checkpoints
base = anon(); peak = [base]; done = False
def watch():
    while not done:
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
t = threading.Thread(target=watch); t.start()
dirs = [Path(p) for p in sys.argv[2:]]
average_checkpoints(dirs, Path(sys.argv[1]), max_shard_bytes=int(1e9))
done = True; t.join(); peak[0] = max(peak[0], anon())
print(json.dumps({"baseline": base, "peak": peak[0]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    h, inter = args.hidden, int(args.hidden * 8 / 3)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for j in range(args.experts):
            g = torch.Generator().manual_seed(j)
            sd = {"model.embed_tokens.weight": torch.randn(args.vocab, h, generator=g)}
            for i in range(args.layers):
                for n, shape in [
                    ("self_attn.q_proj", (h, h)),
                    ("self_attn.k_proj", (h, h)),
                    ("self_attn.v_proj", (h, h)),
                    ("self_attn.o_proj", (h, h)),
                    ("mlp.gate_proj", (inter, h)),
                    ("mlp.up_proj", (inter, h)),
                    ("mlp.down_proj", (h, inter)),
                ]:
                    sd[f"model.layers.{i}.{n}.weight"] = torch.randn(*shape, generator=g)
            d = Path(tmp) / f"e{j}"
            d.mkdir()
            save_file(sd, str(d / "model.safetensors"))
            (d / "config.json").write_text("{}")
            dirs.append(d)
            del sd
        size = (dirs[0] / "model.safetensors").stat().st_size
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(Path(tmp) / "avg"), *map(str, dirs)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        extra = r["peak"] - r["baseline"]
        print(
            f"{args.experts} experts of {size / 1e6:.0f} MB each ({size * args.experts / 1e9:.2f} GB in all)"
        )
        print(
            f"peak extra anonymous memory while averaging: {extra / 1e6:.0f} MB = {extra / size:.2f}x one expert"
        )


if __name__ == "__main__":
    main()
