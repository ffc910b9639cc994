"""Data-parallel fine-tuning (pamfx.distributed): two gloo processes on the CPU build the network that one process
builds with the same global batches, and both ranks end with the same network."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pamfx
from conftest import make_models, random_data
from pamfx import distributed
from pamfx.passes.finetune import FinetuneConfig
from pamfx.passes.merge_pam import PamConfig
from pamfx.passes.prune import PruneConfig

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
              pytest.mark.filterwarnings("ignore::pamfx.PamfxWarning")]

TASKS = ("a", "b")
# lenet5 has no BatchNorm and no dropout, so the 2-process steps equal the 1-process steps up to rounding
OPTIONS = dict(merge="pam", prune="taylor", tolerance=1.0, progress=False,
               pam=PamConfig(alpha_conv=0.3, alpha_linear=0.5, relative=True, samples=32),
               finetune=FinetuneConfig(steps=5, batch_size=32),
               pruning=PruneConfig(step_steps=5, final_steps=5, max_steps=3, importance_batches=2, batch_size=32))


def run_optimize():
    """The same tiny optimize in every process; returns the merged network's outputs on fixed inputs."""
    torch.set_num_threads(1)
    models = make_models("lenet5", TASKS)
    result = pamfx.optimize(models, random_data(TASKS, n=96, seed=1), eval_data=random_data(TASKS, n=64, seed=2),
                            **OPTIONS)
    with torch.no_grad():
        return result.model(torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5)))


WORKER = """
import sys, warnings
import torch, torch.distributed as dist
sys.path[:0] = [{tests!r}]
warnings.simplefilter("ignore")
rank, out = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
from test_distributed import run_optimize
from pamfx import distributed
assert distributed.is_distributed() and distributed.rank() == rank and distributed.world_size() == 2
torch.save(run_optimize(), out)
dist.destroy_process_group()
"""


def test_helpers_in_one_process():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    x = torch.arange(6)
    assert distributed.shard(x) is x


def test_two_processes_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), store=str(tmp_path / "store")))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / f"out{rank}.pt")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for rank in range(2)]
    logs = [w.communicate(timeout=120)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)
    ranks = [torch.load(tmp_path / f"out{rank}.pt") for rank in range(2)]
    single = run_optimize()
    assert set(ranks[0]) == set(ranks[1]) == set(single) == set(TASKS)
    for task in TASKS:
        torch.testing.assert_close(ranks[1][task], ranks[0][task], atol=0, rtol=0)   # every rank: one network
        # the all-reduce sums gradients in another order: rounding, which the fine-tuning steps grow to ~1.5e-4
        torch.testing.assert_close(ranks[0][task], single[task], atol=5e-4, rtol=0)
