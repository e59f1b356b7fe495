"""torchrun worker (2 processes) of the LoRA layout test.

    lora_worker.py OUT    initial weights (TP1, adapters drawn) -> OUT/init; then from OUT/init, with the
                          base frozen and adapters on every linear kind: DP2 (distributed optimizer),
                          TP2, TP2 + sequence parallelism, 4 Adam steps each, weights saved after them;
                          each trained checkpoint reloaded at TP1: adapters and base compared.
Results go to OUT/lora.json (rank 0); tests/test_lora_tp.py compares them.
"""

import sys

import common as C  # noqa: E402  (sets up the cpu platform before megatron is imported)

ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
STEPS = range(1, 5)


def _peft():
    from voxcpm_train.config.peft import LoraConfig, PeftConfig

    return PeftConfig(method="lora", lora=LoraConfig(
        rank=4, alpha=8.0, base_lm=ALL, residual_lm=ALL, feat_decoder=ALL,
        projections=["enc_to_lm_proj", "fusion_concat_proj", "res_to_dit_proj"]))


def _setup(tp: int, dist_opt: bool, sp: bool = False):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.model.lora import apply_peft
    from voxcpm_train.parallel import build_model_chunks, build_optimizer, build_scheduler, initialize_model_parallel

    initialize_model_parallel(tp, 1, seed=1234)

    def provider(pre_process, post_process):
        model = VoxCPMModel(load_model_preset("tiny"), pre_process, post_process, sequence_parallel=sp)
        apply_peft(model, _peft(), seed=77)
        return model

    chunks = build_model_chunks(provider, DistributedDataParallelConfig(use_distributed_optimizer=dist_opt))
    opt = build_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
        use_distributed_optimizer=dist_opt), chunks)
    sched = build_scheduler(opt, max_lr=3e-3, min_lr=3e-4, init_lr=1e-3, warmup=2, decay=10,
                            decay_style="cosine", weight_decay=0.01)
    return chunks, opt, sched


def _full_state(ckpt):
    """Every tensor of a checkpoint, loaded into a TP1 model (rank-local copy, same on all ranks)."""
    from voxcpm_train.parallel import destroy_model_parallel, load_checkpoint

    destroy_model_parallel()
    chunks, _, _ = _setup(1, False)
    res = load_checkpoint(ckpt, chunks, optimizer=None, load_rng=False)
    assert res.missing_optional == []
    return {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items() if C.torch.is_tensor(v)}


def main(out):
    from voxcpm_train.parallel import destroy_model_parallel, load_checkpoint, save_checkpoint

    chunks, _, _ = _setup(1, False)
    save_checkpoint(out / "init", chunks)
    res = {}
    for name, tp, dist_opt, sp in (("dp2", 1, True, False), ("tp2", 2, False, False), ("tp2_sp", 2, False, True)):
        destroy_model_parallel()
        chunks, opt, sched = _setup(tp, dist_opt, sp)
        load_checkpoint(out / "init", chunks, opt, load_optimizer=False)
        trainable = sum(p.numel() for p in chunks[0].parameters() if p.requires_grad)
        res[name] = {"steps": C.run_steps(chunks, opt, sched, STEPS), "trainable_local": trainable}
        save_checkpoint(out / name, chunks)
    init = _full_state(out / "init")
    trained = {name: _full_state(out / name) for name in ("dp2", "tp2", "tp2_sp")}
    for name, state in trained.items():
        adapters = [k for k in state if ".lora_" in k]
        base = [k for k in state if ".lora_" not in k]
        res[name]["adapters"] = len(adapters)
        res[name]["base_unchanged"] = all(C.torch.equal(state[k], init[k]) for k in base)
        res[name]["adapters_moved"] = min(float((state[k] - init[k]).abs().max()) for k in adapters)
        res[name]["adapter_max_diff_vs_dp2"] = max(float((state[k] - trained["dp2"][k]).abs().max()) for k in adapters)
        res[name]["adapter_scale"] = max(float(state[k].abs().max()) for k in adapters)
    C.dump(out / "lora.json", res)


if __name__ == "__main__":
    main(C.start(sys.argv))
    C.dist.destroy_process_group()
