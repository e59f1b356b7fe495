"""The training loop (`loop.py`), WSD curriculum (`curriculum.py`), checkpoint directory protocol
(`checkpoint.py`), metrics/logging (`metrics.py`), validation and audio samples (`evaluate.py`)."""
