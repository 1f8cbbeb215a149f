"""Resident memory of the EasyAnimate transformer: the library path against the node path inside real ComfyUI.

Writes random weights in the release layout once into a cache folder (real size: the PixArt-XL-2 2D transformer file,
2.44 GB fp32, and easyanimate_v1_mm.safetensors, 4.33 GB fp32; `--blocks N` keeps the layout at N of the 28 blocks for
a quicker run), then measures, each path in a fresh subprocess (RSS of that process minus its RSS after the imports):

    after load           resident after loading (safetensors tensors are file-backed: untouched pages cost nothing)
    peak during load     kernel high-water mark over the load (reset just before it)
    after 1 step         resident after one denoising step at 64x64 px x 4 frames (every weight read once)

    library  ea.load_transformer(2d, motion_module=mm) + forward
    nodes    EasyAnimateLoadDiT -> EasyAnimateLoadMotionModule -> EasyAnimateSampler (1 step), in-process ComfyUI
    nodes2d  EasyAnimateLoadDiT -> EasyAnimateSampler (2D only; compared with the 2D file's bytes)

and prints them with the ratios of docs/ARCHITECTURE.md ("Loading and memory"): node after 1 step / library after 1
step (goal <= 1.15), peak during load / resident after 1 step (goal <= 1.2), 2D-only MODEL / 2D bytes (goal <= 1.1).

    python bench/bench_memory.py --comfy /path/to/ComfyUI                  # real size (needs ~7 GB disk, ~8 GB RAM)
    python bench/bench_memory.py --comfy /path/to/ComfyUI --blocks 4       # quick
    python bench/bench_memory.py --comfy /path/to/ComfyUI-0.33 --dynamic-vram   # as main.py on NVIDIA (ops side)

Run it with the interpreter of the ComfyUI install (its venv).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
FILE_2D = "PixArt-XL-2-512x512.safetensors"
FILE_MM = "easyanimate_v1_mm.safetensors"
PATHS = ("library", "nodes", "nodes2d")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bench_config(blocks: int):
    sys.path.insert(0, str(REPO))
    from easyanimate_model.config import MotionModuleConfig, TransformerConfig
    return TransformerConfig(num_layers=blocks, motion_module=MotionModuleConfig())  # PixArt-XL-2-512x512 + v1 mm


def write_files(cache: Path, blocks: int):
    """The 2D file and the motion-module file in the release layout (keys, shapes, fp32), random, written once."""
    import torch
    from safetensors.torch import save_file
    from easyanimate_model.transformer import Transformer3DModel

    cache.mkdir(parents=True, exist_ok=True)
    need = [n for n in (FILE_2D, FILE_MM) if not (cache / n).is_file()]
    if not need:
        return
    meta = Transformer3DModel(bench_config(blocks), device="meta")
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for name in need:
        keys = [k for k in shapes if Transformer3DModel.is_motion_key(k) == (name == FILE_MM)]
        free = shutil.disk_usage(cache).free
        size = sum(torch.Size(shapes[k]).numel() * 4 for k in keys)
        if free < size * 1.1:
            raise SystemExit(f"{cache}: {size / GIB:.2f} GiB needed for {name}, {free / GIB:.2f} GiB free")
        tensors = {k: torch.randn(shapes[k], generator=generator) * 0.02 for k in keys}
        tmp = cache / (name + ".partial")
        save_file(tensors, str(tmp))
        tmp.rename(cache / name)
        del tensors
        print(f"wrote {cache / name} ({size / 1e9:.2f} GB)", file=sys.stderr)


def setup_comfy(comfy_dir: Path, cache: Path, dynamic_vram: bool, pack_dir: Path):
    """Real ComfyUI in this process (CPU), the pack imported as a package, the cache as its model folders."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, str(comfy_dir))
    import comfy.options
    comfy.options.enable_args_parsing()
    import folder_paths
    import comfy.model_management  # noqa: F401
    if dynamic_vram:  # what main.py does on NVIDIA; on CPU this switches comfy.ops into weightless layers
        import comfy.memory_management
        import comfy.model_patcher
        comfy.memory_management.aimdo_enabled = True
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    spec = importlib.util.spec_from_file_location("easyanimate_pack", pack_dir / "__init__.py",
                                                  submodule_search_locations=[str(pack_dir)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["easyanimate_pack"] = pack
    spec.loader.exec_module(pack)
    for folder in ("diffusion_models", "easyanimate"):
        folder_paths.add_model_folder_path(folder, str(cache), is_default=True)
    return pack.NODE_CLASS_MAPPINGS


def measure(path: str, cache: Path, blocks: int, comfy_dir: Path | None, dynamic_vram: bool, pack_dir: Path,
            weight_dtype: str = "fp32") -> dict:
    """One path's numbers (bytes above the RSS after imports), in this process."""
    import torch
    torch.manual_seed(0)
    config = bench_config(blocks)
    frames, size = 4, 8  # 64x64 px, 4 frames
    if path == "library":
        import easyanimate_model as ea
        base = rss()
        reset_peak()
        model = ea.load_transformer(cache / FILE_2D, motion_module=cache / FILE_MM)
        loaded, load_peak = rss() - base, peak() - base
        with torch.no_grad():
            model(torch.randn(1, 4, frames, size, size), torch.tensor([999]),
                  torch.randn(1, 120, config.caption_channels))
        return {"after_load": loaded, "peak_load": load_peak, "after_step": rss() - base}

    nodes = setup_comfy(comfy_dir, cache, dynamic_vram, pack_dir)
    import comfy.model_management
    base = rss()
    reset_peak()
    model = nodes["EasyAnimateLoadDiT"]().load(FILE_2D, weight_dtype)[0]
    if path == "nodes":
        model = nodes["EasyAnimateLoadMotionModule"]().apply(model, FILE_MM)[0]
    gc.collect()
    loaded, load_peak = rss() - base, peak() - base
    latent = nodes["EasyAnimateEmptyLatent"]().generate(64, 64, 1 if path == "nodes2d" else frames, 1)[0]
    cond = [[torch.randn(1, 120, config.caption_channels), {"attention_mask": torch.ones(1, 120)}]]
    with torch.no_grad():
        nodes["EasyAnimateSampler"]().sample(model, cond, cond, latent, 0, 1, 1.0, "Euler")
    gc.collect()
    out = {"after_load": loaded, "peak_load": load_peak, "after_step": rss() - base}
    inner = model.model.diffusion_model
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*inner.parameters(), *inner.buffers()]}
    out["model_bytes"] = sum(storages.values())
    comfy.model_management.unload_all_models()
    del model, inner
    gc.collect()
    out["after_unload"] = rss() - base
    return out


