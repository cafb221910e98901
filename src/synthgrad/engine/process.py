"""A stage process's surroundings: its cores, threads, memory, device and the links' backend."""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_stage(threads: int | None, local_world: int) -> int:
    """`threads` if given, else this machine's cores divided among its stage processes."""
    return threads or max(1, available_cores() // local_world)


def link_backend(device: str, local_world: int) -> str:
    """NCCL when every local stage has a GPU of its own; otherwise gloo, through host memory."""
    if device.startswith("cuda") and torch.cuda.device_count() >= local_world:
        return "nccl"
    return "gloo"


def stage_device(device: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK (modulo the GPUs) for a CUDA run; the CPU otherwise."""
    if not device.startswith("cuda"):
        return torch.device("cpu")
    d = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    torch.cuda.set_device(d)
    return d


def keep_freed_memory() -> None:
    """glibc: keep the memory a step frees for the next step, instead of handing it back to the OS.

    A stage step frees and reallocates the same multi-MB tensors (activations, gradients, messages).
    With glibc's default thresholds, a stage process (which allocates from several threads) returned
    them to the OS after every step and page-faulted them back in on the next: about 2,000 page faults
    a step per process and 15% of the CPU time in the kernel (fcn-4, width 1024, 2 stages), where
    single-process training has almost none. Fixed thresholds keep up to 256 MiB of freed memory in
    the process. A no-op where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's documented maximum; a larger block (a data set) is mapped
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


def pin_to_cores(local_rank: int, local_world: int, threads: int) -> set[int] | None:
    """Pin this stage process to its own `threads` cores: local rank r takes the r-th block of the cores it may use.

    A stage's send and receive threads then run beside its own compute thread instead of waking up on the
    core where another stage computes: +6% samples/s for fcn-4 width 1024 on 2 cores (5,375 -> 5,687,
    median of 3 runs each). Skipped (None) when the blocks do not fit the available cores, or when
    SYNTHGRAD_PIN_CORES=0.
    """
    if os.environ.get("SYNTHGRAD_PIN_CORES", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if local_world * threads > len(cores):
        return None
    mine = set(cores[local_rank * threads:(local_rank + 1) * threads])
    os.sched_setaffinity(0, mine)
    return mine


def set_up_stage_process(local_rank: int, local_world: int, threads: int) -> None:
    """What every stage process does first: keep freed memory, take its own cores, use `threads` torch threads."""
    keep_freed_memory()
    pin_to_cores(local_rank, local_world, threads)
    torch.set_num_threads(threads)
