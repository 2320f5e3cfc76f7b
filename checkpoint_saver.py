"""Best-LTA checkpoint registry: the top-k policies ever trained for each problem instance.

Researchers train many PPO runs on the same problem instance and want "the best policy we
ever trained for instance X". Each time the trainer measures an average long-term-average
(LTA) return it calls ``CheckpointSaver.submit``; the checkpoint is written only if its score
is among the ``top_k`` best ever submitted for that instance, across all runs and processes.

Layout on disk::

    ROOT/<instance>/index.json        JSON list of entries, best first
    ROOT/<instance>/<run>-step<N>-<id>.pt
    ROOT/<instance>/index.json.lock   inter-process lock

Each index entry holds ``score``, ``file`` (name inside the folder), ``run_name``,
``global_step``, ``created`` (``time.time()``) and ``lower_is_better``. The same metadata is
stored inside every checkpoint file, so a missing or corrupt ``index.json`` is rebuilt from
the files alone.

Invariants, kept by doing every read-modify-write of a folder under its file lock:

* the folder holds exactly the k best checkpoints (fewer only if fewer were submitted);
* a new score enters only if it strictly beats the current k-th, so on equal scores the
  older checkpoint stays ranked first;
* every file is written to a temporary name and moved into place with ``os.replace``, so a
  reader never sees a partial file; leftovers of crashed writers are removed, and checkpoint
  files missing from the index are merged back in (or deleted when they do not make the cut).

``python checkpoint_saver.py [ROOT] [--instance X]`` prints the leaderboard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch
from filelock import FileLock

DEFAULT_ROOT = "runs/checkpoints"
INDEX_NAME = "index.json"
LOCK_NAME = "index.json.lock"
CHECKPOINT_SUFFIX = ".pt"
# Temporary files start with a dot and never end in ".pt", so they cannot pass for checkpoints.
TEMP_PREFIX = ".tmp-"
# Checkpoints that torch.load cannot read are renamed aside, not deleted: they may be salvageable.
UNREADABLE_SUFFIX = ".unreadable"

MAX_INSTANCE_KEY_LENGTH = 120
MAX_RUN_NAME_LENGTH = 80
HASH_LENGTH = 10
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._=,+-]+")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_=,+-][A-Za-z0-9._=,+-]*")

_ENTRY_TYPES = {
    "score": (int, float),
    "file": str,
    "run_name": str,
    "global_step": int,
    "created": (int, float),
    "lower_is_better": bool,
}


def instance_key(
    env_id: str, env_kwargs: dict | None = None, problem_instance: str | None = None
) -> str:
    """Folder-safe, readable name of a problem instance.

    ``problem_instance`` wins if given; otherwise the env id plus its keyword arguments
    (order-independent). A hash of the exact input is appended whenever sanitising or
    truncating changed it, so distinct inputs never share a key.
    """
    if problem_instance is not None:
        identity = readable = problem_instance
    elif env_kwargs:
        try:
            canonical = json.dumps(env_kwargs, sort_keys=True, separators=(",", ":"))
        except TypeError as exc:
            raise TypeError(
                f"env_kwargs must be JSON-serialisable to name the instance ({exc}); "
                "pass problem_instance=... instead"
            ) from exc
        identity = json.dumps([env_id, canonical])
        # '{"instance":"criss-cross"}' reads as 'instance=criss-cross'.
        readable_kwargs = canonical[1:-1].replace('":', "=").replace('"', "")
        readable = f"{env_id}__{readable_kwargs}"
    else:
        identity = readable = env_id

    key = _sanitise(readable)
    if key and key == identity and len(key) <= MAX_INSTANCE_KEY_LENGTH:
        return key
    prefix = key[: MAX_INSTANCE_KEY_LENGTH - HASH_LENGTH - 1] or "instance"
    return f"{prefix}-{hashlib.sha256(identity.encode()).hexdigest()[:HASH_LENGTH]}"


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` so that ``path`` holds either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, lambda file: torch.save(obj, file))


class CheckpointSaver:
    """Keeps the ``top_k`` best checkpoints of one instance in ``root/instance``."""

    def __init__(
        self,
        root: str | os.PathLike,
        instance: str,
        top_k: int = 5,
        lower_is_better: bool = False,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not _is_safe_name(instance):
            raise ValueError(
                f"instance {instance!r} is not a safe folder name; build it with instance_key()"
            )
        self.instance = instance
        self.top_k = top_k
        self.lower_is_better = lower_is_better
        self.folder = Path(root) / instance
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.folder / LOCK_NAME)

    def submit(self, score: float, checkpoint: dict, run_name: str, global_step: int) -> bool:
        """Save ``checkpoint`` if ``score`` enters the top-k; return whether it did.

        The saved dict is ``checkpoint`` plus the metadata keys ``score``, ``run_name``,
        ``global_step``, ``instance``, ``created`` and ``lower_is_better`` (which override
        same-named keys of ``checkpoint``). Non-finite scores are never saved.
        """
        score = float(score)
        if not math.isfinite(score):
            return False
        with self._lock:
            ranked = self._synchronise()
            if not self._enters_top_k(score, ranked):
                return False
            entry = {
                "score": score,
                "file": _checkpoint_file_name(run_name, global_step),
                "run_name": str(run_name),
                "global_step": int(global_step),
                "created": time.time(),
                "lower_is_better": self.lower_is_better,
            }
            metadata = {key: value for key, value in entry.items() if key != "file"}
            metadata["instance"] = self.instance
            save_atomic({**checkpoint, **metadata}, self.folder / entry["file"])
            self._store(ranked + [entry], index_on_disk=ranked)
        return True

    def entries(self) -> list[dict]:
        """The index, best first (repaired first if needed)."""
        with self._lock:
            return self._synchronise()

    def _enters_top_k(self, score: float, ranked: list[dict]) -> bool:
        if len(ranked) < self.top_k:
            return True
        kth_score = ranked[self.top_k - 1]["score"]
        return score < kth_score if self.lower_is_better else score > kth_score

    def _synchronise(self) -> list[dict]:
        """Under the lock: load or repair the index, keep the top-k and clean the folder."""
        index_on_disk, entries, unreadable = _load_entries(self.folder)
        if any(entry["lower_is_better"] != self.lower_is_better for entry in entries):
            raise ValueError(
                f"{self.folder} holds checkpoints ranked with lower_is_better="
                f"{not self.lower_is_better}; use that setting or another instance"
            )
        return self._store(entries, index_on_disk, unreadable)

    def _store(
        self,
        entries: list[dict],
        index_on_disk: list[dict] | None,
        unreadable: Iterable[str] = (),
    ) -> list[dict]:
        """Write the top-k of ``entries`` as the index and remove every other file."""
        kept = _ranked(entries, self.lower_is_better)[: self.top_k]
        if kept != index_on_disk:
            _write_index(self.folder, kept)
        # Only after the index stops listing them may files disappear.
        for name in unreadable:
            os.replace(self.folder / name, self.folder / (name + UNREADABLE_SUFFIX))
        kept_files = {entry["file"] for entry in kept}
        for path in self.folder.iterdir():
            # Under the lock no writer is active, so any temporary file is a crash leftover.
            is_stale = _is_checkpoint_name(path.name) and path.name not in kept_files
            if is_stale or path.name.startswith(TEMP_PREFIX):
                path.unlink(missing_ok=True)
        return kept


def read_index(folder: str | os.PathLike) -> list[dict]:
    """Entries of an instance folder, best first; rebuilds a missing or corrupt index.

    Nothing is deleted here (the reader does not know top_k); the next submit trims.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder {folder}")
    index, problem = _read_index_file(folder)
    if problem is None:
        return index
    with FileLock(folder / LOCK_NAME):
        index_on_disk, entries, _unreadable = _load_entries(folder)
        # Savers refuse to mix directions, so a mixed folder is a lost-index accident.
        lower_is_better = 2 * sum(entry["lower_is_better"] for entry in entries) > len(entries)
        ranked = _ranked(entries, lower_is_better)
        if ranked != index_on_disk:
            _write_index(folder, ranked)
        return ranked


