"""How fast and how cheaply oversized requests are refused: a real ComfyUI server (test host) with the pack and tiny
models, under an address-space cap (`ulimit -v`, default 10 GiB). For each request it prints the seconds from
queueing to the error, the server's RSS growth, and the first line a user sees; then a normal run must still work.

    .host/venv/bin/python bench/bench_refusals.py [--cap-gib 10]
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import psutil  # noqa: E402

from comfy_client import ComfyServer, PromptRejected, host_dir  # noqa: E402
from test_guards import with_decode  # noqa: E402
from test_nodes_pipeline import graph  # noqa: E402

GiB = 1024 ** 3


def requests():
    latent = with_decode(graph(width=4096, height=4096, frames=4096), "4")
    del latent["5"], latent["6"]
    decode = with_decode(graph(width=1024, height=1024, frames=4096), "4")
    del decode["5"], decode["6"]
    ksampler = graph(width=1024, height=1024, frames=4096)
    ksampler["5"] = {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0], "seed": 1,
        "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    return {
        "empty latent 16384x16384": graph(width=16384, height=16384),
        "empty latent width 0": graph(width=0),
        "empty latent width -32": graph(width=-32),
        "empty latent width 'abc'": graph(width="abc"),
        "empty latent width 500": graph(width=500),
        "sampler cfg NaN": graph(cfg=float("nan")),
        "empty latent 4096x4096x4096": latent,
        "EasyAnimateSampler 1024x1024x4096": graph(width=1024, height=1024, frames=4096),
        "core KSampler 1024x1024x4096": ksampler,
        "VAE decode 1024x1024x4096": decode,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-gib", type=float, default=10)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ea-bench-refusals-"))
    server = ComfyServer(host_dir(), base, pack_dir=REPO, pack_folder_name="easyanimate-bench",
                         address_space_limit=int(args.cap_gib * GiB))
    try:
        from easyanimate_model.tiny import write_release_files

        write_release_files(server.models_dir, vae="tiny")
        server.start()
        process = psutil.Process(server._proc.pid)
        print(f"server under a {args.cap_gib:g} GiB address-space cap, RSS {process.memory_info().rss / GiB:.2f} GiB")
        print(f"{'request':36} {'refused':>9} {'s':>6} {'RSS +GiB':>9}  what the user sees")
        for name, prompt in requests().items():
            before, start = process.memory_info().rss, time.monotonic()
            try:
                result = server.queue(prompt, timeout=300)
                where = "at run"
                text = (result.error["exception_message"] if result.error
                        else f"NOT REFUSED ({result.status_str})")
            except PromptRejected as e:
                where = "at queue"
                errors = [err for node in e.body.get("node_errors", {}).values() for err in node["errors"]]
                text = "; ".join(dict.fromkeys(f"{err['message']}: {err['details']}" for err in errors))
            seconds = time.monotonic() - start
            growth = (process.memory_info().rss - before) / GiB
            print(f"{name:36} {where:>9} {seconds:6.2f} {growth:9.2f}  {text.splitlines()[0][:200]}", flush=True)
        ok = server.queue(graph(width=64, height=64, frames=4, steps=1), timeout=300)
        print(f"a normal run afterwards: {ok.status_str}; server RSS {process.memory_info().rss / GiB:.2f} GiB")
        return 0 if ok.status_str == "success" else 1
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
