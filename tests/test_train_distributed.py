"""Two gloo processes on CPU under accelerate give the loss and gradients of one process on the
global batch.

The test launches this file with torchrun (what `accelerate launch --multi_gpu` runs underneath);
each process saves its loss and its gradients after DistributedDataParallel's averaging, and the
test compares them with one process on the whole batch.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

REPO = Path(__file__).parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
GLOBAL_BATCH = 8

# name -> (LossConfig fields, rows rank 1 drops as if they were bad samples)
VARIANTS = {
    "clip_local_chunked": (dict(kind="clip", local_loss=True, chunk_size=3), 0),
    "clip_full_matrix": (dict(kind="clip", local_loss=False, chunk_size=0), 0),
    "clip_accumulated": (dict(kind="clip", local_loss=True, chunk_size=3, accum_steps=2), 0),
    "clip_uneven_batches": (dict(kind="clip", local_loss=True, chunk_size=2), 1),
    "siglip_local_chunked": (dict(kind="siglip", local_loss=True, chunk_size=3), 0),
    "siglip_full_matrix": (dict(kind="siglip", local_loss=False, chunk_size=0), 0),
}


def _global_batch():
    from conftest import make_text

    g = torch.Generator().manual_seed(123)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    return images, make_text(GLOBAL_BATCH, 32, [3 + (5 * i) % 11 for i in range(GLOBAL_BATCH)])


def _model(kind):
    import vlm

    torch.manual_seed(0)
    return vlm.create_model("tiny-siglip" if kind == "siglip" else "tiny")


def _rows(rank, world, drop):
    local = GLOBAL_BATCH // world
    rows = list(range(rank * local, (rank + 1) * local))
    return rows[: len(rows) - drop] if rank == world - 1 else rows


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(out_dir: Path) -> None:
    from accelerate import Accelerator

    from training.config import LossConfig
    from training.grad_cache import loss_and_gradients

    from vlm.distributed import dist_info

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2 and torch.distributed.get_backend() == "gloo"
    assert dist_info() == (rank, world)
    images, texts = _global_batch()
    for name, (fields, drop) in VARIANTS.items():
        model = accelerator.prepare(_model(fields["kind"]))
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        rows = _rows(rank, world, drop)
        value = loss_and_gradients(model, images[rows], texts[rows], LossConfig(**fields), accelerator)
        torch.save(
            {"loss": value.value, "grads": _grads(accelerator.unwrap_model(model))}, out_dir / f"{name}_{rank}.pt"
        )


def _torchrun(args, env_extra=None, timeout=300, accelerate_use_cpu=True):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    if accelerate_use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    _torchrun([__file__, str(tmp_path)])
    check_ranks_equal_one_process(tmp_path)


def check_ranks_equal_one_process(out_dir: Path, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Each rank's saved loss and gradients (`_worker`'s files in `out_dir`) equal one process's on the
    whole (surviving) global batch with the plain unchunked loss, for every variant."""
    from accelerate import Accelerator

    from training.config import LossConfig
    from training.grad_cache import loss_and_gradients

    accelerator = Accelerator(cpu=True)
    images, texts = _global_batch()
    for name, (fields, drop) in VARIANTS.items():
        keep = _rows(0, 2, drop) + _rows(1, 2, drop)
        model = _model(fields["kind"])
        plain = LossConfig(kind=fields["kind"], local_loss=False, chunk_size=0)
        ref = loss_and_gradients(model, images[keep], texts[keep], plain, accelerator)
        ref_grads = _grads(model)
        for rank in range(2):
            got = torch.load(out_dir / f"{name}_{rank}.pt")
            assert abs(got["loss"] - ref.value) < 1e-5, (name, rank, got["loss"], ref.value)
            for param, grad in ref_grads.items():
                torch.testing.assert_close(
                    got["grads"][param], grad, atol=atol, rtol=rtol, msg=f"{name} {rank} {param}"
                )


@pytest.mark.slow
def test_vlm_train_with_two_processes_matches_one(tmp_path):
    """`vlm train` under a two-process launch: the run directory is complete and the weights after
    two steps equal those of a one-process run on the same global batches."""
    import vlm
    from vlm.cli import main

    data = write_pairs(tmp_path / "data", 16)
    common = [
        f"data.train={data}",
        f"data.eval={data}",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.name=tiny",
        "schedule.steps=2",
        "schedule.warmup_steps=1",
        "checkpoint.every=1",
        "logging.progress=false",
        "logging.plot=false",
        "eval.every=2",
        f"eval.zeroshot={data}",
        "eval.templates=['a {} square']",
    ]
    _torchrun(["-m", "vlm", "train", *common, f"output_dir={tmp_path / 'two'}"])
    assert main(["train", *common, f"output_dir={tmp_path / 'one'}"]) == 0
    import json

    state = json.loads((tmp_path / "two" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["positions"] == [{"epoch": 0, "step": 2}] * 2 and state["samples_seen"] == 16
    two, one = vlm.load(tmp_path / "two" / "model").state_dict(), vlm.load(tmp_path / "one" / "model").state_dict()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2] and "eval/zeroshot_top1" in rows[-1]


@pytest.mark.slow
def test_plain_torchrun_on_cpu_is_one_run_of_two_processes(tmp_path):
    """The README's `torchrun --nproc_per_node 2 -m vlm train ...` as typed on a machine without a GPU (no
    ACCELERATE_USE_CPU): one process logs each step once, and the checkpoint holds both processes."""
    import json

    data = write_pairs(tmp_path / "data", 8)
    args = [f"data.train={data}", "data.batch_size=4", "data.num_workers=0", "model.name=tiny", "schedule.steps=2"]
    args += ["schedule.warmup_steps=1", "checkpoint.every=2", "logging.progress=false", "logging.plot=false"]
    # No GPU visible even where there is one: the machine this launch went wrong on.
    _torchrun(["-m", "vlm", "train", *args, f"output_dir={tmp_path / 'run'}"], {"CUDA_VISIBLE_DEVICES": ""}, accelerate_use_cpu=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["samples"] == 8
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["positions"] == [{"epoch": 0, "step": 2}] * 2
    assert (tmp_path / "run" / "model").is_dir()


def test_one_rank_rule_for_training_and_indexing(monkeypatch, tmp_path):
    import torch.distributed as dist

    from retrieval import embedding_job
    from training import distributed
    from vlm.distributed import dist_info

    assert embedding_job.dist_info is dist_info
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_info() == (0, 1) and (distributed.rank(), distributed.world_size()) == (0, 1)
    monkeypatch.setenv("RANK", "1")  # what torchrun sets before any process group exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist_info() == (1, 2) and (distributed.rank(), distributed.world_size()) == (1, 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist_info() == (0, 1)  # an initialised process group is the authority
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
