"""Fine-tuning under a two-process launch (gloo on CPU, what `accelerate launch` runs on several GPUs)
reaches the weights of one process on the same global batches, with augmentation, mixup and cutmix on.

The test launches this file with torchrun; rank 0 saves the fine-tuned classifier's weights and the
loss history, and the test compares them with a one-process run in the test process.
"""

import sys
from pathlib import Path

import pytest
import torch
from test_finetune import _write_colours
from test_train_data import one_thread  # noqa: F401  (fixture)
from test_train_distributed import _torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

# batch 10 over 24 images: the last global batch of each epoch has 4 rows, 2 per process.
COMMON = ("recipe.epochs=2", "optim.lr=1e-3", "recipe.batch_size=10", "recipe.warmup_steps=1", "augment.affine=true")
CONFIGS = {
    "full": ("recipe.mode=full", *COMMON, "recipe.label_smoothing=0.1", "augment.mixup_alpha=0.4", "augment.cutmix_alpha=1.0"),
    # CLIP's beta2 and eps: with fine-tuning's eps 1e-8, Adam turns the round-off of near-zero gradients
    # (summed in another order by two processes) into differences above the tolerance.
    "flyp": ("recipe.mode=flyp", *COMMON, "optim.beta2=0.98", "optim.eps=1e-6"),
}


def _run(data: Path, name: str):
    from training.classifier import load_images
    from training.finetune import finetune
    from training.finetune_config import load_finetune_config
    from vlm.data import labelled_folder
    from vlm.model import create_model

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    train = load_images(labelled_folder(data), model.config)
    return finetune(model, train, load_finetune_config(None, [*CONFIGS[name], "logging.progress=false"]))


def _worker(data: Path, out_dir: Path) -> None:
    from training.distributed import rank, world_size

    for name in CONFIGS:
        result = _run(data, name)
        assert world_size() == 2
        if rank() == 0:
            torch.save({"losses": result.losses, "state": result.classifier.state_dict()}, out_dir / f"{name}.pt")


@pytest.mark.slow
def test_two_processes_fine_tune_to_the_weights_of_one(tmp_path):
    _write_colours(tmp_path / "data", 8, seed=0)
    _torchrun([__file__, str(tmp_path / "data"), str(tmp_path)])
    for name in CONFIGS:
        one = _run(tmp_path / "data", name)
        two = torch.load(tmp_path / f"{name}.pt")
        assert len(two["losses"]) == len(one.losses) == 6
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one.losses), atol=1e-5, rtol=1e-5)
        for key, value in one.classifier.state_dict().items():
            if key.endswith("k_proj.bias"):
                # Softmax ignores a bias added to every key: its true gradient is 0, so Adam's update
                # of it is round-off divided by round-off, different for any other summation order.
                continue
            torch.testing.assert_close(two["state"][key], value, atol=2e-5, rtol=1e-4, msg=f"{name} {key}")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))


@pytest.mark.slow
def test_vlm_finetune_under_a_two_process_launch(tmp_path):
    """`vlm finetune` under torchrun: the main process alone evaluates and writes, and the classifier it
    saves equals a one-process run's."""
    import json

    from training.classifier import ImageClassifier
    from vlm.cli import main
    from vlm.model import create_model

    _write_colours(tmp_path / "data" / "train", 8, seed=0)
    _write_colours(tmp_path / "data" / "test", 3, seed=1)
    torch.manual_seed(0)
    model_dir = create_model("tiny").save_pretrained(tmp_path / "model")
    common = ["finetune", str(tmp_path / "data"), "--model", str(model_dir), "--mode", "full", "--epochs", "2",
              "--batch-size", "10", "--lr", "1e-3", "--augment", "--sweep", "0,1", "--no-progress"]  # fmt: skip
    _torchrun(["-m", "vlm", *common, "--output", str(tmp_path / "two")])
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    two, one = ImageClassifier.from_pretrained(tmp_path / "two"), ImageClassifier.from_pretrained(tmp_path / "one")
    for key, value in one.state_dict().items():
        if not key.endswith("k_proj.bias"):  # see above
            torch.testing.assert_close(two.state_dict()[key], value, atol=2e-5, rtol=1e-4, msg=key)
    report = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert report["sweep"][-1]["accuracy"] == json.loads((tmp_path / "one" / "metrics.json").read_text())["sweep"][-1]["accuracy"]
