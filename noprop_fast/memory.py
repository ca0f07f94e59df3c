"""Memory figures: the CUDA allocator's peak, or on a CPU the activation bytes autograd saved for
backward, each storage once (docs/usage.md, "The comparison report")."""
import torch


class SavedTensorBytes:
    """Context manager: `.bytes` is the size of the distinct storages autograd saved inside it."""

    def __init__(self, exclude=()):
        """exclude: tensors (a model's parameters and buffers) whose storages are not counted."""
        self._storages: dict[tuple, int] = {}
        self._excluded = {self._key(t) for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        storage = tensor.untyped_storage()
        return storage.device.type, storage.data_ptr()

    def _pack(self, tensor: torch.Tensor):
        key = self._key(tensor)
        if key not in self._excluded:
            self._storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def memory_kind(device: torch.device) -> str:
    return "cuda_peak_allocated" if device.type == "cuda" else "cpu_saved_for_backward"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
