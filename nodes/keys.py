"""Names the nodes share in LATENT dicts, conditioning entries and ModelPatcher transformer_options (a module of its
own so that every node module can import them without import cycles)."""

# frames per video: the LATENT dict entry (EasyAnimateEmptyLatent) and the transformer_options key (the sampler)
FRAMES_KEY = "easyanimate_frames"
# transformer_options flag: True on MODELs whose model has the motion module
TEMPORAL_OPTION = "easyanimate_motion_module"
# conditioning entry (and model cond) holding a PromptSchedule
SCHEDULE_KEY = "easyanimate_prompt_schedule"