def file_bytes(cache: Path) -> dict:
    from easyanimate_model.files import read_safetensors_header
    out = {}
    for name in (FILE_2D, FILE_MM):
        total = 0
        for _, shape in read_safetensors_header(cache / name)[0].values():
            n = 4  # fp32
            for s in shape:
                n *= s
            total += n
        out[name] = total
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    host = Path(os.environ.get("COMFY_HOST_DIR", REPO / ".host"))
    parser.add_argument("--comfy", type=Path, default=host / "ComfyUI",
                        help="the ComfyUI folder (default $COMFY_HOST_DIR/ComfyUI)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "easyanimate_bench",
                        help="where the random release-layout files are written once")
    parser.add_argument("--blocks", type=int, default=28, help="transformer blocks (28 = real size)")
    parser.add_argument("--dynamic-vram", action="store_true", help="force DynamicVRAM like main.py on NVIDIA")
    parser.add_argument("--weight-dtype", default="fp32", help="weight_dtype of the loader node (the library path "
                        "stays fp32)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    parser.add_argument("--pack", type=Path, default=REPO, help="the pack to measure (default: this checkout; "
                        "another checkout gives a before/after comparison)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = args.cache / f"blocks{args.blocks}"
    sys.path.insert(0, str(REPO))
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, cache, args.blocks, args.comfy.resolve(), args.dynamic_vram,
                                                 args.pack.resolve(), args.weight_dtype)))
        return
    write_files(cache, args.blocks)
    sizes = file_bytes(cache)
    results = {}
    for path in args.paths.split(","):
        cmd = [sys.executable, __file__, "--child", path, "--cache", str(args.cache), "--blocks", str(args.blocks),
               "--comfy", str(args.comfy), "--pack", str(args.pack),
               "--weight-dtype", args.weight_dtype] + (["--dynamic-vram"] if args.dynamic_vram else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"{path}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
        results[path] = json.loads(line[len("RESULT "):])
    version = _comfy_version(args.comfy)
    forced = " + DynamicVRAM forced" if args.dynamic_vram else ""
    print(f"\npack {args.pack.resolve()}, ComfyUI {version}{forced}, {args.blocks} blocks, "
          f"nodes in {args.weight_dtype}: "
          f"2D file {sizes[FILE_2D] / GIB:.2f} GiB, motion module {sizes[FILE_MM] / GIB:.2f} GiB "
          f"(GiB above the process's RSS after imports)\n")
    print("| path | after load | peak during load | after 1 step at 64x64x4 | after unload_all_models |")
    print("|---|---|---|---|---|")
    for path, r in results.items():
        unload = f"{r['after_unload'] / GIB:.2f}" if "after_unload" in r else ""
        print(f"| {path} | {r['after_load'] / GIB:.2f} | {r['peak_load'] / GIB:.2f} | {r['after_step'] / GIB:.2f} "
              f"| {unload} |")
    print()
    lib, node, node2d = (results.get(p) for p in PATHS)
    if lib and node:
        print(f"nodes after 1 step / library after 1 step: {node['after_step'] / lib['after_step']:.3f} (goal <= 1.15)")
    for path in ("nodes", "nodes2d"):
        r = results.get(path)
        if r:
            print(f"{path}: peak during load / resident after 1 step: {r['peak_load'] / r['after_step']:.3f} "
                  f"(goal <= 1.2)")
    if node2d:
        print(f"nodes2d: MODEL tensor bytes / 2D file: {node2d['model_bytes'] / sizes[FILE_2D]:.3f}, resident after "
              f"1 step / 2D file: {node2d['after_step'] / sizes[FILE_2D]:.3f} (goal <= 1.1)")
    if args.json:
        print(json.dumps({"comfyui": version, "blocks": args.blocks, "dynamic_vram": args.dynamic_vram,
                          "files": sizes, "results": results}))


def _comfy_version(comfy_dir: Path) -> str:
    try:
        text = (comfy_dir / "comfyui_version.py").read_text()
        return text.split("__version__ = ")[1].split()[0].strip("\"'")
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    main()
