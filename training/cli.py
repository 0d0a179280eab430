"""`vlm train`: contrastive training from a JSON or YAML config with dotted overrides.

    vlm train --config run.yaml optim.lr=1e-3 data.batch_size=512
    accelerate launch --multi_gpu -m vlm train --config run.yaml      (several GPUs)
    torchrun --nproc_per_node 2 -m vlm train --config run.yaml        (several CPU processes, gloo)

On CPU, `accelerate launch --cpu --num_processes N` starts several processes only through mpirun;
torchrun starts them directly, and accelerate picks the gloo backend up from its environment.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["train_main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm train",
        description="Train a CLIP model on image-text pairs. Rerunning with the same output_dir resumes "
        "from its latest checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: vlm train --config training/configs/digits.yaml schedule.steps=200 output_dir=runs/d",
    )
    parser.add_argument("--config", default=None, help="a JSON or YAML file of TrainConfig keys")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-3")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def train_main(argv: list[str]) -> int:
    """`vlm train`: trains per the config and overrides, prints the steps, time, final loss and metrics
    (main process only) and the saved model's folder. `--print-config` prints the resolved config and
    stops. Returns 0, or 1 when the loss stayed non-finite or the data was mostly unreadable (no model is
    saved then)."""
    args = _parser().parse_args(argv)
    from .config import config_to_dict, load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    from .data_skips import UnreadableDataError
    from .loop import NonFiniteLossError, train

    try:
        result = train(config)
    except (NonFiniteLossError, UnreadableDataError) as err:
        print(f"vlm train: error: {err}", file=sys.stderr)
        return 1
    from .distributed import rank

    if rank() == 0:
        print(f"trained {result.step} steps in {result.seconds:.1f} s; final loss {result.loss:.4f}")
        for key, value in result.metrics.items():
            print(f"  {key}: {value:.4f}")
        if result.skipped_samples:
            print(f"  skipped samples: {result.skipped_samples}")
        print(f"model: {result.model_dir}")
    return 0
