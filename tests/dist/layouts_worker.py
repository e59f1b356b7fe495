"""torchrun worker for the layout-equivalence and resume-across-layouts tests.

    worker.py OUT multi    (2 processes) initial weights (TP1/PP1) -> OUT/init; TP2, PP2,
                                        DP2 (+distributed optimizer) from OUT/init: steps 1..5,
                                        save after 3; resume TP2->PP2, PP2->DP2; a non-finite
                                        step under PP2 is skipped
    worker.py OUT single   (1 process)  the reference: OUT/init, steps 1..6 uninterrupted;
                                        then resume DP2 -> TP1 (steps 4..6)
    worker.py OUT bf16     (1 process)  bf16 GPT: resume across optimizer kinds
Results go to OUT/<phase>.json (rank 0); the test compares them.
"""

import sys

import common as C  # noqa: E402  (sets up the cpu platform before megatron is imported)


def _fresh(tp, pp, dist_opt, init_dir=None):
    from voxcpm_train.parallel import load_checkpoint

    chunks, opt, sched = C.setup(tp, pp, dist_opt)
    if init_dir is not None:
        load_checkpoint(init_dir, chunks, opt, load_optimizer=False)
    return chunks, opt, sched


def _train_and_save(out, name, tp, pp, dist_opt, res):
    """Steps 1..5 from the initial weights, checkpoint after step 3."""
    from voxcpm_train.parallel import save_checkpoint

    chunks, opt, sched = _fresh(tp, pp, dist_opt, out / "init")
    losses = C.run_steps(chunks, opt, sched, range(1, 4))
    save_checkpoint(out / f"{name}_s3", chunks, opt, sched, extra_state={"step": 3},
                    rank_state={"who": C.dist.get_rank()})
    losses += C.run_steps(chunks, opt, sched, range(4, 6))
    res[name] = losses
    return chunks, opt, sched


def _resume(out, src, name, tp, pp, dist_opt, res):
    from voxcpm_train.parallel import destroy_model_parallel, load_checkpoint

    destroy_model_parallel()
    chunks, opt, sched = C.setup(tp, pp, dist_opt)
    info = load_checkpoint(out / f"{src}_s3", chunks, opt, sched)
    assert info.extra_state == {"step": 3}, info.extra_state
    assert not info.rng_restored and info.rank_state is None  # layout changed
    res[name] = C.run_steps(chunks, opt, sched, range(4, 7))
    return chunks, opt, sched


def single(out):
    chunks, opt, sched = _fresh(1, 1, False, out / "init")
    res = {"baseline": C.run_steps(chunks, opt, sched, range(1, 7))}
    _resume(out, "dp2", "dp2_to_tp1", 1, 1, False, res)
    C.dump(out / "single.json", res)


def bf16(out):
    """GPT in bf16 with fp32 main params/grads (the accelerator path, run on CPU): resumes between
    the mixed-precision optimizer and the distributed optimizer continue as the uninterrupted run."""
    import os

    from voxcpm_train.parallel import destroy_model_parallel, load_checkpoint, save_checkpoint

    res, saved = {}, {}
    C.MODEL = "voxcpm"  # the VoxCPM model follows the bf16 parameter dtype (casts, p2p dtype)
    for bf16 in (False, True):
        chunks, opt, sched = C.setup(1, 1, False, bf16=bf16)
        res[f"voxcpm_bf16_{int(bf16)}"] = C.run_steps(chunks, opt, sched, [1, 2])
        destroy_model_parallel()
    os.environ["VOXCPM_TEST_MODEL"] = C.MODEL = "gpt"
    for dist_opt in (False, True):  # uninterrupted references, checkpoint after step 3
        chunks, opt, sched = C.setup(1, 1, dist_opt, bf16=True)
        assert all(p.dtype == C.torch.bfloat16 for p in chunks[0].parameters())
        name = f"bf16_ref_dist{int(dist_opt)}"
        res[name] = C.run_steps(chunks, opt, sched, range(1, 4))
        saved[int(dist_opt)] = C.adam_state(chunks, opt)
        save_checkpoint(out / name, chunks, opt, sched)
        res[name] += C.run_steps(chunks, opt, sched, range(4, 7))
        destroy_model_parallel()
    for src, dst in ((0, 0), (0, 1), (1, 0), (1, 1)):
        chunks, opt, sched = C.setup(1, 1, bool(dst), bf16=True)
        load_checkpoint(out / f"bf16_ref_dist{src}", chunks, opt, sched)
        res[f"state_diff_dist{src}_to_dist{dst}"] = C.max_state_diff(C.adam_state(chunks, opt),
                                                                     saved[src])
        res[f"bf16_dist{src}_to_dist{dst}"] = C.run_steps(chunks, opt, sched, range(4, 7))
        destroy_model_parallel()
    C.dump(out / "bf16.json", res)


def multi(out):
    import torch

    from voxcpm_train.parallel import destroy_model_parallel, load_checkpoint, save_checkpoint

    chunks, _, _ = C.setup(1, 1, False)  # TP1/PP1 weights (seeded as a single process would be)
    save_checkpoint(out / "init", chunks)
    destroy_model_parallel()
    res = {}
    _train_and_save(out, "tp2", 2, 1, False, res)
    destroy_model_parallel()

    chunks, opt, sched = _train_and_save(out, "pp2", 1, 2, False, res)
    # A step whose loss is NaN on the last stage only: every rank skips, nothing changes.
    before, steps_before = C.local_params(chunks), opt.optimizer.state_dict()["state"][0]["step"]
    nan = C.run_steps(chunks, opt, sched, [6], nan_steps={6})[0]
    after = C.local_params(chunks)
    res["nan_step"] = {
        "skipped": nan["skipped"],
        "params_unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
        "adam_step_unchanged": bool(opt.optimizer.state_dict()["state"][0]["step"] == steps_before),
    }
    # Same-layout reload restores RNG and per-rank state.
    destroy_model_parallel()
    chunks, opt, sched = C.setup(1, 2, False)
    info = load_checkpoint(out / "pp2_s3", chunks, opt, sched)
    res["same_layout_reload"] = {"rng_restored": info.rng_restored,
                                 "rank_state": info.rank_state}

    _resume(out, "tp2", "tp2_to_pp2", 1, 2, False, res)
    destroy_model_parallel()
    _train_and_save(out, "dp2", 1, 1, True, res)
    _resume(out, "pp2", "pp2_to_dp2", 1, 1, True, res)
    C.dump(out / "multi.json", res)


if __name__ == "__main__":
    out = C.start(sys.argv)
    {"single": single, "multi": multi, "bf16": bf16}[sys.argv[2]](out)
    C.dist.destroy_process_group()
