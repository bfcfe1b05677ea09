"""Test helper: resume a run like `synergy-train --config C`, but first record what the resume restored.

    [torchrun ...] elastic_probe.py --config C --dump DIR

After the Trainer has resumed (before the first step) every rank writes DIR/rank_<r>.pt:
    params:  {this rank's parameter name: {"fp32", "exp_avg", "exp_avg_sq"}} read back through DeepSpeed's
             own accessors (safe_get_full_*), i.e. what the optimizer will really use
    steps:   the Adam step counts (of every optimizer group under ZeRO-1/2, of every parameter under ZeRO-0)
    ep_rank: this rank's expert-parallel rank
then it trains on to train.max_steps exactly as synergy-train does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def restored_state(trainer) -> dict:
    from deepspeed.utils import groups, safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine, params = trainer.engine, {}
    if trainer.cfg.deepspeed.zero_stage == 0:  # plain torch optimizer: state per parameter
        optimizer = engine.optimizer
        for name, param in engine.module.named_parameters():
            state = optimizer.state[param]
            params[name] = {"fp32": param.detach().clone(), "exp_avg": state["exp_avg"].clone(),
                            "exp_avg_sq": state["exp_avg_sq"].clone()}
        steps = [optimizer.state[p]["step"].clone() for group in optimizer.param_groups for p in group["params"]]
    else:  # ZeRO-1/2: flat partitions, read through DeepSpeed's accessors (collectives, same order on every rank)
        for name, param in engine.module.named_parameters():
            params[name] = {"fp32": safe_get_full_fp32_param(param).clone(),
                            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").clone(),
                            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").clone()}
        zero = engine.optimizer
        steps = [zero.optimizer.state[group["params"][0]]["step"].clone() for group in zero.optimizer.param_groups]
    ep = trainer.cfg.deepspeed.expert_parallel_size
    return {"params": params, "steps": steps, "ep_rank": groups._get_expert_parallel_rank(f"ep_size_{ep}")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--dump", required=True)
    args = parser.parse_args()
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as synergy-train does

    import torch
    import torch.distributed as dist

    from synergy_dist.config import load_config
    from synergy_dist.train.trainer import Trainer

    trainer = Trainer(load_config(args.config, []))
    torch.save(restored_state(trainer), Path(args.dump) / f"rank_{trainer.rank}.pt")
    status = trainer.fit()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
