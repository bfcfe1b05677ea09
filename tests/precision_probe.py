"""Test helper: train a config exactly as synergy-train does (Trainer.fit: steps and the final checkpoint), and
print as one JSON line what precision the DeepSpeed engine really used.

    precision_probe.py --config C

Printed: "float32_modules" {parameter name: dtype} of the float32 policy's parameters (model/precision.py)
in engine.module after training; "other_dtypes" the dtypes of every other parameter; "compute" the output
dtypes of the byte head (the bulk of the model), of the first stage-0 encoder layer's mixer and of the first
router projection / residual in the first step;
"ds_precision" the precision sections of the DeepSpeed config.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()

    import torch.distributed as dist

    from synergy_dist.config import load_config
    from synergy_dist.model.precision import Float32Linear, float32_names
    from synergy_dist.train.trainer import Trainer

    trainer = Trainer(load_config(args.config, []))
    module = trainer.engine.module
    compute: dict[str, str] = {}

    def recorder(name: str):
        def record(_module, _args, output):
            compute.setdefault(name, str(output.dtype))
        return record

    module.head.register_forward_hook(recorder("head"))
    module.body.encoder.blocks[0].mixer.register_forward_hook(recorder("encoder"))
    for name, sub in module.named_modules():
        if isinstance(sub, Float32Linear):
            sub.register_forward_hook(recorder(name))
    status = trainer.fit()
    kept = float32_names(module)
    params = dict(module.named_parameters())
    print(json.dumps({
        "float32_modules": {name: str(p.dtype) for name, p in params.items() if name in kept},
        "other_dtypes": sorted({str(p.dtype) for name, p in params.items() if name not in kept}),
        "compute": compute,
        "ds_precision": {k: trainer.ds_config[k] for k in ("bf16", "fp16", "torch_autocast") if k in trainer.ds_config},
    }), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
