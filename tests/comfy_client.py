"""Start a real ComfyUI server with this pack loaded, and talk to it over HTTP + websocket.

Shared by the pytest fixture `comfy` (tests/conftest.py) and scripts/demo.py. Needs only the standard
library and websocket-client, so it runs in the host venv without importing ComfyUI or pytest.

    server = ComfyServer(host_dir, base_dir, pack_dir, pack_folder_name="easyanimate-pack-under-test")
    server.start()                  # raises ServerError with the log tail if it does not come up
    result = server.queue(prompt)   # API-format prompt; waits for the run over the websocket
    server.stop()
"""
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
# the real release files and where a ComfyUI install expects them (docs/ARCHITECTURE.md; sizes: README.md)
RELEASE_FILES = (
    ("PixArt-XL-2-512x512/ (diffusers folder, from PixArt-XL-2-512x512.tar)", "11.4 GB", "models/diffusers/"),
    ("easyanimate_v1_mm.safetensors (motion module)", "4.1 GB", "models/easyanimate/"),
    ("easyanimate_portrait.safetensors (optional base checkpoint)", "2.3 GB", "models/easyanimate/"),
    ("easyanimate_portrait_lora.safetensors (optional LoRA)", "654 MB", "models/loras/"),
)
TERMINAL_WS_TYPES = ("execution_success", "execution_error", "execution_interrupted")
T2V_NODES = ("EasyAnimateLoadPipeline", "EasyAnimateLoadMotionModule", "EasyAnimateTextEncode",
             "EasyAnimateEmptyLatent", "EasyAnimateSampler", "EasyAnimateVAEDecode", "EasyAnimateSaveVideo")


# the test-only custom node that switches DynamicVRAM on as main.py does on NVIDIA (tests/host/force_dynamic_vram/)
FORCE_DYNAMIC_VRAM_NODES = REPO_DIR / "tests" / "host" / "force_dynamic_vram"
FORCE_DYNAMIC_VRAM_MARK = "ea_force_dynamic_vram: DynamicVRAM forced on"


def artifacts_dir():
    """Where server logs, screenshots and junit.xml go: $TEST_ARTIFACTS_DIR (set per tier by .ci/run)."""
    return Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO_DIR / "test_artifacts").resolve()


def host_dir():
    """The test host made by scripts/setup_host.sh: $COMFY_HOST_DIR, default <repo>/.host."""
    return Path(os.environ.get("COMFY_HOST_DIR") or REPO_DIR / ".host").resolve()


def host_python(host=None):
    """The host's interpreter: $COMFY_PYTHON, else <host>/venv/bin/python."""
    if os.environ.get("COMFY_PYTHON"):
        return Path(os.environ["COMFY_PYTHON"])
    return (Path(host) if host else host_dir()) / "venv" / "bin" / "python"


def host_comfy_dir(host=None):
    """The ComfyUI tree the server runs: $COMFY_UI_DIR, else <host>/ComfyUI."""
    if os.environ.get("COMFY_UI_DIR"):
        return Path(os.environ["COMFY_UI_DIR"]).resolve()
    return (Path(host) if host else host_dir()) / "ComfyUI"


def env_server_args():
    """Extra main.py arguments from $COMFY_SERVER_ARGS (shell words, e.g. `--front-end-root /x/static`)."""
    return shlex.split(os.environ.get("COMFY_SERVER_ARGS", ""))


def env_force_dynamic_vram():
    return os.environ.get("COMFY_FORCE_DYNAMIC_VRAM", "") not in ("", "0")


def stats_version(stats):
    """ComfyUI's version from a /system_stats answer ("0.0.0" when it has none)."""
    return str((stats.get("system") or {}).get("comfyui_version") or "0.0.0")


class ServerError(RuntimeError):
    """The server did not start, died, or our pack failed to import; the message holds the log tail."""


