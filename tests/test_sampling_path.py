"""One sampling path (issue 9), on a real ComfyUI server with the test probes of tests/probe_nodes loaded: the
original schedulers as core samplers give the library's result, and core's sampling hooks (CFG functions, model
wrappers, attention override and patches, torch.compile, context windows, several conditioning entries) run under
EasyAnimateSampler and under SamplerCustomAdvanced + EasyAnimateSamplerSelect alike."""
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARTIFACTS_DIR, tiny_server
from easyanimate_model.sampling import SCHEDULERS
from test_nodes_pipeline import FRAMES, MM, PIPELINE, SIZE, graph, run_ok, saved_latent, steps_for

pytestmark = pytest.mark.server  # starts its own server (not the session `comfy`, which conftest marks)
PROBE_NODES = Path(__file__).parent / "probe_nodes"
ERRORS = {}  # sampler -> errors, written to test_artifacts/sampling_path_errors.json


@pytest.fixture(scope="module")
def probe_comfy(comfy_host_dir):
    """A server like `comfy`, plus the probe nodes."""
    with tiny_server(comfy_host_dir, "ea-comfy-probe-", "comfy_probe_server.log",
                     extra_custom_nodes=[PROBE_NODES]) as server:
        assert "EAProbeHooks" in server.object_info(), server.log_tail()
        yield server


