"""Training for EasyAnimate v1 (docs/MODEL.md §D): `python -m easyanimate_model.train --help`.

Modules: cli (arguments), data (datasets, buckets, crops, frame sampling), diffusion (IDDPM hybrid loss),
lora_network (trainable kohya LoRA), loop (optimisation, EMA, checkpoints, resume, validation), export (output files).
"""
