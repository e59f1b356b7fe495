"""Weights in and out: the reference folder (``voxcpm`` HF format) <-> our megatron checkpoints.

``mapping`` holds the declarative parameter table and pure state-dict conversions; ``folder`` reads
and writes the reference folder; ``cli`` holds ``voxcpm-import`` / ``voxcpm-export``.
"""

from voxcpm_train.convert.mapping import ConversionError, ours_to_reference, reference_to_ours

__all__ = ["ConversionError", "ours_to_reference", "reference_to_ours"]
