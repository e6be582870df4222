"""Peak memory of loading a checkpoint on the CPU: the process's peak resident set against the weights' size.

Writes a random LLaVA-1.5 checkpoint in the original layout at one of the speed benchmarks' shapes (`7b`:
LLaVA-1.5-7B's real widths, 7.06 B parameters, 14.1 GB in fp16) in LLaVA's own file formats (fp16
`pytorch_model-*.bin` shards, as liuhaotian/llava-v1.5-7b ships, or safetensors shards), then loads it with
`load_pretrained_model` into bf16 in a fresh process per format and reads that process's peak resident set.
The ratio peak / weights is what to read: 1.0 would be the weights alone.

    python -m llava.bench.load_memory [--shape 7b] [--formats bin,safetensors] [--dir DIR] [--keep]

The checkpoint (14 GB at 7b) is written to DIR (default: a temporary folder) and deleted afterwards unless
--keep. Nothing is downloaded. Peak RSS counts the pages of memory-mapped weight files the load touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from llava.bench.workload import SHAPES
from llava.model import tiny
from llava.model.random_llava import VOCAB_SIZE, ModelShape, original_llm_shapes

SHARD_BYTES = 10 * 2**30  # LLaVA's .bin shards hold up to ~10 GB
GIB = 2**30
FORMATS = ("bin", "safetensors")
TEMPLATE_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
LOAD_AND_REPORT = """
import resource, sys
from llava.model.builder import load_pretrained_model
load_pretrained_model(sys.argv[1], device="cpu", torch_dtype="bf16")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def write_checkpoint(out: Path, shape: ModelShape, weights_format: str) -> int:
    """A random original-layout LLaVA-1.5 checkpoint at `shape` in `out`; returns its parameter count."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    template = Path(tiny.write_tiny_checkpoint(out.parent / "template", layout="original"))
    out.mkdir(parents=True)
    for name in TEMPLATE_FILES:
        shutil.copy(template / name, out / name)
    (out / "config.json").write_text(json.dumps(tiny.llava_config(VOCAB_SIZE, shape), indent=2))
    gen = torch.Generator().manual_seed(0)
    count = write_shards(out, original_llm_shapes(shape, VOCAB_SIZE), weights_format, gen)
    tower_dir = out / tiny.VISION_TOWER_DIRNAME
    tower_dir.mkdir()
    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(**shape.clip_vision_settings()))
    tower.config.save_pretrained(tower_dir)
    shutil.copy(template / tiny.VISION_TOWER_DIRNAME / "preprocessor_config.json", tower_dir)
    tower_shapes = {vision_model_name(name): tuple(param.shape) for name, param in tower.named_parameters()}
    count += write_shards(tower_dir, tower_shapes, "safetensors", gen, single="model.safetensors")
    return count


def vision_model_name(name: str) -> str:
    """openai/clip-vit-large-patch14-336's tensor names: everything under `vision_model.`."""
    return name if name.startswith("vision_model.") else "vision_model." + name


def write_shards(folder: Path, shapes: dict[str, tuple[int, ...]], weights_format: str, gen: torch.Generator,
                 single: str | None = None) -> int:
    """Random fp16 tensors in shards of at most SHARD_BYTES (one file named `single` when given), each shard
    written as soon as it is full so that at most one is in memory, then the index LLaVA's loaders read."""
    stem, suffix = ("pytorch_model", ".bin") if weights_format == "bin" else ("model", ".safetensors")
    written: list[tuple[Path, list[str]]] = []

    def flush(shard: dict[str, torch.Tensor]) -> None:
        path = folder / (single or f"{stem}-{len(written) + 1:05d}{suffix}")
        torch.save(shard, path) if weights_format == "bin" else save_file(shard, str(path), {"format": "pt"})
        written.append((path, list(shard)))

    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, dims in shapes.items():
        tensor = (torch.randn(dims, generator=gen) * 0.02).to(torch.float16)
        if shard and size + tensor.nbytes > SHARD_BYTES and single is None:
            flush(shard)
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    flush(shard)
    if single is None:
        weight_map = {}
        for number, (path, names) in enumerate(written, start=1):
            named = path.with_name(f"{stem}-{number:05d}-of-{len(written):05d}{suffix}")
            path.rename(named)
            weight_map.update({name: named.name for name in names})
        index_name = f"{stem}{suffix}.index.json"
        (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return sum(torch.Size(dims).numel() for dims in shapes.values())


def peak_rss(checkpoint: Path) -> int:
    """The peak resident set of a fresh process that loads `checkpoint` into bf16 on the CPU."""
    done = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(checkpoint)], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args(argv)
    formats = [name for name in args.formats.split(",") if name]
    if not formats or any(name not in FORMATS for name in formats):
        parser.error(f"--formats takes {', '.join(FORMATS)}, got {args.formats}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="load-memory-"))
    rows = []
    try:
        for weights_format in formats:
            checkpoint = root / f"llava-{args.shape}-{weights_format}"
            params = write_checkpoint(checkpoint, SHAPES[args.shape], weights_format)
            peak = peak_rss(checkpoint)
            weights = 2 * params  # bf16
            rows.append({"format": weights_format, "parameters": params, "weights_bytes": weights,
                         "peak_rss_bytes": peak, "ratio": peak / weights})
            print(f"{weights_format}: {params / 1e9:.2f} B parameters, bf16 weights {weights / GIB:.2f} GiB, "
                  f"peak RSS {peak / GIB:.2f} GiB ({peak / weights:.2f}x)", flush=True)
            if not args.keep:
                shutil.rmtree(checkpoint)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