class PromptRejected(AssertionError):
    """POST /prompt answered with an error (validation): `.status` and `.body` hold the answer."""

    def __init__(self, status, body):
        super().__init__(f"POST /prompt -> HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


@dataclass
class QueueResult:
    prompt_id: str
    messages: list             # websocket JSON messages of this run (binary previews left out)
    history: dict              # GET /history/<id> entry
    status_str: str            # "success" or "error" (an interrupt is "error" too)
    outputs: dict = field(default_factory=dict)   # node id -> ui output (images, videos, text...)
    error: dict = None         # the execution_error message data, or None
    previews: list = field(default_factory=list)  # binary websocket frames (latent previews), raw bytes

    @property
    def message_types(self):
        return [m.get("type") for m in self.messages]

    @property
    def error_text(self):
        """The execution error as one readable string (node, exception, traceback), or ""."""
        e = self.error
        if not e:
            return ""
        return (f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: "
                f"{e.get('exception_message')}\n" + "".join(e.get("traceback") or []))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A real ComfyUI (host_comfy_dir(host), run by host_python(host)) on a free loopback port.

    base_dir is a throw-away --base-directory (models/, output/, temp/, input/, user/ live there); the pack
    at pack_dir is symlinked as base_dir/custom_nodes/<pack_folder_name>. extra_args go to main.py (default:
    $COMFY_SERVER_ARGS); force_dynamic_vram (default: $COMFY_FORCE_DYNAMIC_VRAM) loads the test-only node of
    tests/host/force_dynamic_vram/ before the pack. After start(), `version` is the server's ComfyUI version.
    """

    def __init__(self, host, base_dir, pack_dir=REPO_DIR, pack_folder_name="easyanimate-pack-under-test",
                 extra_args=None, log_path=None, force_dynamic_vram=None, address_space_limit=None,
                 extra_custom_nodes=()):
        self.host = Path(host)
        self.base_dir = Path(base_dir)
        self.pack_dir = Path(pack_dir).resolve()
        self.pack_folder_name = pack_folder_name
        self.extra_args = env_server_args() if extra_args is None else list(extra_args)
        self.force_dynamic_vram = env_force_dynamic_vram() if force_dynamic_vram is None else force_dynamic_vram
        self.comfy_dir = host_comfy_dir(self.host)
        self.version = None
        self.address_space_limit = address_space_limit  # bytes: `ulimit -v` for the server process
        self.extra_custom_nodes = [Path(p) for p in extra_custom_nodes]  # more custom_nodes folders (test nodes)
        self.models_dir = self.base_dir / "models"
        self.output_dir = self.base_dir / "output"
        self.temp_dir = self.base_dir / "temp"
        self.log_path = Path(log_path) if log_path else self.base_dir / "server.log"
        self.port = None
        self.url = None
        self._proc = None
        self._log_file = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout=240):
        python, comfy_dir = host_python(self.host), self.comfy_dir
        if not python.exists() or not (comfy_dir / "main.py").exists():
            raise ServerError(f"no test host: {python} or {comfy_dir}/main.py missing: run "
                              f"`bash scripts/setup_host.sh {self.host}` first (or set COMFY_PYTHON / COMFY_UI_DIR)")
        # 0.3.75 crashes in prestartup when <base>/custom_nodes is missing
        (self.base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / self.pack_folder_name
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:",
               # latent previews as in a UI setup (core default: none); extra_args can override it
               "--preview-method", "latent2rgb"]
        entries = [f"ea_extra_{i}:\n  custom_nodes: {json.dumps(str(folder))}\n"
                   for i, folder in enumerate(self.extra_custom_nodes)]
        if self.force_dynamic_vram:
            # is_default puts this folder first in custom_nodes, so the switch is set before the pack imports
            entries.append(f"ea_force_dynamic_vram:\n  is_default: true\n"
                           f"  custom_nodes: {json.dumps(str(FORCE_DYNAMIC_VRAM_NODES))}\n")
        if entries:
            extra = self.base_dir / "extra_custom_nodes.yaml"
            extra.write_text("".join(entries))
            cmd += ["--extra-model-paths-config", str(extra)]
        cmd += self.extra_args
        # models are local files only: never reach for a hub
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        limit = self.address_space_limit
        self._proc = subprocess.Popen(cmd, cwd=comfy_dir, env=env, stdout=self._log_file,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
                                      if limit else None)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                self.stop()
                raise ServerError(f"ComfyUI exited with code {self._proc.returncode} during start\n"
                                  + self.log_tail())
            try:
                stats = self.get_json("/system_stats", timeout=2)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"ComfyUI did not answer on {self.url} within {timeout} s\n" + self.log_tail())
                time.sleep(0.25)
        self.version = tuple(int(x) for x in re.findall(r"\d+", stats_version(stats))[:3])
        if self.force_dynamic_vram and FORCE_DYNAMIC_VRAM_MARK not in self.log_text():
            self.stop()
            raise ServerError(f"DynamicVRAM was to be forced on, but the log lacks {FORCE_DYNAMIC_VRAM_MARK!r}\n"
                              + self.log_tail())
        failed = self.import_failures()
        if failed:
            self.stop()
            raise ServerError(f"the pack failed to import in ComfyUI ({self.pack_folder_name}):\n"
                              + "\n".join(failed) + f"\n(server log: {self.log_path})")
        return self

    def stop(self):
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- log ------------------------------------------------------------------------------------
    def log_text(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines=40):
        return "---- server log tail ({}) ----\n{}".format(
            self.log_path, "\n".join(self.log_text().splitlines()[-lines:]))

    def import_failures(self):
        """Log lines that say our pack did not import: the traceback before 'Cannot import', the times line."""
        lines = self.log_text().splitlines()
        name = self.pack_folder_name
        found = []
        for i, line in enumerate(lines):
            if "Cannot import" in line and name in line:
                tb = [j for j in range(max(0, i - 200), i) if lines[j].startswith("Traceback")]
                found.extend(lines[tb[-1] if tb else i:i + 1])
            elif "IMPORT FAILED" in line and name in line:
                found.append(line)
        return found

    def save_log(self, dest):
        """Copy the server log to the file `dest` (kept after the throw-away base dir is gone)."""
        if self.log_path.exists():
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, dest)

    # ---- HTTP -----------------------------------------------------------------------------------
    def _request(self, path, data=None, timeout=60):
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path, timeout=60):
        status, raw = self._request(path, timeout=timeout)
        if status != 200:
            raise ValueError(f"GET {path} -> HTTP {status}: {raw[:500]!r}")
        return json.loads(raw)

    def post_json(self, path, obj, timeout=60):
        """POST JSON; returns (HTTP status, parsed body or {} when the body is empty or not JSON)."""
        status, raw = self._request(path, json.dumps(obj).encode(), timeout=timeout)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"text": raw.decode(errors="replace")}
        return status, body

    def object_info(self, node_class=None):
        info = self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))
        return info[node_class] if node_class else info

    def interrupt(self):
        return self.post_json("/interrupt", {})[0]

    def free(self):
        """Unload models and clear the execution cache (identical prompts are otherwise not re-run)."""
        return self.post_json("/free", {"unload_models": True, "free_memory": True})[0]

    def view(self, filename, subfolder="", type="output"):
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, raw = self._request("/view?" + query)
        if status != 200:
            raise ValueError(f"GET /view?{query} -> HTTP {status}")
        return raw

    def queue(self, prompt, timeout=300, on_message=None):
        """Queue an API-format prompt and wait until it finished, failed or was interrupted.

        Raises PromptRejected when POST /prompt refuses it (validation), TimeoutError after `timeout` s.
        on_message(msg) is called for every websocket JSON message of the run (e.g. to interrupt).
        """
        import websocket  # websocket-client; imported here so the server part needs only the stdlib

        client_id = uuid.uuid4().hex
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        deadline = time.monotonic() + timeout
        ws = websocket.create_connection(ws_url, timeout=timeout)
        messages, previews = [], []
        try:
            status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
            if status != 200:
                raise PromptRejected(status, body)
            prompt_id = body["prompt_id"]
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s; last ws messages: "
                                       f"{[m.get('type') for m in messages[-5:]]}\n{self.log_tail()}")
                ws.settimeout(left)
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if isinstance(raw, bytes):  # binary frames are latent previews
                    previews.append(raw)
                    continue
                msg = json.loads(raw)
                data = msg.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append(msg)
                if on_message:
                    on_message(msg)
                if msg.get("type") in TERMINAL_WS_TYPES:
                    break
                if msg.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
        finally:
            ws.close()
        history = {}
        for _ in range(100):  # the history entry is written just after the last ws message
            history = self.get_json(f"/history/{prompt_id}").get(prompt_id) or {}
            if history.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.1)
        errors = [m["data"] for m in messages if m.get("type") == "execution_error"]
        return QueueResult(prompt_id=prompt_id, messages=messages, history=history,
                           status_str=history.get("status", {}).get("status_str", ""),
                           outputs=history.get("outputs", {}), error=errors[0] if errors else None,
                           previews=previews)


def pick_option(options, preferred=()):
    """First of `preferred` found among a combo's options (substring match), else the first option."""
    for want in preferred:
        for opt in options:
            if want in str(opt):
                return opt
    if not options:
        raise ValueError("combo input has no options (is the model file missing from models/?)")
    return options[0]


def widget_defaults(info, overrides):
    """Input values for one node from its /object_info entry: overrides, else the default, else the first
    combo option. Link inputs (types like MODEL) are left for the caller."""
    values = {}
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if name in overrides:
                values[name] = overrides[name]
            elif isinstance(kind, list) or kind == "COMBO":
                options = kind if isinstance(kind, list) else opts.get("options", [])
                values[name] = opts.get("default", options[0] if options else None)
            elif "default" in opts:
                values[name] = opts["default"]
    return values


def combo_options(object_info, class_type, input_name):
    """The option list of a combo input (both the [options] and the ("COMBO", {"options"}) forms)."""
    spec = object_info[class_type]["input"]["required"][input_name]
    return spec[0] if isinstance(spec[0], list) else (spec[1] or {}).get("options", [])


def t2v_prompt(object_info, text="a red panda walking through a bamboo forest", seed=0, width=64, height=64,
               frames=8, steps=4, filename_prefix="easyanimate_demo", video_format="mp4",
               pipeline_name="PixArt-XL-2-512x512", motion_module_name="easyanimate_v1_mm"):
    """The text-to-video API prompt of the README demo, from the node contract of docs/ARCHITECTURE.md.

    Widget values not set here take the node's own default from /object_info; the model combos pick the
    option that contains the release file name (else the first one).
    """
    missing = [c for c in T2V_NODES if c not in object_info]
    if missing:
        raise KeyError(f"nodes not registered in the server (did the pack import?): {missing}")

    def node(class_type, links, **overrides):
        inputs = widget_defaults(object_info[class_type], overrides)
        inputs.update(links)
        return {"class_type": class_type, "inputs": inputs}

    pipeline = pick_option(combo_options(object_info, "EasyAnimateLoadPipeline", "pipeline"), (pipeline_name,))
    motion = pick_option(combo_options(object_info, "EasyAnimateLoadMotionModule", "motion_module_name"),
                         (motion_module_name,))
    fmt = pick_option(combo_options(object_info, "EasyAnimateSaveVideo", "format"), (video_format,))
    return {
        "1": node("EasyAnimateLoadPipeline", {}, pipeline=pipeline),
        "2": node("EasyAnimateLoadMotionModule", {"model": ["1", 0]}, motion_module_name=motion),
        "3": node("EasyAnimateTextEncode", {"clip": ["1", 1]}, prompt=text),
        "4": node("EasyAnimateEmptyLatent", {}, width=width, height=height, frames=frames, batch_size=1),
        "5": node("EasyAnimateSampler", {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 1],
                                         "latent": ["4", 0]}, seed=seed, steps=steps),
        "6": node("EasyAnimateVAEDecode", {"vae": ["1", 2], "samples": ["5", 0]}),
        "7": node("EasyAnimateSaveVideo", {"images": ["6", 0]}, filename_prefix=filename_prefix, format=fmt),
    }


def output_files(result):
    """(filename, subfolder, type) of every file a run reported in its ui outputs (images, gifs, videos...)."""
    files = []
    for out in result.outputs.values():
        for items in out.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    files.append((item["filename"], item.get("subfolder", ""), item.get("type", "output")))
    return files
