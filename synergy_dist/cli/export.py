"""`synergy-export RUN_DIR|CHECKPOINT_DIR --output DIR [--format native|hf] [--dtype fp32|bf16]`

--format native (default): DIR/model.safetensors (one consolidated state dict: experts of every
expert-parallel rank merged, ZeRO-3 partitions gathered) and DIR/config.yaml (the training config; its
`model` section rebuilds the network). Load it without DeepSpeed, or pass it to synergy-eval / synergy-generate:

    from synergy_dist.loading import load_model
    model, cfg, _ = load_model("DIR")     # a SynergyLM in eval mode, expert_parallel_size=1

--format hf: a Hugging Face transformers directory (float32 weights, byte tokenizer, the model's own source)
that loads where transformers is installed, without this project or DeepSpeed:

    AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)
    AutoTokenizer.from_pretrained("DIR", trust_remote_code=True)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synergy_dist.checkpoint.safe_load import UnsafeCheckpointError
from synergy_dist.export import EXPORT_CONFIG, EXPORT_WEIGHTS, FORMATS, ExportError, export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synergy-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="run directory (newest complete checkpoint) or checkpoint directory")
    parser.add_argument("--output", type=Path, required=True, help="directory to write")
    parser.add_argument("--format", default="native", choices=FORMATS,
                        help="native (default: synergy-eval, synergy-generate read it) or hf (transformers)")
    parser.add_argument("--dtype", default="fp32",
                        help="fp32 (default) or bf16 (native only; routers, residual projections and expert gates "
                             "stay fp32)")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.output, args.dtype, args.format)
    except (ExportError, UnsafeCheckpointError) as err:
        print(f"synergy-export: {err}", file=sys.stderr)
        return 2
    if args.format == "hf":
        print(f"synergy-export: wrote a transformers model to {out} "
              "(AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True))")
    else:
        print(f"synergy-export: wrote {out / EXPORT_WEIGHTS} and {out / EXPORT_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
