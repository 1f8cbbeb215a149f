"""Text-to-video through the real ComfyUI server with this pack, on tiny random-weight models.

Run by scripts/demo.sh (which first sets up the host). Writes tiny models in the exact release layout into a
throw-away ComfyUI base directory, starts ComfyUI 0.3.75 with the pack linked into custom_nodes/, queues the
text-to-video workflow over the HTTP API (POST /prompt), follows it over the websocket, downloads the video
through /view into <repo>/demo_output/ and stops the server. The video is noise (random weights): it shows that
the whole path works; real results need the release files listed at the end.
"""
import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_DIR), str(REPO_DIR / "tests")]

from comfy_client import RELEASE_FILES, ComfyServer, ServerError, host_dir, output_files, t2v_prompt  # noqa: E402


def print_progress(start):
    def on_message(msg):
        data = msg.get("data") or {}
        if msg["type"] == "executing" and data.get("node"):
            print(f"  [{time.monotonic() - start:5.1f}s] node {data['node']}", flush=True)
        elif msg["type"] == "progress":
            print(f"  [{time.monotonic() - start:5.1f}s]   step {data['value']}/{data['max']}", flush=True)
    return on_message


def release_table():
    rows = [("release file", "size", "put it in <ComfyUI>/")] + list(RELEASE_FILES)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="a red panda walking through a bamboo forest")
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "demo_output")
    args = parser.parse_args()
    seed = random.randint(0, 2**31 - 1) if args.seed is None else args.seed

    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="easyanimate-demo-"))
    server = ComfyServer(host_dir(), base, pack_dir=REPO_DIR, pack_folder_name=REPO_DIR.name)
    try:
        from easyanimate_model.tiny import write_release_files  # torch etc. load only here

        print(f"writing tiny random-weight models in the release layout to {server.models_dir}", flush=True)
        write_release_files(server.models_dir, vae="tiny")
        start = time.monotonic()
        server.start()
        print(f"ComfyUI 0.3.75 with the pack up at {server.url} after {time.monotonic() - start:.1f}s", flush=True)
        prompt = t2v_prompt(server.object_info(), text=args.prompt, seed=seed, steps=args.steps)
        print(f"queueing text-to-video: 64x64, 8 frames, {args.steps} steps, seed {seed}", flush=True)
        start = time.monotonic()
        result = server.queue(prompt, timeout=900, on_message=print_progress(start))
        if result.error or result.status_str != "success":
            raise ServerError(f"the workflow failed: {result.error_text or result.history.get('status')}\n"
                              + server.log_tail())
        videos = [f for f in output_files(result) if f[0].endswith(".mp4")]
        if not videos:
            raise ServerError(f"the workflow finished but reported no .mp4: {result.outputs}\n" + server.log_tail())
        filename, subfolder, kind = videos[0]
        # a new name per run: earlier demo videos stay
        video = args.out / f"easyanimate_demo_{time.strftime('%Y%m%d-%H%M%S')}_seed{seed}.mp4"
        video.write_bytes(server.view(filename, subfolder, kind))
        print(f"done in {time.monotonic() - start:.1f}s", flush=True)
    except Exception as e:  # one clear message with the server log, whatever failed
        print(f"\ndemo FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        if not isinstance(e, ServerError):  # e.g. a prompt the server refused: its log says why
            print(server.log_tail(), file=sys.stderr)
        print(f"(full server log: {args.out / 'server.log'})", file=sys.stderr)
        return 1
    finally:
        server.stop()
        server.save_log(args.out / "server.log")
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nvideo (tiny random-weight models, so it is noise): {video}")
    print(f"server log: {args.out / 'server.log'}")
    print("\nFor real videos put the EasyAnimate v1 release files into your ComfyUI models folder:")
    print(release_table())
    print("The node graphs to start from are in example_workflows/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
