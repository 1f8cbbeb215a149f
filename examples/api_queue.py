"""Queue an API-format workflow on a ComfyUI server, follow it over the websocket, download the outputs.

    python examples/api_queue.py example_workflows/api/easyanimate_t2v_landscape_dpmpp.json \
        --server http://127.0.0.1:8188 --set EasyAnimateSampler.steps=20 --set 4.frames=48 --out videos/

--set NODE.INPUT=VALUE changes one input before queueing; NODE is a node id of the API file or a class_type that
occurs once; VALUE is read as JSON when it parses (12, 6.5, true, "text") and as a plain string otherwise.
The API files are the "Export (API)" form of a workflow (example_workflows/api/ holds the twins of the examples).
Needs only the standard library and websocket-client (pip install websocket-client).
Exit codes: 0 done, 1 the run failed on the server, 2 bad arguments or the server refused the prompt.
"""
import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class UsageError(Exception):
    """Bad workflow file or --set argument: exit code 2."""


def load_api_workflow(path):
    try:
        workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read a JSON workflow: {e}") from e
    if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list):
        raise UsageError(f"{path} is a UI-format workflow (it has a 'nodes' list); queue its API-format twin "
                         f"(example_workflows/api/), or export one in ComfyUI with Workflow > Export (API)")
    if not isinstance(workflow, dict) or not all(isinstance(n, dict) and "class_type" in n
                                                 for n in workflow.values()):
        raise UsageError(f"{path}: expected an API-format workflow {{node id: {{class_type, inputs}}}}")
    return workflow


def parse_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_override(workflow, assignment):
    """Apply one NODE.INPUT=VALUE to the workflow in place."""
    target, sep, value = assignment.partition("=")
    node_ref, dot, input_name = target.rpartition(".")
    if not sep or not dot or not node_ref or not input_name:
        raise UsageError(f"--set {assignment!r}: expected NODE.INPUT=VALUE, e.g. 5.steps=20 or "
                         f"EasyAnimateSampler.steps=20")
    if node_ref in workflow:
        node_id = node_ref
    else:
        ids = [i for i, node in workflow.items() if node["class_type"] == node_ref]
        if len(ids) != 1:
            raise UsageError(f"--set {assignment!r}: {node_ref!r} must be a node id or a class_type that occurs "
                             f"once; node ids: {sorted(workflow)}, class types: "
                             f"{sorted({n['class_type'] for n in workflow.values()})}")
        node_id = ids[0]
    inputs = workflow[node_id].setdefault("inputs", {})
    if input_name not in inputs:
        raise UsageError(f"--set {assignment!r}: node {node_id} ({workflow[node_id]['class_type']}) has no input "
                         f"{input_name!r}; its inputs: {sorted(inputs)}")
    inputs[input_name] = parse_value(value)


class Client:
    def __init__(self, server, timeout):
        self.server = server.rstrip("/")
        self.timeout = timeout

    def request(self, path, payload=None):
        """(HTTP status, body bytes) of a GET, or of a JSON POST when payload is given."""
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.server + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def websocket(self, client_id):
        try:
            import websocket
        except ImportError as e:
            raise UsageError("examples/api_queue.py needs websocket-client: pip install websocket-client") from e
        url = self.server.replace("http", "ws", 1) + "/ws?" + urllib.parse.urlencode({"clientId": client_id})
        return websocket.create_connection(url, timeout=self.timeout)


def describe_rejection(status, body):
    try:
        answer = json.loads(body)
    except ValueError:
        return f"HTTP {status}: {body[:500]!r}"
    lines = [f"HTTP {status}: {answer.get('error', {}).get('message', answer)}"]
    for node_id, node_error in (answer.get("node_errors") or {}).items():
        for err in node_error.get("errors", []):
            lines.append(f"  node {node_id} ({node_error.get('class_type')}): {err.get('message')}: "
                         f"{err.get('details')}")
    return "\n".join(lines)


def follow(ws, prompt_id, log):
    """Print progress until the prompt finished; returns the execution_error data, or None on success."""
    while True:
        raw = ws.recv()
        if isinstance(raw, bytes):  # binary frames are latent previews
            continue
        message = json.loads(raw)
        kind, data = message.get("type"), message.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if kind == "execution_cached" and data.get("nodes"):
            log(f"cached: nodes {', '.join(map(str, data['nodes']))}")
        elif kind == "executing" and data.get("node") is not None:
            log(f"running node {data['node']}")
        elif kind == "progress":
            log(f"  node {data.get('node')}: step {data.get('value')}/{data.get('max')}")
        elif kind == "execution_error":
            return data
        elif kind == "execution_interrupted":
            return {"exception_message": "interrupted", "node_id": data.get("node_id")}
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                             and data.get("prompt_id") == prompt_id):
            return None


def output_files(outputs):
    """Every {filename, subfolder, type} a run reported in its ui outputs (videos, images...)."""
    for node_id, node_output in outputs.items():
        for items in node_output.values():
            for item in items if isinstance(items, list) else ():
                if isinstance(item, dict) and "filename" in item:
                    yield node_id, item


def run(args, log=print):
    workflow = load_api_workflow(args.workflow)
    for assignment in args.set:
        apply_override(workflow, assignment)
    client = Client(args.server, args.timeout)
    client_id = uuid.uuid4().hex
    ws = client.websocket(client_id)  # connect first, so no progress message is missed
    try:
        status, body = client.request("/prompt", {"prompt": workflow, "client_id": client_id})
        if status != 200:
            raise UsageError("the server refused the prompt: " + describe_rejection(status, body))
        prompt_id = json.loads(body)["prompt_id"]
        log(f"queued prompt {prompt_id} on {client.server}")
        started = time.monotonic()
        error = follow(ws, prompt_id, log)
    finally:
        ws.close()
    if error:
        log(f"FAILED in node {error.get('node_id')} ({error.get('node_type')}): {error.get('exception_type', '')} "
            f"{error.get('exception_message', '')}".rstrip())
        return 1, []
    log(f"finished in {time.monotonic() - started:.1f} s")
    history = {}
    for _ in range(50):  # the history entry is written right after the last websocket message
        history = json.loads(client.request(f"/history/{prompt_id}")[1]).get(prompt_id) or {}
        if history.get("outputs") is not None and history.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for node_id, item in output_files(history.get("outputs", {})):
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        status, data = client.request("/view?" + query)
        if status != 200:
            log(f"could not download {item['filename']} (node {node_id}): HTTP {status}")
            return 1, saved
        path = out_dir / item["filename"]
        path.write_bytes(data)
        saved.append(path)
        log(f"saved {path} ({len(data)} bytes, node {node_id})")
    return 0, saved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", help="API-format workflow JSON, e.g. example_workflows/api/*.json")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change an input before queueing (repeatable)")
    parser.add_argument("--out", default=".", help="folder for the downloaded outputs (default: current)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    try:
        code, _ = run(args)
    except UsageError as e:
        print(f"api_queue.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"api_queue.py: cannot talk to {args.server}: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
