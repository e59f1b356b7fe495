"""torchrun worker (2 processes, DP=2, distributed optimizer): DDP overlap_grad_reduce +
overlap_param_gather with several buckets train like the plain DDP, and a checkpoint saved right after
a step (whose parameter all-gather is still pending under overlap_param_gather) holds the updated weights.

    overlap_worker.py OUT      -> OUT/overlap.json (rank 0)
"""

import sys

import common as C  # noqa: E402  (sets up the cpu platform before megatron is imported)


def main(out):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.parallel import (build_model_chunks, build_optimizer, build_scheduler,
                                       destroy_model_parallel, initialize_model_parallel, load_checkpoint,
                                       save_checkpoint)

    res = {}
    for overlap in (False, True):
        initialize_model_parallel(1, 1, seed=1234)
        ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=overlap,
                                            overlap_param_gather=overlap, bucket_size=20000 if overlap else None)
        chunks = build_model_chunks(C.voxcpm_provider, ddp)
        opt = build_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0,
                                              use_distributed_optimizer=True), chunks)
        sched = build_scheduler(opt, max_lr=3e-3, min_lr=3e-4, warmup=1, decay=10, decay_style="cosine")
        buckets = sum(len(b.buckets) for b in chunks[0].buffers)
        steps = C.run_steps(chunks, opt, sched, range(1, 4))
        if overlap:  # model-only save right after step 3: its pending parameter all-gather must land first
            save_checkpoint(out / "overlap_s3", chunks)
        res[f"overlap={overlap}"] = {"steps": steps, "buckets": buckets,
                                     "hooked": bool(getattr(chunks[0], "use_forward_hook", False))}
        if not overlap:
            reference = C.local_params(chunks)
        destroy_model_parallel()
    initialize_model_parallel(1, 1, seed=1234)
    plain = build_model_chunks(C.voxcpm_provider, DistributedDataParallelConfig(use_distributed_optimizer=True))
    load_checkpoint(out / "overlap_s3", plain, None, load_optimizer=False)
    res["saved_vs_reference"] = max(float((a - b).abs().max()) for a, b in zip(C.local_params(plain), reference))
    C.dump(out / "overlap.json", res)


if __name__ == "__main__":
    main(C.start(sys.argv))
