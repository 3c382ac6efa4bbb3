"""Rank discovery under every launcher we support, then one `deepspeed.init_distributed` with our timeout.

torch.distributed's env:// rendezvous needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Who sets
them depends on how the processes were started:

1. `deepspeed` launcher, torchrun, or a hand-set environment: RANK and WORLD_SIZE are already there.
2. `srun` (one task per GPU, slurm/train.sbatch): SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS. Only a
   job *step* has SLURM_STEP_NUM_TASKS; the batch script itself also carries SLURM_PROCID=0 and SLURM_NTASKS, and
   a plain `python train.py` there must stay one process. MASTER_ADDR is the step's first node (127.0.0.1 when
   the step has one node); MASTER_PORT is derived from the job and step ids, so every task computes the same
   one without talking to the others.
3. `mpirun` / `mpiexec` (Open MPI, MPICH, Intel MPI: OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK): mpi4py gives
   rank and size; rank 0 picks a free port and broadcasts it with its address.
4. Nothing: one process (`python train.py --config ...` for debugging) on 127.0.0.1 and a free port.

DeepSpeed's own MPI discovery is switched off: it imports mpi4py even for one process, which is exactly how a
plain `python train.py` used to die (ModuleNotFoundError: mpi4py).

DeepSpeed's CPU backend JIT-builds its shared-memory all-reduce op at init (torch.utils.cpp_extension). torch
serialises concurrent builds with a bare `lock` file in the build directory that only the builder removes: a
process killed while it held it (a SIGKILLed rank, a cancelled job, a test timeout) leaves it behind, and every
later run waits on it forever before its first log line. `load_jit_op` takes a kernel lock (flock, released
when its holder dies) around the load, so a `lock` file found while holding it is known stale and is removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

log = logging.getLogger("r2d2ds")


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "env" | "slurm" | "mpi" | "single"


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("node[01-04],gpu7" -> "node01"): `scontrol show hostnames` is the
    one parser that knows every syntax; without scontrol a plain list is split by hand."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if "[" in nodelist:
        raise RuntimeError(f"cannot expand Slurm node list {nodelist!r}: scontrol is not on PATH; "
                           "set MASTER_ADDR")
    return nodelist.split(",")[0]


def _slurm(env: dict[str, str]) -> Launch:
    rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
    local = int(env.get("SLURM_LOCALID", "0"))
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        addr = "127.0.0.1" if nodes == 1 or not nodelist else _first_slurm_host(nodelist)
    if env.get("MASTER_PORT"):
        port = int(env["MASTER_PORT"])
    else:
        # 10000..29999 by job and step, so two jobs (or two steps of one job) on a node do not collide.
        port = 10000 + (int(env.get("SLURM_JOB_ID", "0")) * 16 + int(env.get("SLURM_STEP_ID", "0"))) % 20000
    return Launch(rank, world, local, addr, port, "slurm")


def _mpi(env: dict[str, str]) -> Launch:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("started by mpirun (found " + ", ".join(k for k in _MPI_VARS if k in env) +
                           ") but mpi4py is not installed: `pip install mpi4py` (needs an MPI, e.g. Debian's "
                           "openmpi-bin libopenmpi-dev; scripts/env.sh installs both)") from e
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    if rank == 0:
        addr = env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else _free_port(addr)
        info = (addr, port)
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    comm.Barrier()
    return Launch(rank, world, local, addr, port, "mpi")


_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def discover(env: dict[str, str] | None = None) -> Launch:
    """Who this process is, from the launcher's environment (see the module docstring for the order)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        if env.get("MASTER_PORT"):
            port = int(env["MASTER_PORT"])
        elif world == 1:
            port = _free_port()
        else:
            raise RuntimeError(f"RANK={rank} and WORLD_SIZE={world} are set but MASTER_PORT is not: every rank "
                               "must be told the same rendezvous port")
        return Launch(rank, world, local, addr, port, "env")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return _slurm(env)
    if any(k in env for k in _MPI_VARS):
        return _mpi(env)
    return Launch(0, 1, 0, env.get("MASTER_ADDR") or "127.0.0.1", _free_port(), "single")


def init_distributed(timeout_s: float) -> Launch:
    """Discover the ranks, export them for torch.distributed's env:// rendezvous, and initialise the default
    process group through DeepSpeed with `timeout_s` on every collective (gloo and NCCL honour it: a dead or
    stuck peer makes the others fail after at most that long instead of hanging)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    info = discover()
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    if get_accelerator().communication_backend_name() == "nccl":
        # NCCL only enforces the timeout when asynchronous error handling is on (torch's default in recent
        # versions; set explicitly for older ones).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        # This rank's GPU now, as the engine sets it later: collectives before the engine exists (the resume's
        # checkpoint choice) run on the current CUDA device, which is otherwise cuda:0 on every rank of a node.
        # A task that sees fewer GPUs than its local rank (one GPU per task) keeps its only device.
        import torch

        if info.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(info.local_rank)
    _load_shm_comm_op()  # before DeepSpeed builds it unguarded (its builder caches the loaded module)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), verbose=False)
    _unlink_shm_workspace(info)
    return info


def _unlink_shm_workspace(info: Launch) -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce workspace once every rank has mapped it.

    DeepSpeed's CPU backend creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (~66 MB) at
    init and never unlinks it, so every CPU run leaked that much RAM per rank until reboot (seen: gigabytes after
    a test session). After the barrier every rank has opened every peer's segment (DeepSpeed's initialise waits
    for that), so unlinking the name keeps the mappings valid and frees the memory when the processes exit."""
    import torch.distributed as dist

    if dist.get_backend() != "gloo":
        return
    if info.world_size > 1:
        dist.barrier()  # on every rank whether or not its segment exists: a barrier must never be one-sided
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{info.master_addr}_{info.master_port}_{info.rank}"
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def load_jit_op(builder):
    """`builder.load()` for a DeepSpeed op builder, safe against a build lock left by a killed process.

    Every r2d2ds process holds an exclusive flock on the op's `<build dir>/.r2d2ds.flock` while it loads that
    op (one per op: a long build of one never holds up the others), and torch's `lock` file only exists while
    some process builds. So a `lock` seen while we hold the flock was left by a builder that died (the kernel
    dropped its flock; nothing else would ever remove the file).
    A process outside r2d2ds building the same op at that moment would lose its lock; sharing a
    TORCH_EXTENSIONS_DIR with such tools while training starts is not supported."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get(builder.name, False):  # pre-built at install: no JIT, no lock
        return builder.load()
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with open(build_dir / ".r2d2ds.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if we die, unlike torch's lock file
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing the stale JIT build lock '%s' (left by a process killed while building %s)",
                        stale, builder.name)
            stale.unlink(missing_ok=True)
        return builder.load()


def _load_shm_comm_op() -> None:
    """Load the op DeepSpeed's CPU backend builds at init (`deepspeed.comm.torch.build_shm_op`), guarded."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        load_jit_op(builder)
