"""Schedulers (docs/MODEL.md §C.5) and the CFG loop (§C.4) against a hand transcription of the original pipeline
loop."""
import inspect

import pytest
import torch

from easyanimate_model.sampling import SCHEDULERS, make_scheduler, sample

# Options that must equal the diffusers 0.27 defaults the original pipeline ran with (docs/MODEL.md §C.5).
EXPECTED_CONFIG = {
    "Euler": {"prediction_type": "epsilon", "timestep_spacing": "linspace", "interpolation_type": "linear",
              "use_karras_sigmas": False, "timestep_type": "discrete", "rescale_betas_zero_snr": False},
    "Euler A": {"prediction_type": "epsilon", "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "DPM++": {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
              "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
              "timestep_spacing": "linspace", "prediction_type": "epsilon", "thresholding": False,
              "use_karras_sigmas": False, "lambda_min_clipped": float("-inf"), "variance_type": None},
    "PNDM": {"skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading",
             "prediction_type": "epsilon"},
    "DDIM": {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True, "timestep_spacing": "leading",
             "prediction_type": "epsilon", "thresholding": False, "rescale_betas_zero_snr": False},
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_config(name):
    config = make_scheduler(name).config
    assert (config.beta_start, config.beta_end, config.beta_schedule, config.steps_offset) == \
        (0.0001, 0.02, "linear", 1)
    assert config.num_train_timesteps == 1000
    for key, want in EXPECTED_CONFIG[name].items():
        assert config[key] == want, (name, key)


def test_unknown_scheduler_lists_all():
    with pytest.raises(ValueError, match="Euler, Euler A, DPM\\+\\+, PNDM, DDIM"):
        make_scheduler("LMS")


@pytest.mark.parametrize("name", ["Euler", "Euler A"])
def test_euler_timesteps(name):
    s = make_scheduler(name)
    s.set_timesteps(30)
    ts = s.timesteps
    assert ts.dtype == torch.float32 and len(ts) == 30
    torch.testing.assert_close(ts[:2], torch.tensor([999.0, 964.5517]), atol=1e-3, rtol=0)
    torch.testing.assert_close(ts[-2:], torch.tensor([34.4483, 0.0]), atol=1e-3, rtol=0)
    assert s.sigmas[-1] == 0 and abs(float(s.sigmas[0]) - 157.407) < 1e-2
    assert abs(float(s.init_noise_sigma) - 157.41) < 0.01


def test_dpm_timesteps():
    s = make_scheduler("DPM++")
    s.set_timesteps(30)
    ts = s.timesteps.tolist()
    assert s.timesteps.dtype == torch.int64
    assert ts[:3] == [999, 966, 932] and ts[-2:] == [67, 33] and len(ts) == 30
    assert s.init_noise_sigma == 1.0


def test_pndm_timesteps():
    s = make_scheduler("PNDM")
    s.set_timesteps(30)
    ts = s.timesteps.tolist()
    assert s.timesteps.dtype == torch.int64
    assert len(ts) == 39 and ts[:5] == [958, 941, 941, 925, 925] and ts[-1] == 1
    assert s.init_noise_sigma == 1.0


def test_ddim_timesteps():
    s = make_scheduler("DDIM")
    s.set_timesteps(30)
    ts = s.timesteps.tolist()
    assert s.timesteps.dtype == torch.int64
    assert ts == list(range(958, 0, -33)) and ts[-2:] == [34, 1]
    assert s.init_noise_sigma == 1.0


class LinearFakeModel:
    """A fixed linear function of every input (latents, timestep, text embeddings, mask) -> 8 channels."""

    def __init__(self, text_channels=6):
        g = torch.Generator().manual_seed(123)
        self.w = torch.randn(8, 4, generator=g) * 0.2
        self.text = torch.randn(8, text_channels, generator=g) * 0.1
        self.calls = []

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
        self.calls.append((hidden_states.shape[0], timestep.dtype, timestep.clone()))
        assert timestep.shape == (hidden_states.shape[0],)
        dtype = hidden_states.dtype
        text = (encoder_hidden_states * encoder_attention_mask[..., None]).mean(1) @ self.text.to(dtype).T  # [B, 8]
        out = torch.einsum("oc,bcfhw->bofhw", self.w.to(dtype), hidden_states)
        return out + text[:, :, None, None, None] + 1e-3 * timestep.to(dtype)[:, None, None, None, None]


def reference_loop(model, scheduler, steps, guidance_scale, pe, pm, ne, nm, noise, generator):
    """Transcription of EasyAnimatePipeline.__call__ (v1) from the prepared latents on."""
    do_cfg = guidance_scale > 1.0
    if do_cfg:
        pe = torch.cat([ne, pe], dim=0)
        pm = torch.cat([nm, pm], dim=0)
    scheduler.set_timesteps(steps, device="cpu")
    latents = noise * scheduler.init_noise_sigma
    params = set(inspect.signature(scheduler.step).parameters.keys())
    extra = {}
    if "eta" in params:
        extra["eta"] = 0.0
    if "generator" in params:
        extra["generator"] = generator
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        current_timestep = t
        if len(current_timestep.shape) == 0:
            current_timestep = current_timestep[None]
        current_timestep = current_timestep.expand(latent_model_input.shape[0])
        noise_pred = model(latent_model_input, current_timestep, pe, pm)
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        noise_pred = noise_pred.chunk(2, dim=1)[0]
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents


def make_inputs(batch=2):
    g = torch.Generator().manual_seed(7)
    pe = torch.randn(batch, 5, 6, generator=g)
    ne = torch.randn(batch, 5, 6, generator=g)
    pm = torch.tensor([[1, 1, 1, 0, 0]] * batch)
    nm = torch.tensor([[1, 1, 0, 0, 0]] * batch)
    noise = torch.randn(batch, 4, 3, 4, 6, generator=g)
    return pe, pm, ne, nm, noise


@pytest.mark.parametrize("guidance", [6.0, 1.0])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_sample_matches_original_loop(name, guidance):
    pe, pm, ne, nm, noise = make_inputs()
    model = LinearFakeModel()
    got = sample(model, name, 7, guidance, pe, pm, ne, nm, latents=noise, generator=torch.Generator().manual_seed(3))
    expected = reference_loop(LinearFakeModel(), make_scheduler(name), 7, guidance, pe, pm, ne, nm, noise,
                              torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)
    assert got.shape == noise.shape and torch.isfinite(got).all()
    want_dtype = torch.float32 if name.startswith("Euler") else torch.int64
    want_batch = 4 if guidance > 1 else 2
    assert all(b == want_batch and dt == want_dtype for b, dt, _ in model.calls)
    assert len(model.calls) == (7 + 9 if name == "PNDM" else 7)  # PNDM: PRK warm-up adds 9 calls


def test_guidance_changes_result_and_needs_negative():
    pe, pm, ne, nm, noise = make_inputs()
    a = sample(LinearFakeModel(), "DDIM", 4, 6.0, pe, pm, ne, nm, latents=noise)
    b = sample(LinearFakeModel(), "DDIM", 4, 1.0, pe, pm, None, None, latents=noise)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sample(LinearFakeModel(), "DDIM", 4, 6.0, pe, pm, None, None, latents=noise)
    with pytest.raises(ValueError, match="negative_prompt_embeds: expected shape"):
        sample(LinearFakeModel(), "DDIM", 4, 6.0, pe, pm, ne[:, :3], nm[:, :3], latents=noise)


def test_bad_shapes_fail_before_model_call():
    pe, pm, ne, nm, noise = make_inputs()
    model = LinearFakeModel()
    with pytest.raises(ValueError, match="latents: expected"):
        sample(model, "Euler", 4, 6.0, pe, pm, ne, nm, latents=noise[:1])
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        sample(model, "Euler", 4, 6.0, pe, pm[:, :3], ne, nm, latents=noise)
    with pytest.raises(ValueError, match="latents \\(initial noise\\) or shape"):
        sample(model, "Euler", 4, 6.0, pe, pm, ne, nm)
    assert model.calls == []


def test_euler_a_generator_reproducible():
    pe, pm, ne, nm, _ = make_inputs()
    shape = (2, 4, 3, 4, 6)

    def run(seed):
        return sample(LinearFakeModel(), "Euler A", 5, 6.0, pe, pm, ne, nm, shape=shape,
                      generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(11), run(12))
    # The same generator draws the initial noise first, then one randn per ancestral step.
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(shape, generator=g)
    expected = reference_loop(LinearFakeModel(), make_scheduler("Euler A"), 5, 6.0, pe, pm, ne, nm, noise, g)
    assert torch.equal(run(11), expected)


def test_noise_dtype_follows_embeddings():
    pe, pm, ne, nm, _ = make_inputs()
    out = sample(LinearFakeModel(), "DPM++", 2, 1.0, pe.double(), pm, shape=(2, 4, 3, 4, 6),
                 generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64


def test_callback_every_step_and_exception_propagates():
    pe, pm, ne, nm, noise = make_inputs()
    seen = []
    sample(LinearFakeModel(), "PNDM", 5, 6.0, pe, pm, ne, nm, latents=noise,
           callback=lambda i, total, t, x: seen.append((i, total, int(t), x.shape)))
    assert [s[0] for s in seen] == list(range(len(seen))) and all(s[1] == len(seen) for s in seen)
    assert seen[-1][2] == 1 and seen[0][3] == noise.shape

    class Stop(Exception):
        pass

    def interrupt(i, total, t, x):
        if i == 1:
            raise Stop

    model = LinearFakeModel()
    with pytest.raises(Stop):
        sample(model, "Euler", 5, 6.0, pe, pm, ne, nm, latents=noise, callback=interrupt)
    assert len(model.calls) == 2


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedule_sigmas_give_back_the_exact_timesteps(name):
    """The sigmas of the ComfyUI samplers map back to the scheduler's own timesteps (Euler: fractional ones)."""
    from easyanimate_model.sampling import schedule_sigmas, sigma_to_timestep, train_sigmas

    s = make_scheduler(name)
    s.set_timesteps(30)
    sigmas = schedule_sigmas(name, 30)
    assert len(sigmas) == len(s.timesteps) + 1 and sigmas[-1] == 0 and sigmas.dtype == torch.float32
    t = sigma_to_timestep(sigmas[:-1], train_sigmas())
    if name.startswith("Euler"):
        assert torch.equal(sigmas, s.sigmas)
        assert (t - s.timesteps.double()).abs().max() < 1e-4 and (t != t.round()).any()
    else:
        assert torch.equal(t, s.timesteps.double())


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_for_sigmas_finds_steps_and_start(name):
    from easyanimate_model.sampling import schedule_sigmas, scheduler_for_sigmas

    sigmas = schedule_sigmas(name, 12)
    s, start = scheduler_for_sigmas(name, sigmas)
    assert start == 0 and s.num_inference_steps == 12
    if name == "PNDM":
        with pytest.raises(ValueError, match="PNDM runs only its whole schedule"):
            scheduler_for_sigmas(name, sigmas[4:])
    else:
        s, start = scheduler_for_sigmas(name, sigmas[4:])
        assert start == 4 and s.num_inference_steps == 12
    karras = torch.tensor([14.6, 3.0, 0.5, 0.0])
    with pytest.raises(ValueError, match=f"not the {name.replace('+', '.')} schedule"):
        scheduler_for_sigmas(name, karras)
