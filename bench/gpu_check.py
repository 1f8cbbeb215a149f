"""GPU check of the node path on a real ComfyUI server (issue "current ComfyUI": DynamicVRAM on NVIDIA).

Writes the real-size transformer (PixArt-XL-2: 28 blocks, 1152 wide; random fp32 weights in the release layout, no
download) and the motion module into a throw-away models folder, starts the given ComfyUI (its own main.py, so
DynamicVRAM is switched on exactly as for a user; `--disable-dynamic-vram` for the legacy patcher), and runs
EasyAnimateLoadDiT -> EasyAnimateLoadMotionModule -> EasyAnimateSampler (4 steps, cfg 6, Euler) at 512x512 for 16
and 80 frames with weight_dtype fp16, bf16 and fp8_e4m3fn. The T5 embeddings come from a test-only node written into
the server's custom_nodes (random [1, 120, 4096], like T5-XXL's), which also reports torch's CUDA peak.

Prints per case: load time (loader nodes, first run), s/step (second run, model already loaded), peak VRAM (device
total from nvidia-smi sampled every 100 ms, and torch's max_memory_allocated). Then the same with
--disable-dynamic-vram unless --mode says otherwise.

    python bench/gpu_check.py --comfy /path/to/ComfyUI-0.33.0                 # on the GPU machine, its python
    python bench/gpu_check.py --comfy /path/to/ComfyUI --tiny --cpu           # set-up check on CPU (2 blocks, 64 px)

The GPU machine has no network: unpack ComfyUI 0.33.0 and install the wheels it lacks (comfy-aimdo, comfy-kitchen,
av, SQLAlchemy, websocket-client for tests/comfy_client.py, ...) from a folder carried with the repository before
running this. The script links the tree and a wrapper of this interpreter as <tree>/../_gpu_check_host/ComfyUI
and .../venv/bin/python (the layout the test client expects). Checked on CPU with --tiny --cpu against 0.33.0; no
GPU run has been made yet.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

DIT_FILE = "PixArt-XL-2-512x512.safetensors"
MM_FILE = "easyanimate_v1_mm.safetensors"
PROBE_NODE = '''
import torch
import comfy.model_management


class EAGpuCheckCond:
    CATEGORY = "testing"
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"channels": ("INT", {"default": 4096, "min": 1, "max": 65536}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    def make(self, channels, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, 120, channels, generator=g), {"attention_mask": torch.ones(1, 120)}]],)


class EAGpuCheckProbe:
    CATEGORY = "testing"
    FUNCTION = "probe"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "reset": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    def probe(self, samples, reset):
        out = {"finite": bool(torch.isfinite(samples["samples"]).all())}
        if torch.cuda.is_available():
            out["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        return {"ui": {"probe": [out]}}


NODE_CLASS_MAPPINGS = {"EAGpuCheckCond": EAGpuCheckCond, "EAGpuCheckProbe": EAGpuCheckProbe}
'''


def write_models(models: Path, blocks: int):
    import torch
    from safetensors.torch import save_file
    from easyanimate_model.config import MotionModuleConfig, TransformerConfig
    from easyanimate_model.transformer import Transformer3DModel

    # the release width (single files are recognised by it); only the block count shrinks for a set-up check
    config = TransformerConfig(num_layers=blocks, motion_module=MotionModuleConfig())
    shapes = {k: tuple(v.shape) for k, v in Transformer3DModel(config, device="meta").state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for folder, name, motion in (("diffusion_models", DIT_FILE, False), ("easyanimate", MM_FILE, True)):
        (models / folder).mkdir(parents=True, exist_ok=True)
        save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()
                   if Transformer3DModel.is_motion_key(k) == motion}, str(models / folder / name))
    return config


def prompt(weight_dtype, frames, size, steps, seed, channels):
    return {
        "1": {"class_type": "EasyAnimateLoadDiT", "inputs": {"dit_name": DIT_FILE, "weight_dtype": weight_dtype}},
        "2": {"class_type": "EasyAnimateLoadMotionModule",
              "inputs": {"model": ["1", 0], "motion_module_name": MM_FILE}},
        "3": {"class_type": "EAGpuCheckCond", "inputs": {"channels": channels, "seed": 0}},
        "4": {"class_type": "EasyAnimateEmptyLatent", "inputs": {"width": size, "height": size, "frames": frames,
                                                                  "batch_size": 1}},
        "5": {"class_type": "EasyAnimateSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0],
                                                              "negative": ["3", 0], "latent": ["4", 0], "seed": seed,
                                                              "steps": steps, "cfg": 6.0, "sampler": "Euler"}},
        "6": {"class_type": "EAGpuCheckProbe", "inputs": {"samples": ["5", 0], "reset": seed}},
    }


class VramSampler:
    """Peak device memory in use (nvidia-smi, every 100 ms) while a block runs; None without nvidia-smi."""

    def __init__(self):
        self.peak, self._stop, self._thread = None, threading.Event(), None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                used = max(int(x) for x in out) / 1024 if out else None
                if used is not None:
                    self.peak = max(self.peak or 0, used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()


def node_times(result, stamps):
    """Seconds each node ran, from the arrival times of the 'executing' messages."""
    starts = [(stamps[i], (m.get("data") or {}).get("node")) for i, m in enumerate(result.messages)
              if m.get("type") == "executing"]
    return {node: starts[i + 1][0] - t for i, (t, node) in enumerate(starts[:-1]) if node is not None}


def run_case(server, weight_dtype, frames, size, steps, channels, seed):
    stamps = []
    results = []
    for run in range(2):  # first: loads (load time); second: model loaded (s/step)
        stamps.clear()
        with VramSampler() as vram:
            r = server.queue(prompt(weight_dtype, frames, size, steps, seed + run, channels), timeout=3600,
                             on_message=lambda m: stamps.append(time.monotonic()))
        if r.status_str != "success":
            return {"error": r.error_text[-2000:]}
        results.append((node_times(r, list(stamps)), vram.peak, r.outputs.get("6", {}).get("probe", [{}])[0]))
    (first, _, _), (second, vram_peak, probe) = results
    return {"load_s": first.get("1", 0) + first.get("2", 0), "s_per_step": second.get("5", float("nan")) / steps,
            "first_run_sampler_s": first.get("5"), "vram_peak_gib": vram_peak,
            "torch_peak_gib": probe.get("torch_peak_gib"), "finite": probe.get("finite")}


def main():
    from comfy_client import ComfyServer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy", type=Path, required=True, help="the ComfyUI folder (main.py)")
    parser.add_argument("--mode", choices=("both", "dynamic", "legacy"), default="both",
                        help="DynamicVRAM as main.py decides, --disable-dynamic-vram, or both (default)")
    parser.add_argument("--dtypes", default="fp16,bf16,fp8_e4m3fn")
    parser.add_argument("--frames", default="16,80")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="2 blocks, 64 px, 2 frames: a set-up check")
    parser.add_argument("--cpu", action="store_true", help="start the server with --cpu (set-up check)")
    parser.add_argument("--extra-args", default="", help="more main.py arguments, e.g. '--front-end-root DIR'")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.frames = 64, "2"
    base = Path(tempfile.mkdtemp(prefix="ea-gpu-check-"))
    results = []
    try:
        t = time.monotonic()
        config = write_models(base / "models", 2 if args.tiny else 28)
        print(f"wrote random release-layout weights in {time.monotonic() - t:.0f} s", flush=True)
        probe = base / "custom_nodes" / "ea_gpu_check_probe"
        probe.mkdir(parents=True)
        (probe / "__init__.py").write_text(PROBE_NODE)
        host = args.comfy.resolve().parent / "_gpu_check_host"
        host.mkdir(exist_ok=True)
        if not (host / "ComfyUI").exists():
            (host / "ComfyUI").symlink_to(args.comfy.resolve(), target_is_directory=True)
        python = host / "venv" / "bin" / "python"  # the layout the test client expects, for this interpreter
        python.parent.mkdir(parents=True, exist_ok=True)
        # a wrapper, not a symlink: a venv's python finds its packages through the path it is started by
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
        modes = {"both": ("dynamic", "legacy"), "dynamic": ("dynamic",), "legacy": ("legacy",)}[args.mode]
        for mode in modes:
            extra = args.extra_args.split() + (["--cpu"] if args.cpu else []) + (
                ["--disable-dynamic-vram"] if mode == "legacy" else [])
            server = ComfyServer(host, base, extra_args=extra, log_path=base / f"server-{mode}.log")
            server.start()
            try:
                log = server.log_text()
                dynamic = "DynamicVRAM support detected and enabled" in log
                for dtype in args.dtypes.split(","):
                    for frames in (int(f) for f in args.frames.split(",")):
                        r = run_case(server, dtype, frames, args.size, args.steps, config.caption_channels,
                                     seed=len(results) * 10)
                        r.update(mode=mode, dynamic_vram_on=dynamic, dtype=dtype, frames=frames)
                        results.append(r)
                        print(json.dumps({k: (v[-600:] if k == "error" else v) for k, v in r.items()}), flush=True)
                        server.free()
            finally:
                server.stop()
                shutil.copy(base / f"server-{mode}.log", Path(tempfile.gettempdir()) / f"ea-gpu-check-{mode}.log")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.size}x{args.size}, {args.steps} steps, cfg 6 (batch 2), Euler\n")
    print("| mode | DynamicVRAM on | weight dtype | frames | load s | s/step | peak VRAM GiB (nvidia-smi) | "
          "torch peak GiB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        def f(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else ""
        print(f"| {r['mode']} | {r['dynamic_vram_on']} | {r['dtype']} | {r['frames']} | {f('load_s')} | "
              f"{f('s_per_step', '{:.3f}')} | {f('vram_peak_gib')} | {f('torch_peak_gib')} | "
              f"{(r.get('error') or '').splitlines()[0][:80] if r.get('error') else ''} |")
    sys.exit(1 if any(r.get("error") or r.get("finite") is False for r in results) else 0)


if __name__ == "__main__":
    main()
