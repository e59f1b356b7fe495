"""VoxCPM2 data pipeline: raw corpora -> AudioVAE latent shards -> unified, packed, resumable batches."""
