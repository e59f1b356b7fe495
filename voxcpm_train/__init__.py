"""Distributed training of the VoxCPM2 text-to-speech backbone on megatron-core."""
