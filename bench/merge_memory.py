"""Peak memory of merging N experts, relative to one expert's checkpoint size: parameter averaging
and the MoE export, side by side on the same checkpoints.

    python bench/merge_memory.py [--experts 8] [--hidden 768] [--layers 8]

Writes N random Llama-shaped fp32 checkpoints (about 250 MB each by default) registered in a forest,
then runs `merge.average.average_checkpoints` and `merge.moe.export_moe` (random router: the router
rows' forward passes hold one expert at a time, measured by the quality benchmark's run) each in a
child process that samples its anonymous resident memory (RssAnon: heap and tensors, not the page
cache of memory-mapped files) every 5 ms.
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
from elmforest.merge.moe import MoeSpec, export_moe
from elmforest.forest.manifest import Forest
base = anon(); peak = [base]; done = False
def watch():
    while not done:
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
t = threading.Thread(target=watch); t.start()
what, out, forest = sys.argv[1], Path(sys.argv[2]), Forest.load(sys.argv[3])
if what == "average":
    average_checkpoints(forest.expert_dirs(), out, max_shard_bytes=int(1e9))
else:
    export_moe(forest, out, MoeSpec(router="random"))
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
    from transformers import LlamaConfig

    from elmforest.forest.manifest import Forest

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
            d = Path(tmp) / "forest" / "experts" / f"e{j}"
            d.mkdir(parents=True)
            save_file(sd, str(d / "model.safetensors"))
            LlamaConfig(
                vocab_size=args.vocab,
                hidden_size=h,
                intermediate_size=inter,
                num_hidden_layers=args.layers,
                num_attention_heads=h // 64,
                tie_word_embeddings=True,
            ).to_json_file(str(d / "config.json"))
            dirs.append(d)
            del sd
        forest = Forest.init(Path(tmp) / "forest")
        forest.update(
            lambda data: data["experts"].extend(
                {"name": d.name, "domains": [d.name], "path": f"experts/{d.name}"} for d in dirs
            )
        )
        size = (dirs[0] / "model.safetensors").stat().st_size
        print(
            f"{args.experts} experts of {size / 1e6:.0f} MB each ({size * args.experts / 1e9:.2f} GB in all)"
        )
        for what in ("average", "moe"):
            res = subprocess.run(
                [sys.executable, "-c", CHILD, what, str(Path(tmp) / what), str(forest.root)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            extra = r["peak"] - r["baseline"]
            written = sum(p.stat().st_size for p in (Path(tmp) / what).glob("*.safetensors"))
            print(
                f"{what:8s} writes {written / 1e9:.2f} GB; peak extra anonymous memory {extra / 1e6:.0f} MB "
                f"= {extra / size:.2f}x one expert"
            )


if __name__ == "__main__":
    main()
