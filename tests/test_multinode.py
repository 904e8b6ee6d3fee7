"""The multi-machine launch path, as far as one machine allows: configs/slurm_train.sh with srun and scontrol
standing in for SLURM's, one node of two CPU processes, through configs/accelerate_multinode.yaml and the same
`accelerate launch` as on a cluster."""

from __future__ import annotations

import json
import os

import datasets

from tests.test_train import ENV, _free_port, bmmc, run_two_processes  # noqa: F401 -- bmmc is a fixture
from tests.translator_fixtures import tiny_args
from translator import CellTranslator

FAKE_SRUN = """#!/bin/bash
# srun on one node: drop srun's own options, run the command as node 0.
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo 127.0.0.1
"""


def test_slurm_script_launches_two_processes_through_the_multinode_config(bmmc, tmp_path):  # noqa: F811
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    out = tmp_path / "model"
    flags = tiny_args(*bmmc, out, "--max_steps", "4", "--checkpointing_steps", "0", "--calibration_cells", "0",
                      "--streaming")[6:]  # the three folders are the script's own arguments
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_JOB_NODELIST": "node1", "MAIN_PORT": str(_free_port())}
    run_two_processes(["bash", "configs/slurm_train.sh", str(bmmc[0]), str(bmmc[1]), str(out), *flags], out, env)  # both ranks, in step
    args = json.loads((out / "training_args.json").read_text())
    assert args["num_processes"] == 2 and args["streaming"] is True and args["completed_steps"] == 4
    translator = CellTranslator.from_pretrained(out)
    cells = datasets.load_from_disk(str(bmmc[0]))["validation"].select(range(3))
    assert translator.predict_matrix(cells["gex_text"], "gex2atac").shape == (3, len(translator.meta["peaks"]))