def advanced(g, seed, sampler, steps, cfg, model=("2", 0), positive=("3", 0), negative=("3", 1), out="5"):
    """Replace node `out` with SamplerCustomAdvanced + CFGGuider + EasyAnimateSamplerSelect + EasyAnimateSigmas."""
    g.update({
        "a1": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "a2": {"class_type": "CFGGuider", "inputs": {"model": list(model), "positive": list(positive),
                                                     "negative": list(negative), "cfg": cfg}},
        "a3": {"class_type": "EasyAnimateSamplerSelect", "inputs": {"sampler": sampler}},
        "a4": {"class_type": "EasyAnimateSigmas", "inputs": {"sampler": sampler, "steps": steps}},
        out: {"class_type": "SamplerCustomAdvanced",
              "inputs": {"noise": ["a1", 0], "guider": ["a2", 0], "sampler": ["a3", 0], "sigmas": ["a4", 0],
                         "latent_image": ["4", 0]}},
    })
    return g


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("sampler", SCHEDULERS)
def test_node_paths_equal_library_path(probe_comfy, sampler):
    """EasyAnimateSampler and SamplerCustomAdvanced + our sampler/sigmas = ea.sample on the server's T5 output."""
    import easyanimate_model as ea

    seed, steps, cfg = random.randint(0, 2**31), steps_for(sampler), 6.0
    g = graph(seed=seed, steps=steps, sampler=sampler, cfg=cfg)
    g["1"]["inputs"]["weight_dtype"] = "fp32"
    tag = f"{sampler.replace(' ', '_').replace('+', 'p')}_{seed}"
    g["c1"] = {"class_type": "EAProbeSaveConditioning", "inputs": {"conditioning": ["3", 0], "name": f"pos_{tag}"}}
    g["c2"] = {"class_type": "EAProbeSaveConditioning", "inputs": {"conditioning": ["3", 1], "name": f"neg_{tag}"}}
    advanced(g, seed, sampler, steps, cfg, out="5b")
    g["6b"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5b", 0], "filename_prefix": "path/advanced"}}
    result = run_ok(probe_comfy, g)
    node, adv = saved_latent(probe_comfy, result), saved_latent(probe_comfy, result, node="6b")

    pos = load_file(str(probe_comfy.output_dir / "probe" / f"pos_{tag}.safetensors"))
    neg = load_file(str(probe_comfy.output_dir / "probe" / f"neg_{tag}.safetensors"))
    model = ea.load_transformer(probe_comfy.models_dir / "diffusers" / PIPELINE,
                                motion_module=probe_comfy.models_dir / "easyanimate" / MM)
    noise = torch.randn(node.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.view(1, FRAMES, 4, SIZE // 8, SIZE // 8).transpose(1, 2)
    with torch.no_grad():
        lib = ea.sample(lambda x, t, e, m: model(x, t, e, m), scheduler=sampler, steps=steps, guidance_scale=cfg,
                        prompt_embeds=pos["0.embeds"], prompt_attention_mask=pos.get("0.mask"),
                        negative_prompt_embeds=neg["0.embeds"], negative_prompt_attention_mask=neg.get("0.mask"),
                        latents=noise, generator=torch.Generator().manual_seed(seed))
    lib = lib.transpose(1, 2).reshape(node.shape) / 0.18215
    ERRORS[sampler] = {"EasyAnimateSampler": relative(node, lib), "SamplerCustomAdvanced": relative(adv, lib),
                       "max|ref|": lib.abs().max().item()}
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    (ARTIFACTS_DIR / "sampling_path_errors.json").write_text(json.dumps(ERRORS, indent=1))
    # float rounding of the eps <-> denoised conversions scales with the model's output (the random tiny model
    # predicts eps in the hundreds); DDIM clips x0 to [-1, 1], so its max|ref| stays ~5.5 and the same rounding is
    # a larger fraction of it (~3e-5): it gets the contract's 1e-4
    tolerance = 1e-4 if sampler == "DDIM" else 1e-5
    assert ERRORS[sampler]["EasyAnimateSampler"] < tolerance and ERRORS[sampler]["SamplerCustomAdvanced"] < tolerance, \
        ERRORS[sampler]


def test_sigmas_not_of_the_scheduler_are_a_readable_error(probe_comfy):
    g = advanced(graph(), 1, "DDIM", 2, 6.0)
    g["a4"] = {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "karras", "steps": 2,
                                                          "denoise": 1.0}}
    result = probe_comfy.queue(g, timeout=300)
    assert result.status_str == "error"
    message = result.error["exception_message"]
    assert "DDIM" in message and "EasyAnimateSigmas" in message, message


def counts_of(result, node="p9"):
    return result.outputs[node]["counts"][0]


def probed(path, probes, seed, sampler="Euler", steps=2, model=("2", 0), extra=None):
    """graph() sampled by `path` on the probed MODEL, with EAProbeCounts after the sampler."""
    g = graph(seed=seed, steps=steps, sampler=sampler, extra=extra)
    g["p1"] = {"class_type": "EAProbeHooks", "inputs": {"model": list(model), "probes": probes}}
    if path == "EasyAnimateSampler":
        g["5"]["inputs"]["model"] = ["p1", 0]
    else:
        advanced(g, seed, sampler, steps, 6.0, model=("p1", 0))
    g["p9"] = {"class_type": "EAProbeCounts", "inputs": {"latent": ["5", 0]}}
    return g


PATHS = ("EasyAnimateSampler", "SamplerCustomAdvanced")


@pytest.mark.parametrize("path", PATHS)
def test_sampling_hooks_run_and_change_nothing(probe_comfy, path):
    seed, steps = random.randint(0, 2**31), 2
    plain = saved_latent(probe_comfy, run_ok(probe_comfy, probed(path, "", seed)))
    result = run_ok(probe_comfy, probed(path, "cfg,post_cfg,apply_model,diffusion_model,attention_override,dit",
                                        seed))
    counts = counts_of(result)
    blocks = counts["dit"] // steps
    # one batched cond+uncond model call per step; per block attn1, the two motion-module attentions, attn2
    assert blocks >= 1 and counts["dit"] == steps * blocks, counts
    assert {k: counts[k] for k in ("cfg", "post_cfg", "apply_model", "diffusion_model")} == \
        dict.fromkeys(("cfg", "post_cfg", "apply_model", "diffusion_model"), steps), counts
    assert counts["attention_override"] == steps * blocks * 4, counts
    assert relative(saved_latent(probe_comfy, result), plain) < 1e-5
    # attn1 / attn2 replace patches take those calls (the motion module's two remain with the override)
    result = run_ok(probe_comfy, probed(path, "attn1,attn2,attention_override", seed))
    counts = counts_of(result)
    assert counts == {"attn1": steps * blocks, "attn2": steps * blocks, "attention_override": steps * blocks * 2,
                      **({"dynamo_graphs": counts["dynamo_graphs"]} if "dynamo_graphs" in counts else {})}, counts
    assert relative(saved_latent(probe_comfy, result), plain) < 1e-5
    PROBE_TABLE.setdefault(path, {}).update(counts_of(run_ok(probe_comfy, probed(
        path, "cfg,post_cfg,apply_model,diffusion_model,attention_override", seed))))
    (ARTIFACTS_DIR / "sampling_path_probes.json").write_text(json.dumps(PROBE_TABLE, indent=1))


PROBE_TABLE = {}
COMPILE_BACKEND = "cudagraphs"  # see test_core_torch_compile_runs


@pytest.mark.parametrize("path", PATHS)
def test_core_torch_compile_runs(probe_comfy, path):
    """Core TorchCompileModel (its APPLY_MODEL wrapper swaps in the compiled diffusion_model): dynamo captures
    graphs of our model. Backend "cudagraphs" traces with dynamo and runs the graphs eagerly on CPU tensors;
    "inductor" works too on CPU (with gcc) but compiles for minutes on a 2-core machine."""
    # nodes re-run and dynamo compiles afresh: the other path's compiled graphs would otherwise be reused as they are
    probe_comfy.free()
    seed = random.randint(0, 2**31)
    extra = {"tc": {"class_type": "TorchCompileModel", "inputs": {"model": ["2", 0], "backend": COMPILE_BACKEND}}}
    before = counts_of(run_ok(probe_comfy, probed(path, "apply_model", seed, extra=extra))).get("dynamo_graphs", 0)
    g = probed(path, "apply_model,dynamo_reset", seed, model=("tc", 0), extra=extra)
    result = run_ok(probe_comfy, g, timeout=900)
    counts = counts_of(result)
    PROBE_TABLE.setdefault(path, {})["torch_compile_new_graphs"] = counts.get("dynamo_graphs", 0) - before
    (ARTIFACTS_DIR / "sampling_path_probes.json").write_text(json.dumps(PROBE_TABLE, indent=1))
    assert counts["apply_model"] == 2 and counts.get("dynamo_graphs", 0) > before, counts
    assert torch.isfinite(saved_latent(probe_comfy, result)).all()
    # the same compiled model under the other path, whose transformer_options differ: it runs (dynamo's guards on
    # the options once failed with KeyError 'easyanimate_frames' on ComfyUI 0.33.0)
    other = PATHS[1 - PATHS.index(path)]
    again = run_ok(probe_comfy, probed(other, "apply_model", seed, model=("tc", 0), extra=extra), timeout=900)
    assert torch.isfinite(saved_latent(probe_comfy, again)).all()


def with_defaults(comfy, class_type, **inputs):
    """A core node with `inputs`; its other widgets at their defaults, as a new node on the canvas has them (core
    nodes gain inputs across versions: 0.33.0's ContextWindowsManual has five more than 0.3.75's)."""
    info = comfy.object_info(class_type)["input"]
    for section in ("required", "optional"):
        for name, spec in (info.get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if name not in inputs and "default" in opts:
                inputs[name] = opts["default"]
    return {"class_type": class_type, "inputs": inputs}


@pytest.mark.parametrize("path", PATHS)
def test_core_context_windows_give_a_longer_video(probe_comfy, path):
    """ContextWindowsManual (length 4, overlap 1) on 10 frames: 3 windows per step, each a whole 4-frame video for
    the motion module; the result differs from the full-attention run."""
    seed, frames = random.randint(0, 2**31), 10
    extra = {"cw": with_defaults(probe_comfy, "ContextWindowsManual", model=["2", 0], context_length=4,
                                 context_overlap=1, context_schedule="standard_static", context_stride=1,
                                 closed_loop=False, fuse_method="pyramid", dim=0)}
    g = probed(path, "apply_model,attention_override", seed, model=("cw", 0), extra=extra)
    g["4"]["inputs"]["frames"] = frames
    result = run_ok(probe_comfy, g)
    counts = counts_of(result)
    windowed = saved_latent(probe_comfy, result)
    assert windowed.shape == (frames, 4, SIZE // 8, SIZE // 8) and torch.isfinite(windowed).all()
    assert counts["apply_model"] == 2 * 3, counts
    PROBE_TABLE.setdefault(path, {})["context_window_model_calls"] = counts["apply_model"]
    (ARTIFACTS_DIR / "sampling_path_probes.json").write_text(json.dumps(PROBE_TABLE, indent=1))
    g = probed(path, "", seed)
    g["4"]["inputs"]["frames"] = frames
    full = saved_latent(probe_comfy, run_ok(probe_comfy, g))
    assert not torch.allclose(full, windowed, atol=1e-4)


def test_several_conditioning_entries_as_in_core(probe_comfy):
    """ConditioningCombine and ConditioningSetTimestepRange: EasyAnimateSampler = SamplerCustomAdvanced + CFGGuider
    (core's cond handling), and both entries matter."""
    seed = random.randint(0, 2**31)
    extra = {
        "3b": {"class_type": "EasyAnimateTextEncode",
               "inputs": {"clip": ["1", 1], "prompt": "a blue whale", "negative_prompt": "blurry"}},
        "r1": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["3", 0], "start": 0.0,
                                                                         "end": 0.5}},
        "r2": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["3b", 0], "start": 0.5,
                                                                         "end": 1.0}},
        "cc": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["3", 0],
                                                               "conditioning_2": ["3b", 0]}},
        "cr": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["r1", 0],
                                                               "conditioning_2": ["r2", 0]}},
    }
    single = saved_latent(probe_comfy, run_ok(probe_comfy, graph(seed=seed, extra=extra)))
    for positive in ("cc", "cr"):
        g = graph(seed=seed, extra=extra)
        g["5"]["inputs"]["positive"] = [positive, 0]
        ours = saved_latent(probe_comfy, run_ok(probe_comfy, g))
        core = saved_latent(probe_comfy, run_ok(probe_comfy, advanced(graph(seed=seed, extra=extra), seed, "Euler",
                                                                      2, 6.0, positive=(positive, 0))))
        assert relative(ours, core) < 1e-6, positive
        assert not torch.allclose(ours, single, atol=1e-4), positive