def leaderboard(root: str | os.PathLike, instance: str | None = None) -> str:
    """Text tables of the best checkpoints, one per instance sorted by name."""
    root = Path(root)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"checkpoint root {str(root)!r} {problem}; pass the folder the trainer saved "
            f"to (default {DEFAULT_ROOT})"
        )
    folders = sorted(
        path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")
    )
    if instance is not None:
        known = [folder.name for folder in folders]
        if instance not in known:
            raise FileNotFoundError(
                f"no instance {instance!r} under {str(root)!r}; known instances: "
                f"{', '.join(known) or 'none'} (omit --instance to list all)"
            )
        folders = [root / instance]
    if not folders:
        return f"No checkpoints yet under {root}."
    return "\n\n".join(_format_instance(folder) for folder in folders)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the best checkpoints saved per problem instance."
    )
    parser.add_argument("root", nargs="?", default=DEFAULT_ROOT, help=f"default {DEFAULT_ROOT}")
    parser.add_argument("--instance", help="show only this instance")
    args = parser.parse_args(argv)
    try:
        print(leaderboard(args.root, args.instance))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _sanitise(text: str) -> str:
    text = _UNSAFE_CHARACTERS.sub("_", text)
    text = re.sub(r"\.{2,}", ".", text)
    return text.strip(".")  # no hidden folders, no trailing dots (invalid on Windows)


def _is_safe_name(name: str) -> bool:
    return (
        bool(_SAFE_NAME.fullmatch(name))
        and ".." not in name
        and len(name) <= MAX_INSTANCE_KEY_LENGTH
    )


