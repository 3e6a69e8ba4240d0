"""LLaVA's own data format (a JSON list of {id, image?, conversations} plus an image folder) as a grain source."""
from __future__ import annotations

import json
import os


class LlavaJsonSource:
    """grain RandomAccessDataSource over a LLaVA JSON file: record i as a dict, plus 'image_bytes' (the encoded
    file named by its 'image' field, read from `image_folder`) or None for text-only samples and unreadable files.

    Records are held as compact JSON bytes, decoded on access: a 665K-sample file stays a few hundred MB per
    worker process, and a caller mutating a record cannot change the source.
    """

    def __init__(self, json_path: str | os.PathLike, image_folder: str | os.PathLike):
        self.json_path, self.image_folder = os.fspath(json_path), os.fspath(image_folder)
        with open(self.json_path) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{self.json_path}: expected a JSON list of LLaVA records, got {type(data).__name__}")
        self._records = [json.dumps(record, separators=(",", ":")).encode() for record in data]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = json.loads(self._records[int(index)])
        name = record.get("image")
        record["image_bytes"] = None
        if name is not None:
            try:
                with open(os.path.join(self.image_folder, name), "rb") as f:
                    record["image_bytes"] = f.read()
            except OSError:
                pass  # make_features skips the sample as "missing image" (counted), the run goes on
        return record

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.json_path!r}, {self.image_folder!r}, {len(self)} records)"
