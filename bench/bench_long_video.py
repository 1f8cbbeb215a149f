"""Long videos with context windows: peak activation memory and time at 80, 160 and 240 frames, windows of 80.

Runs the real node path in-process on the ComfyUI test host (scripts/setup_host.sh): tiny release-layout models
(easyanimate_model.tiny), EasyAnimateLoadPipeline + motion module, EasyAnimateContextOptions (core context windows),
EasyAnimateSampler (DPM++, CFG), then EasyAnimateVAEDecode and EasyAnimateSaveVideo (mp4) on the frames. A small
spatial size keeps it on the CPU. Each (frames, windows on/off) runs in a fresh subprocess after a warm-up; memory
is the peak RSS during sampling (kernel high-water mark reset just before) minus the RSS before it: activations and
workspace on top of weights and inputs. Prints ratios against the 80-frame run (flat memory within 15 % and about
linear time are the goals of docs/ARCHITECTURE.md "Long videos").

    .host/venv/bin/python bench/bench_long_video.py             # 128x128 px, 2 steps
    .host/venv/bin/python bench/bench_long_video.py --size 64   # quicker
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"Vm{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Vm{field} in /proc/self/status")


def measure(fn):
    """(result, seconds, peak KiB above the RSS at the start)."""
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    before = rss_kib("RSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, rss_kib("HWM") - before


def load_pack(comfy_dir):
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.options
    comfy.options.enable_args_parsing(False)
    spec = importlib.util.spec_from_file_location("easyanimate_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["easyanimate_pack"] = pack
    spec.loader.exec_module(pack)
    return pack.NODE_CLASS_MAPPINGS


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    nodes = load_pack(Path(args.comfy))
    import folder_paths
    sys.path.insert(0, str(REPO))
    from easyanimate_model.tiny import write_release_files

    base = Path(tempfile.mkdtemp(prefix="ea-bench-long-"))
    write_release_files(base / "models", vae="tiny")
    folder_paths.add_model_folder_path("diffusers", str(base / "models" / "diffusers"), is_default=True)
    folder_paths.add_model_folder_path("easyanimate", str(base / "models" / "easyanimate"), is_default=True)
    folder_paths.set_output_directory(str(base / "output"))
    model, clip, vae = nodes["EasyAnimateLoadPipeline"]().load("PixArt-XL-2-512x512", "default", "default")
    (model,) = nodes["EasyAnimateLoadMotionModule"]().apply(model, "easyanimate_v1_mm.safetensors")
    if args.windows:
        (model,) = nodes["EasyAnimateContextOptions"]().apply(model, 80, args.overlap, "standard_static",
                                                              "pyramid", True, 1, False)
    positive, negative = nodes["EasyAnimateTextEncode"]().encode(clip, "a snowy forest", "blurry")
    sampler, decoder = nodes["EasyAnimateSampler"](), nodes["EasyAnimateVAEDecode"]()

    def run(frames):
        (latent,) = nodes["EasyAnimateEmptyLatent"]().generate(args.size, args.size, frames, 1)
        return sampler.sample(model, positive, negative, latent, 1, args.steps, 6.0, "DPM++")[0]

    with torch.inference_mode():
        run(8)  # warm-up: lazy allocations, thread pools, model load
        latent, seconds, peak = measure(lambda: run(args.frames[0]))
        (images,), decode_s, decode_peak = measure(lambda: decoder.decode(vae, latent, 8, False))
        save = nodes["EasyAnimateSaveVideo"]()
        _, save_s, save_peak = measure(lambda: save.save(images, "bench/long", 12, "mp4", 85, False))
    files = list((base / "output" / "bench").glob("long_*.mp4"))
    print(json.dumps({"frames": args.frames[0], "windows": args.windows, "sample_s": seconds, "sample_peak_kib": peak,
                      "decode_s": decode_s, "decode_peak_kib": decode_peak, "save_s": save_s,
                      "save_peak_kib": save_peak, "images": list(images.shape), "mp4_bytes":
                      files[0].stat().st_size if files else 0}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[80, 160, 240])
    parser.add_argument("--size", type=int, default=128, help="width = height in pixels (multiple of 32)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the runs without windows")
    parser.add_argument("--comfy", default=str(Path(os.environ.get("HOST_DIR", REPO / ".host")) / "ComfyUI"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--windows", action="store_true", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.child:
        return child(args)

    rows = []
    for windows in ([True] if args.no_baseline else [True, False]):
        for frames in args.frames:
            cmd = [sys.executable, __file__, "--child", "--frames", str(frames), "--size", str(args.size),
                   "--steps", str(args.steps), "--overlap", str(args.overlap), "--threads", str(args.threads),
                   "--comfy", args.comfy] + (["--windows"] if windows else [])
            # fixed mmap threshold: big tensors come from mmap and go back to the OS when freed, so the RSS high-water
            # mark follows live tensor memory instead of heap fragmentation (glibc's default threshold floats)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=args.comfy, env=env)
            if out.returncode:
                sys.exit(f"child failed ({frames} frames, windows={windows}):\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done: {frames} frames, windows {windows}", file=sys.stderr)

    print(f"\n{args.size}x{args.size} px, tiny model, DPM++ {args.steps} steps, CFG, windows of 80 (overlap "
          f"{args.overlap}), {args.threads} threads\n")
    print("| frames | windows | sampling peak MiB | x 80-frame | sampling s | x 80-frame | s/frame | decode peak MiB "
          "| decoded frames MiB | decode s | save mp4 s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for windows in (True, False):
        ref = next((r for r in rows if r["windows"] == windows and r["frames"] == args.frames[0]), None)
        for r in (r for r in rows if r["windows"] == windows):
            print(f"| {r['frames']} | {'80/' + str(args.overlap) if windows else 'none'} | "
                  f"{r['sample_peak_kib'] / 1024:.1f} | {r['sample_peak_kib'] / ref['sample_peak_kib']:.2f} | "
                  f"{r['sample_s']:.1f} | {r['sample_s'] / ref['sample_s']:.2f} | {r['sample_s'] / r['frames']:.3f} | "
                  f"{r['decode_peak_kib'] / 1024:.1f} | {4 * math.prod(r['images']) / 2**20:.1f} | "
                  f"{r['decode_s']:.1f} | {r['save_s']:.1f} |")
    print("\nDecode peak includes the decoded frames themselves (float32, they grow with the video); the rest is one "
          "chunk's working memory.")


if __name__ == "__main__":
    main()