def _is_checkpoint_name(name: str) -> bool:
    return (
        name.endswith(CHECKPOINT_SUFFIX)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
    )


def _checkpoint_file_name(run_name: str, global_step: int) -> str:
    run_part = _sanitise(str(run_name))[:MAX_RUN_NAME_LENGTH] or "run"
    return f"{run_part}-step{int(global_step)}-{uuid.uuid4().hex[:8]}{CHECKPOINT_SUFFIX}"


def _ranked(entries: list[dict], lower_is_better: bool) -> list[dict]:
    sign = 1 if lower_is_better else -1
    # Equal scores: the older checkpoint ranks first.
    return sorted(entries, key=lambda e: (sign * e["score"], e["created"], e["file"]))


def _is_valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    for key, expected_type in _ENTRY_TYPES.items():
        value = entry.get(key)
        # bool is an int subclass, but True is not a score or a step.
        is_misused_bool = isinstance(value, bool) and expected_type is not bool
        if not isinstance(value, expected_type) or is_misused_bool:
            return False
    return math.isfinite(entry["score"]) and _is_checkpoint_name(entry["file"])


def _read_index_file(folder: Path) -> tuple[list[dict] | None, str | None]:
    """(entries, None) for a valid index, else (None, what is wrong with it)."""
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "index.json is missing"
    except (OSError, ValueError) as exc:
        return None, f"index.json is unreadable ({exc})"
    if not isinstance(index, list) or not all(_is_valid_entry(entry) for entry in index):
        return None, "index.json is not a list of complete entries"
    files = [entry["file"] for entry in index]
    if len(set(files)) != len(files):
        return None, "index.json lists a file twice"
    if not all((folder / name).is_file() for name in files):
        return None, "index.json lists checkpoint files that do not exist"
    return index, None


def _load_entries(folder: Path) -> tuple[list[dict] | None, list[dict], list[str]]:
    """Read the index and reconcile it with the checkpoint files actually in ``folder``.

    Returns the valid index as on disk (None if unusable), all known entries (index plus
    files it misses), and the names of checkpoint files that could not be read.
    """
    on_disk = {path.name for path in folder.iterdir() if _is_checkpoint_name(path.name)}
    index, problem = _read_index_file(folder)
    if problem is not None:
        if on_disk or problem != "index.json is missing":
            warnings.warn(
                f"{folder}: {problem}; rebuilding it from the checkpoint files", RuntimeWarning
            )
        recovered, unreadable = _entries_from_files(folder, on_disk)
        return None, recovered, unreadable
    # A writer that crashed between saving a checkpoint and updating the index leaves orphans.
    orphans = on_disk - {entry["file"] for entry in index}
    if orphans:
        warnings.warn(
            f"{folder}: {len(orphans)} checkpoint file(s) missing from index.json; merging them",
            RuntimeWarning,
        )
    recovered, unreadable = _entries_from_files(folder, orphans)
    return index, index + recovered, unreadable


def _entries_from_files(folder: Path, names: set[str]) -> tuple[list[dict], list[str]]:
    entries, unreadable = [], []
    for name in sorted(names):
        try:
            checkpoint = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # whatever torch raises, the file is unreadable
            warnings.warn(f"{folder}: skipping unreadable {name} ({exc})", RuntimeWarning)
            unreadable.append(name)
            continue
        entry = _entry_from_checkpoint(name, checkpoint)
        if entry is None:
            warnings.warn(f"{folder}: skipping {name}, it lacks registry metadata", RuntimeWarning)
            unreadable.append(name)
        else:
            entries.append(entry)
    return entries, unreadable


def _entry_from_checkpoint(name: str, checkpoint: object) -> dict | None:
    if not isinstance(checkpoint, dict):
        return None
    entry = {key: checkpoint.get(key) for key in _ENTRY_TYPES}
    entry["file"] = name
    return entry if _is_valid_entry(entry) else None


def _write_index(folder: Path, entries: list[dict]) -> None:
    text = json.dumps(entries, indent=2) + "\n"
    _write_atomically(folder / INDEX_NAME, lambda file: file.write(text.encode("utf-8")))


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    temp_path = path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        with open(temp_path, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _format_instance(folder: Path) -> str:
    entries = read_index(folder)
    if not entries:
        return f"{folder.name}: no checkpoints yet"
    direction = "lower" if entries[0]["lower_is_better"] else "higher"
    title = f"{folder.name}  ({len(entries)} checkpoint(s), {direction} score is better)"
    rows = [
        [
            str(rank),
            f"{entry['score']:.6g}",
            entry["run_name"],
            str(entry["global_step"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["created"])),
            entry["file"],
        ]
        for rank, entry in enumerate(entries, start=1)
    ]
    header = ["rank", "score", "run", "step", "created", "file"]
    return title + "\n" + _format_table(header, rows, right_aligned={0, 1, 3})


def _format_table(header: list[str], rows: list[list[str]], right_aligned: set[int]) -> str:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
