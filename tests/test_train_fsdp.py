"""`vlm train` under FSDP (training/configs/accelerate_fsdp.yaml): two gloo processes on CPU give the
losses and weights of one process, write checkpoints that `vlm.load` reads, and resume to the step.

The processes get the FSDP settings `accelerate launch --config_file training/configs/accelerate_fsdp.yaml`
would give them (read from the file by accelerate's own launcher code), through the torchrun launch of
tests/test_train_distributed.py.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)
from test_train_distributed import REPO, VARIANTS, _global_batch, _grads, _model, _rows, _torchrun, check_ranks_equal_one_process

CONFIG = REPO / "training" / "configs" / "accelerate_fsdp.yaml"
FSDP_FILE = "pytorch_model_fsdp.bin"  # accelerate's name for the full model of an FSDP checkpoint
pytestmark = pytest.mark.usefixtures("one_thread")


def fsdp_env(config: Path = CONFIG) -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file config` sets for its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "vlm", "train"])
    args = _validate_launch_command(args)[0]
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def _args(data: Path, out: Path, steps: int = 2) -> list[str]:
    return [
        f"data.train={data}",
        f"data.eval={data}",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.name=tiny",
        "loss.chunk_size=3",  # the chunked loss over the gathered global batch
        f"schedule.steps={steps}",
        "schedule.warmup_steps=1",
        "checkpoint.every=1",
        "checkpoint.keep=5",
        "logging.progress=false",
        "logging.plot=false",
        "eval.every=2",
        f"eval.zeroshot={data}",
        "eval.templates=['a {} square']",
        f"output_dir={out}",
    ]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4, msg=f"{what}: {key}")


def _worker(out_dir: Path) -> None:
    """One FSDP process: every loss variant's value and full gradients after one backward pass."""
    from torch.distributed.tensor import DTensor

    from training import fsdp
    from training.config import LossConfig
    from training.distributed import make_accelerator
    from training.grad_cache import loss_and_gradients

    accelerator = make_accelerator("no")
    assert fsdp.is_fsdp(accelerator) and accelerator.is_fsdp2 and torch.distributed.get_backend() == "gloo"
    rank = accelerator.process_index
    images, texts = _global_batch()
    for name, (fields, drop) in VARIANTS.items():
        model = _model(fields["kind"])
        model, _ = fsdp.prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))
        rows = _rows(rank, 2, drop)
        value = loss_and_gradients(model, images[rows], texts[rows], LossConfig(**fields), accelerator)
        fsdp.average_replicated_grads(accelerator, model)
        grads = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in _grads(model).items()}
        torch.save({"loss": value.value, "grads": grads}, out_dir / f"{name}_{rank}.pt")


@pytest.mark.slow
def test_fsdp_gradients_equal_one_process_on_the_global_batch(tmp_path):
    """tests/test_train_distributed.py's comparison under FSDP: every loss variant (chunked, full matrix,
    accumulated, uneven batches, SigLIP with its bias), the gradient of every parameter."""
    _torchrun([__file__, str(tmp_path)], fsdp_env())
    # FSDP reduces gradients in another order (reduce-scatter): a looser tolerance than DDP's
    check_ranks_equal_one_process(tmp_path, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-process FSDP run and a one-process run of the same two steps."""
    from vlm.cli import main

    root = tmp_path_factory.mktemp("fsdp")
    data = write_pairs(root / "data", 16)
    torch.set_num_threads(1)
    _torchrun(["-m", "vlm", "train", *_args(data, root / "fsdp")], fsdp_env())
    assert main(["train", *_args(data, root / "one")]) == 0
    return data, root / "fsdp", root / "one"


def test_the_config_asks_for_what_the_trainer_needs():
    env = fsdp_env()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "Block"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(fsdp_version=1), "fsdp_version: 2"),
        (dict(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT"), "FULL_STATE_DICT"),
    ],
)
def test_settings_that_cannot_work_are_refused(fields, message):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from training.fsdp import _check_plugin

    with pytest.raises(ValueError, match=message):
        _check_plugin(FullyShardedDataParallelPlugin(**fields))


def test_a_model_with_lora_adapters_is_refused():
    import vlm
    from training.fsdp import _check_plain
    from training.lora import LoraConfig, apply_lora

    model = vlm.create_model("tiny")
    _check_plain(model)
    apply_lora(model, LoraConfig(enabled=True), ("visual",))
    with pytest.raises(ValueError, match="model.lora.enabled"):
        _check_plain(model)


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process(runs):
    import vlm

    _, fsdp, one = runs
    rows, ref = _metrics(fsdp), _metrics(one)
    assert [r["step"] for r in rows] == [1, 2, 2] and "eval/zeroshot_top1" in rows[-1]
    for got, want in zip(rows, ref):
        for key in ("loss", "grad_norm", "logit_scale", "eval/zeroshot_top1"):
            if key in want:
                assert abs(got[key] - want[key]) < 1e-4 * max(1.0, abs(want[key])), (key, got, want)
    _close(vlm.load(fsdp / "model").state_dict(), vlm.load(one / "model").state_dict(), "final model")
    state = json.loads((fsdp / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["positions"] == [{"epoch": 0, "step": 2}] * 2 and state["samples_seen"] == 16


@pytest.mark.slow
def test_an_fsdp_checkpoint_loads_with_vlm_load(runs):
    import vlm
    from safetensors.torch import load_file

    _, fsdp, one = runs
    config = vlm.load(one / "model").config
    for step in (1, 2):
        name = f"step_{step:08d}"
        got = vlm.load(fsdp / "checkpoints" / name / FSDP_FILE, config=config).state_dict()
        _close(got, load_file(one / "checkpoints" / name / "model.safetensors"), name)


@pytest.mark.slow
def test_an_fsdp_run_resumes_to_the_step(runs, tmp_path):
    """Step 2 and the final model removed: the run resumes from step 1 and ends with the same weights."""
    import vlm

    data, fsdp, _ = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000002")
    shutil.rmtree(resumed / "model")
    proc = _torchrun(["-m", "vlm", "train", *_args(data, resumed)], fsdp_env())
    assert "resumed from" in proc.stderr
    got, want = vlm.load(resumed / "model").state_dict(), vlm.load(fsdp / "model").state_dict()
    assert got.keys() == want.keys()
    for key in want:  # bit-exact, as a DDP or one-process run resumes on CPU
        assert torch.equal(got[key], want[key]), key
    losses = [[r["loss"] for r in _metrics(run) if "loss" in r] for run in (resumed, fsdp)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
