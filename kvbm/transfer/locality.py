"""Can this process open a peer's CUDA IPC handles? The answer the transfer agent advertises as
`KvAgentInfo.host_id`: two agents may use CUDA IPC only when their host_ids are equal.

A host_id is `<machine>|gpu:<domain>`:

- `machine` is the hostname and the kernel's boot id: the same machine (and boot);
- `domain` is a fingerprint of what CUDA IPC between two processes of that machine also needs:
  the IPC namespace and the /dev/shm device (torch's reduction passes a reference-count file
  in shared memory by name), the GPUs the process sees, in CUDA index order (torch rebuilds a
  handle on the exporter's device *index*: the same index must name the same GPU on both
  sides, and the peer's GPU must be visible here at all), and the PID namespace. The last is
  conservative: UCX's CUDA IPC has been reported to fail across PID namespaces ("invalid device
  context"), while torch's handles opened across `unshare --pid` on an H100 here
  (tests/unit/kvbm/transfer/test_same_host_cuda.py); such peers lose the fast path, never
  correctness. Handles that fail to open anyway are caught by the agent's fallback.

Hostname and boot id alone are not enough: containers with host networking (ECS tasks, a
`network_mode: host` compose service) share both, yet each sees only its own GPUs and lives in
its own PID and IPC namespaces, so a decision on the machine alone picks CUDA IPC between
processes that cannot open each other's memory, and every transfer fails. With the domain in
the host_id such peers compare unequal and the agent picks NIXL or host transfer for them from
the first request on (agent.KvTransferAgent.choose_backend logs it once per peer).

The GPU list is the devices' UUIDs when the caller has CUDA up (the agent does, when its KV
cache is on a GPU); otherwise the visibility inputs themselves: CUDA_VISIBLE_DEVICES,
NVIDIA_VISIBLE_DEVICES and the /dev/nvidiaN nodes present. Two processes with different
inputs compare unequal even where they would name the same GPUs: that costs the fast path,
never correctness.

Closer still, `process_token()`: agents of one process (prefill and decode workers of one
`dynamo.serve`) are not CUDA IPC peers at all (the driver will not open a process's own
handles); the same-process backend copies between their tensors directly, and it is offered
only where the peer's advertised token equals this process's."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

DOMAIN_SEP = "|gpu:"

__all__ = ["DOMAIN_SEP", "GpuDomain", "local_host_id", "machine_id", "process_token", "split_host_id"]


def machine_id() -> str:
    """Hostname and boot id: equal for two processes on one machine since its last boot."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    try:
        boot_id = boot.read_text().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


def _namespace(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")  # e.g. "pid:[4026531836]"
    except OSError:
        return f"{kind}:?"


def _shm_device() -> str:
    try:
        st = os.stat("/dev/shm")
    except OSError:
        return "?"
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def _cuda_gpus() -> tuple[str, ...]:
    import torch

    out = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            out.append(f"GPU-{uuid}")
        else:  # an older torch: the PCI location names the device as well
            out.append(f"{props.name}@{getattr(props, 'pci_domain_id', '?')}:"
                       f"{getattr(props, 'pci_bus_id', '?')}:{getattr(props, 'pci_device_id', '?')}")
    return tuple(out)


def _visibility_inputs() -> tuple[str, ...]:
    dev_nodes = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
    return (
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}",
        f"NVIDIA_VISIBLE_DEVICES={os.environ.get('NVIDIA_VISIBLE_DEVICES', '<unset>')}",
        "dev=" + ",".join(dev_nodes),
    )


@dataclass(frozen=True, slots=True)
class GpuDomain:
    """What two processes of one machine must share for CUDA IPC between them."""

    pid_ns: str
    ipc_ns: str
    shm_dev: str
    gpus: tuple[str, ...]

    @classmethod
    def current(cls, cuda: bool = False) -> GpuDomain:
        """This process's domain; `cuda`: CUDA is initialised here, list the GPUs' UUIDs."""
        return cls(_namespace("pid"), _namespace("ipc"), _shm_device(),
                   _cuda_gpus() if cuda else _visibility_inputs())

    def fingerprint(self) -> str:
        text = "\n".join([self.pid_ns, self.ipc_ns, self.shm_dev, *self.gpus])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def local_host_id(cuda: bool = False) -> str:
    """This process's host_id (see the module docstring)."""
    return f"{machine_id()}{DOMAIN_SEP}{GpuDomain.current(cuda).fingerprint()}"


def split_host_id(host_id: str) -> tuple[str, str]:
    """(machine, GPU domain); a host_id without a domain (an older peer) has domain ""."""
    machine, _, domain = host_id.partition(DOMAIN_SEP)
    return machine, domain


_PROCESS_NONCE = uuid.uuid4().hex


def process_token() -> str:
    """Names this process (machine, PID and a nonce drawn at import, so neither a reused PID
    nor a forked child that inherited the module compares equal): two agents with equal tokens
    live in one process and can copy into each other's KV tensors directly, with no CUDA IPC
    (which cannot open a process's own handles) and no host staging (kvbm/transfer/local.py)."""
    return f"{machine_id()}|pid:{os.getpid()}|{_PROCESS_NONCE}"
