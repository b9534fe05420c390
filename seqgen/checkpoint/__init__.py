"""Checkpoint I/O: reading a safetensors checkpoint by the model's names, writing a quantized one, atomically.

=========================  ==========================================================================================
``reading.py``             :class:`SafetensorsWeights`: a checkpoint's tensors by model name, read lazily (disk
                           offload)
``layout.py``              where fused MoE experts go in a checkpoint (one linear per expert, under its own names)
``keys.py``                the keys of a save's quantized weights, resolved to the model's modules and parameters
``packing.py``             one quantized weight in compressed-tensors' ``pack-quantized`` format
``formats.py``             which format a scheme is stored in (pack-, int-, float-quantized), its tensors and config
``compressed.py``          a compressed-tensors checkpoint: state dict, ``quantization_config``, the checks made
                           before a calibration
``transformers_limits.py`` what transformers' compressed-tensors loader cannot load
``writing.py``             :func:`save_quantized`: a whole quantized model at once
``streaming.py``           :class:`StreamingSaver`: one subgraph at a time, with the weights offloaded to disk
``atomic.py``              :func:`atomic_directory`: every directory is written beside its place, then renamed
=========================  ==========================================================================================
"""

from .atomic import atomic_directory
from .compressed import (
    check_compressed_experts,
    check_compressed_linears,
    experts_saved_dense,
    quantization_config,
)
from .reading import SafetensorsWeights
from .streaming import StreamingSaver
from .writing import SAVE_FORMATS, SERVING_FILES, apply_fake_quant, save_quantized

__all__ = [
    "SAVE_FORMATS",
    "SERVING_FILES",
    "SafetensorsWeights",
    "StreamingSaver",
    "apply_fake_quant",
    "atomic_directory",
    "check_compressed_experts",
    "check_compressed_linears",
    "experts_saved_dense",
    "quantization_config",
    "save_quantized",
]
