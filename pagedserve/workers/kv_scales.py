"""Where an fp8 KV cache's per-layer scales come from, in order of preference.

1. The checkpoint: `k_scale`/`v_scale` (or one `kv_scale`) next to each layer's attention, as
   llm-compressor, AutoFP8 and ModelOpt write them; the loader puts them in the `Attention`
   buffers and records which it found.
2. Calibration (`EngineConfig.calculate_kv_scales`): the first prefill's largest key and value
   magnitudes, per layer, map onto e4m3's 448. Later tokens larger than those saturate.
3. 1.0, with a warning: fine for models whose K/V stay well inside +-448 with useful precision
   near zero, a collapse for others (vLLM's documentation reports exactly this).

Scales are per rank but equal on every rank when they come from the checkpoint; calibrated
ones see only the rank's own KV heads, which is all its cache holds.
"""

from __future__ import annotations

import logging

import torch

from pagedserve.workers.layers.attention import Attention

logger = logging.getLogger(__name__)

SCALE_NAMES = ("k_scale", "v_scale")


def attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [module for module in model.modules() if isinstance(module, Attention)]


def prepare_kv_scales(model: torch.nn.Module, kv_cache_dtype: str, calculate: bool) -> str:
    """Arm calibration or warn for the layers an fp8 cache has no checkpoint scales for; call
    once the model runner exists (so no warm-up or capture consumes the calibration).

    Returns where the scales come from: 'unused' (not fp8), 'checkpoint', 'calibration' or
    'default' (1.0). A layer that has one scale from the checkpoint and not the other is
    calibrated (or defaulted) as a whole, so its two scales come from one source.
    """
    if kv_cache_dtype != "fp8":
        return "unused"
    layers = attention_layers(model)
    missing = [layer for layer in layers if set(SCALE_NAMES) - layer.checkpoint_kv_scales]
    if not missing:
        logger.info("fp8 KV cache: k/v scales of all %d layers from the checkpoint", len(layers))
        return "checkpoint"
    if calculate:
        for layer in missing:
            layer.calibrate_kv_scales = True
        logger.info("fp8 KV cache: scales of %d of %d layers will be computed from the first "
                    "prefill", len(missing), len(layers))
        return "calibration"
    for layer in missing:
        layer.k_scale.fill_(1.0)
        layer.v_scale.fill_(1.0)
    logger.warning("fp8 KV cache: the checkpoint has no k/v scales for %d of %d layers; using "
                   "1.0, so values past +-448 saturate and small ones lose precision (accuracy "
                   "may collapse); set EngineConfig.calculate_kv_scales=True or use a checkpoint "
                   "with k_scale/v_scale", len(missing), len(layers))
    return "default"
