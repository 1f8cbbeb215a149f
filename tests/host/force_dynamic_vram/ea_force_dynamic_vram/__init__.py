"""Test-only ComfyUI custom node: switches DynamicVRAM on the way ComfyUI's main.py does on NVIDIA GPUs
(ComfyUI >= ~0.16), so that the CPU test host exercises the pack's loaders in that mode. Loaded before the pack
by tests/comfy_client.py when COMFY_FORCE_DYNAMIC_VRAM=1 (README, "Testing"). It registers no node.

On CPU, ModelPatcherDynamic hands back a plain ModelPatcher for CPU-loaded models, so what changes is the
`comfy.ops` side: layers built without weights, missing weights filled lazily, the file dtype kept.
"""
import comfy.memory_management
import comfy.model_patcher

if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
    raise RuntimeError("ea_force_dynamic_vram: this ComfyUI has no ModelPatcherDynamic (DynamicVRAM needs "
                       "ComfyUI >= ~0.16); run the DynamicVRAM tier against a newer tree")
comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
comfy.memory_management.aimdo_enabled = True
# tests/comfy_client.py waits for this exact line to know the switch happened before the pack loaded
print("ea_force_dynamic_vram: DynamicVRAM forced on", flush=True)

NODE_CLASS_MAPPINGS = {}
