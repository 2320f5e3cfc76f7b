"""Best-LTA checkpoint registry: the top-k evaluated policies ever trained per problem instance.

Researchers train many PPO runs on the same problem instance and want "the best policy we
ever trained for instance X". The trainer evaluates each candidate under a fixed evaluation
protocol and calls ``CheckpointSaver.submit`` with the evaluated score (mean LTA return) and
its 95% confidence half-width; the checkpoint is written only if the score is among the k
best ever submitted for that instance, across all runs and processes.

Layout on disk::

    ROOT/<instance>/index.json        {"protocol", "top_k", "lower_is_better", "entries"}
    ROOT/<instance>/<run>-step<N>-<id>.pt
    ROOT/<instance>/index.json.lock   inter-process lock

``entries`` lists, best first, ``score``, ``half_width``, ``file`` (name inside the folder),
``run_name``, ``global_step`` and ``created`` (``time.time()``). Every checkpoint file also
carries that metadata plus ``protocol``, ``lower_is_better``, ``top_k`` and ``instance``, so a
missing or corrupt ``index.json`` is rebuilt from the files alone. A folder without
checkpoints has no index.

Scores are comparable only under one evaluation protocol (an opaque JSON-able dict compared
by equality) and one ranking direction, so a folder holds one of each: the first checkpoint
fixes them, and a saver with another protocol or direction is refused with a
``RegistryError``. Index files of older versions (a JSON list of entries with unevaluated
scores) are refused too, never mixed in.

Top-k semantics: the folder stores its k. A submission keeps the stored-k best and deletes
only the files it pushed below; a saver with a smaller ``top_k`` never shrinks the stored k,
and one with a larger ``top_k`` raises it when its first checkpoint enters (k only grows;
to start over with a smaller k, use another root). Reading (``entries``, ``check``,
``read_index``, the leaderboard) never deletes a checkpoint.

Concurrency and crash safety:

* a score enters only if it strictly beats the current k-th, so on equal scores the older
  checkpoint stays ranked first. The cheap pre-check reads the index without the lock (it is
  replaced atomically, so it is some complete earlier state, whose k-th score is never better
  than the current one): a rejected score costs no lock and no checkpoint build;
* the checkpoint is serialised to a hidden temporary file (``.tmp-`` prefix) outside the
  lock; under the lock the score is checked again against the fresh index, then the file is
  moved into place with ``os.replace`` and the index is rewritten atomically, so readers
  never see a partial file;
* a writer killed mid-way leaves a temporary file, an orphan checkpoint (merged back into
  the index) or an evicted file still on disk (listed until the next submission trims to k).
  Temporary files may belong to live writers waiting for the lock, so only those older than
  ``STALE_TEMP_SECONDS`` (much more than the longest allowed lock wait) are removed;
* unreadable checkpoint files are renamed aside (``.unreadable``), not deleted;
* a lock wait gives up after ``lock_timeout`` seconds with a ``RegistryError``.

``python checkpoint_saver.py [ROOT] [--instance PART]`` prints the leaderboard.
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
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch
from filelock import FileLock, Timeout

DEFAULT_ROOT = "runs/checkpoints"
INDEX_NAME = "index.json"
LOCK_NAME = "index.json.lock"
CHECKPOINT_SUFFIX = ".pt"
# Temporary files start with a dot and never end in ".pt", so they cannot pass for checkpoints.
TEMP_PREFIX = ".tmp-"
# Checkpoints that torch.load cannot read are renamed aside, not deleted: they may be salvageable.
UNREADABLE_SUFFIX = ".unreadable"
DEFAULT_LOCK_TIMEOUT = 60.0
# A temporary file this old cannot belong to a live writer: writers wait at most
# MAX_LOCK_TIMEOUT for the lock after finishing the file.
STALE_TEMP_SECONDS = 3600.0
MAX_LOCK_TIMEOUT = STALE_TEMP_SECONDS / 2

MAX_INSTANCE_KEY_LENGTH = 120
MAX_RUN_NAME_LENGTH = 80
HASH_LENGTH = 10
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._=,+-]+")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_=,+-][A-Za-z0-9._=,+-]*")

_ENTRY_TYPES = {
    "score": (int, float),
    "half_width": (int, float),
    "file": str,
    "run_name": str,
    "global_step": int,
    "created": (int, float),
}
# What a folder's checkpoints have in common; stored once in the index, and in every file.
_RANKING_TYPES = {"protocol": dict, "top_k": int, "lower_is_better": bool}

_INDEX_MISSING = "index.json is missing"
_INDEX_OF_OLDER_VERSION = "index.json is a list of unevaluated entries (older version)"


class RegistryError(ValueError):
    """The registry cannot be used as asked; the message is one line saying what to do."""


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
    """Keeps the k best evaluated checkpoints of one instance in ``root/instance``.

    ``protocol`` describes how scores were evaluated; only scores of equal protocols (and
    equal ``lower_is_better``) are ranked together. ``top_k`` raises the folder's stored k
    but never lowers it (see the module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        instance: str,
        top_k: int = 5,
        lower_is_better: bool = False,
        *,
        protocol: dict,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not _is_safe_name(instance):
            raise ValueError(
                f"instance {instance!r} is not a safe folder name; build it with instance_key()"
            )
        if not 0 < lock_timeout <= MAX_LOCK_TIMEOUT:
            raise ValueError(
                f"lock_timeout must be in (0, {MAX_LOCK_TIMEOUT:g}] seconds, got {lock_timeout}: "
                f"temporary files older than {STALE_TEMP_SECONDS:g} s are taken for crash leftovers"
            )
        self.instance = instance
        self.top_k = top_k
        self.lower_is_better = lower_is_better
        self.protocol = _canonical_protocol(protocol)
        self.folder = Path(root) / instance
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.folder / LOCK_NAME, timeout=lock_timeout)

    def check(self) -> None:
        """Raise ``RegistryError`` unless this saver may submit to the folder.

        Meant to be called before training, so a run with another protocol or ranking
        direction, or a folder of an older version, is refused before any work is done.
        """
        with _locked(self._lock):
            index = _repair(self.folder)
        self._require_compatible(index)

    def would_enter(self, score: float) -> bool:
        """Whether ``score`` may enter the top-k; cheap: no lock, no checkpoint.

        False only when the score certainly does not enter (or is not finite); ``submit``
        decides for good under the lock.
        """
        score = float(score)
        if not math.isfinite(score):
            return False
        ranked, top_k = self._unlocked_view()
        return _enters(score, ranked, top_k, self.lower_is_better)

    def submit(
        self,
        score: float,
        checkpoint: dict | Callable[[], dict],
        run_name: str,
        global_step: int,
        half_width: float,
    ) -> bool:
        """Save the checkpoint if ``score`` enters the top-k; return whether it did.

        ``checkpoint`` is a dict or a zero-argument callable returning one, called only if
        the cheap pre-check passes. The saved dict is the checkpoint plus the metadata keys
        ``score``, ``half_width``, ``run_name``, ``global_step``, ``created``, ``instance``,
        ``protocol``, ``lower_is_better`` and ``top_k`` (which override same-named keys).
        Non-finite scores are never saved. Raises ``RegistryError`` if the folder ranks
        another protocol or direction, or on lock timeout.
        """
        score = float(score)
        if not math.isfinite(score):
            return False
        half_width = float(half_width)
        if not (math.isfinite(half_width) and half_width >= 0):
            raise ValueError(f"half_width must be finite and >= 0, got {half_width}")
        ranked, top_k = self._unlocked_view()
        if not _enters(score, ranked, top_k, self.lower_is_better):
            return False
        if callable(checkpoint):
            checkpoint = checkpoint()
        if not isinstance(checkpoint, dict):
            raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")

        entry = {
            "score": score,
            "half_width": half_width,
            "file": _checkpoint_file_name(run_name, global_step),
            "run_name": str(run_name),
            "global_step": int(global_step),
            "created": time.time(),
        }
        metadata = {key: value for key, value in entry.items() if key != "file"}
        # top_k is the stored k as far as known now; a lost index is rebuilt with the largest.
        metadata.update(self._ranking(top_k), instance=self.instance)
        path = self.folder / entry["file"]
        temp_path = _write_temp(path, lambda file: torch.save({**checkpoint, **metadata}, file))
        try:
            with _locked(self._lock):
                index = _repair(self.folder)
                self._require_compatible(index)
                if index is not None:
                    ranked, top_k = index["entries"], max(index["top_k"], self.top_k)
                else:
                    ranked, top_k = [], self.top_k
                if not _enters(score, ranked, top_k, self.lower_is_better):
                    return False
                os.replace(temp_path, path)
                ranked = _ranked(ranked + [entry], self.lower_is_better)
                _write_index(self.folder, {**self._ranking(top_k), "entries": ranked[:top_k]})
                # Only after the index stops listing them may the displaced files disappear.
                for displaced in ranked[top_k:]:
                    (self.folder / displaced["file"]).unlink(missing_ok=True)
        finally:
            temp_path.unlink(missing_ok=True)  # already moved if the checkpoint entered
        return True

    def entries(self) -> list[dict]:
        """The ranked entries, best first (the index repaired first if needed)."""
        with _locked(self._lock):
            index = _repair(self.folder)
        return [] if index is None else index["entries"]

    def _ranking(self, top_k: int) -> dict:
        return {"protocol": self.protocol, "top_k": top_k, "lower_is_better": self.lower_is_better}

    def _unlocked_view(self) -> tuple[list[dict], int]:
        """Ranked entries and k of the index as last written, read without the lock.

        An unusable or incompatible index gives no entries: the score then goes on to
        ``submit``'s locked path, which repairs the index or raises the clear error.
        """
        index, problem = _read_index_file(self.folder, check_files=False)
        if problem is not None or self._incompatibility(index) is not None:
            return [], self.top_k
        return index["entries"], max(index["top_k"], self.top_k)

    def _incompatibility(self, index: dict | None) -> str | None:
        """Why this saver may not submit to a folder with ``index``, or None."""
        if index is None or not index["entries"]:
            return None  # an empty folder takes the protocol of its first checkpoint
        if index["protocol"] != self.protocol:
            return (
                f"{self.folder} ranks checkpoints evaluated under protocol "
                f"{_protocol_text(index['protocol'])}; this run's protocol is "
                f"{_protocol_text(self.protocol)}: use the same evaluation options or another "
                "--checkpoint-dir/--problem-instance"
            )
        if index["lower_is_better"] != self.lower_is_better:
            return (
                f"{self.folder} ranks checkpoints with lower_is_better={index['lower_is_better']};"
                f" this run has lower_is_better={self.lower_is_better}: use the same "
                "--lower-is-better setting or another --checkpoint-dir/--problem-instance"
            )
        return None

    def _require_compatible(self, index: dict | None) -> None:
        problem = self._incompatibility(index)
        if problem is not None:
            raise RegistryError(problem)


def read_index(
    folder: str | os.PathLike, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> dict | None:
    """The index of an instance folder, or None if it holds no checkpoints.

    The index is ``{"protocol", "top_k", "lower_is_better", "entries"}``, entries best first.
    A valid index is read without the lock; a missing or corrupt one is rebuilt from the
    files under the lock. Nothing is deleted here; the next submission trims to k.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder {folder}")
    index, problem = _read_index_file(folder)
    if problem is None:
        return index
    with _locked(FileLock(folder / LOCK_NAME, timeout=lock_timeout)):
        return _repair(folder)


def resolve_instance(root: str | os.PathLike, part: str) -> str:
    """The instance folder under ``root`` named ``part``, or else the only one containing it."""
    known = [folder.name for folder in _instance_folders(_existing_root(root))]
    if part in known:
        return part
    matches = [name for name in known if part in name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise RegistryError(
            f"instance {part!r} is ambiguous under {str(root)!r}, it matches "
            f"{', '.join(matches)}; give more of the name"
        )
    raise FileNotFoundError(
        f"no instance matching {part!r} under {str(root)!r}; known instances: "
        f"{', '.join(known) or 'none'} (omit --instance to list all)"
    )


def leaderboard(root: str | os.PathLike, instance: str | None = None) -> str:
    """Text tables of the best checkpoints, one per instance sorted by name.

    ``instance`` is an instance key or a unique part of one.
    """
    root = _existing_root(root)
    if instance is not None:
        folders = [root / resolve_instance(root, instance)]
    else:
        folders = _instance_folders(root)
    if not folders:
        return f"No checkpoints yet under {root}."
    return "\n\n".join(_format_instance(folder) for folder in folders)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the best checkpoints saved per problem instance."
    )
    parser.add_argument("root", nargs="?", default=DEFAULT_ROOT, help=f"default {DEFAULT_ROOT}")
    parser.add_argument("--instance", help="show only this instance (its key or a unique part)")
    args = parser.parse_args(argv)
    try:
        print(leaderboard(args.root, args.instance))
    except (OSError, RegistryError) as exc:
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


def _canonical_protocol(protocol: object) -> dict:
    """The protocol as it reads back from JSON (tuples become lists), so equality holds."""
    if not isinstance(protocol, dict):
        raise TypeError(f"protocol must be a dict, got {type(protocol).__name__}")
    try:
        return json.loads(json.dumps(protocol, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"protocol must be JSON-serialisable without NaN ({exc})") from exc


def _protocol_text(protocol: dict) -> str:
    return json.dumps(protocol, sort_keys=True)


def _older_version_message(folder: Path) -> str:
    return (
        f"{folder} is a registry of an older version whose scores were not evaluated under a "
        "protocol, so they cannot be ranked with evaluated ones: move that folder away or use "
        "another --checkpoint-dir"
    )


def _locked_message(lock: FileLock) -> str:
    return (
        f"gave up after waiting {lock.timeout:g} s for the lock {lock.lock_file}: another "
        "process holds it; try again when it is done, or stop it if it hangs"
    )


@contextmanager
def _locked(lock: FileLock) -> Iterator[None]:
    try:
        lock.acquire()
    except Timeout:
        raise RegistryError(_locked_message(lock)) from None
    try:
        yield
    finally:
        lock.release()


def _ranked(entries: list[dict], lower_is_better: bool) -> list[dict]:
    sign = 1 if lower_is_better else -1
    # Equal scores: the older checkpoint ranks first.
    return sorted(entries, key=lambda e: (sign * e["score"], e["created"], e["file"]))


def _enters(score: float, ranked: list[dict], top_k: int, lower_is_better: bool) -> bool:
    if len(ranked) < top_k:
        return True
    kth_score = ranked[top_k - 1]["score"]
    return score < kth_score if lower_is_better else score > kth_score


def _has_types(record: dict, types: dict) -> bool:
    for key, expected_type in types.items():
        value = record.get(key)
        # bool is an int subclass, but True is not a score, a step or a k.
        is_misused_bool = isinstance(value, bool) and expected_type is not bool
        if not isinstance(value, expected_type) or is_misused_bool:
            return False
    return True


def _is_valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and _has_types(entry, _ENTRY_TYPES)
        and math.isfinite(entry["score"])
        and math.isfinite(entry["half_width"])
        and entry["half_width"] >= 0
        and _is_checkpoint_name(entry["file"])
    )


def _is_valid_ranking(record: dict) -> bool:
    return _has_types(record, _RANKING_TYPES) and record["top_k"] >= 1


def _read_index_file(folder: Path, check_files: bool = True) -> tuple[dict | None, str | None]:
    """(index, None) for a valid index, else (None, what is wrong with it)."""
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, _INDEX_MISSING
    except (OSError, ValueError) as exc:
        return None, f"index.json is unreadable ({exc})"
    if index == []:
        return None, _INDEX_MISSING  # an older version's index of an empty folder
    if isinstance(index, list):
        return None, _INDEX_OF_OLDER_VERSION
    if not isinstance(index, dict) or not _is_valid_ranking(index):
        return None, "index.json lacks the protocol, top_k or lower_is_better"
    entries = index.get("entries")
    if not isinstance(entries, list) or not all(_is_valid_entry(entry) for entry in entries):
        return None, "index.json does not hold a list of complete entries"
    files = [entry["file"] for entry in entries]
    if len(set(files)) != len(files):
        return None, "index.json lists a file twice"
    if check_files and not all((folder / name).is_file() for name in files):
        return None, "index.json lists checkpoint files that do not exist"
    return {key: index[key] for key in (*_RANKING_TYPES, "entries")}, None


def _repair(folder: Path) -> dict | None:
    """Under the lock: the folder's index, rebuilt or completed from the files if needed.

    Writes the repaired index, renames unreadable checkpoints aside and removes stale
    temporary files; deletes no checkpoint. None if the folder holds no checkpoints.
    """
    index_on_disk, index, unreadable = _reconcile(folder)
    if index is None:
        (folder / INDEX_NAME).unlink(missing_ok=True)  # corrupt, and nothing to list
    elif index != index_on_disk:
        _write_index(folder, index)
    # Only after the index stops listing them may files be renamed.
    for name in unreadable:
        os.replace(folder / name, folder / (name + UNREADABLE_SUFFIX))
    _remove_stale_temp_files(folder)
    return index


def _reconcile(folder: Path) -> tuple[dict | None, dict | None, list[str]]:
    """Read the index and reconcile it with the checkpoint files actually in ``folder``.

    Returns the valid index as on disk (None if unusable), the index listing every
    readable checkpoint (None if there is none), and the names of unreadable files.
    """
    on_disk = {path.name for path in folder.iterdir() if _is_checkpoint_name(path.name)}
    index, problem = _read_index_file(folder)
    if problem == _INDEX_OF_OLDER_VERSION:
        raise RegistryError(_older_version_message(folder))
    if problem is None:
        # A writer killed between moving a checkpoint in and updating the index leaves orphans.
        unlisted = on_disk - {entry["file"] for entry in index["entries"]}
        if unlisted:
            warnings.warn(
                f"{folder}: {len(unlisted)} checkpoint file(s) missing from index.json; "
                "merging them",
                RuntimeWarning,
            )
    else:
        unlisted = on_disk
        if on_disk or problem != _INDEX_MISSING:
            warnings.warn(
                f"{folder}: {problem}; rebuilding it from the checkpoint files", RuntimeWarning
            )
    recovered, rankings, unreadable = _entries_from_files(folder, unlisted)
    if index is not None:
        rankings.insert(0, index)
    if not rankings:
        return None, None, unreadable
    _require_one_ranking(folder, rankings)
    complete = {
        "protocol": rankings[0]["protocol"],
        "top_k": max(ranking["top_k"] for ranking in rankings),
        "lower_is_better": rankings[0]["lower_is_better"],
        "entries": _ranked((index["entries"] if index else []) + recovered,
                           rankings[0]["lower_is_better"]),
    }
    return index, complete, unreadable


def _require_one_ranking(folder: Path, rankings: list[dict]) -> None:
    """Savers never mix protocols or directions in a folder; refuse to if files do."""
    distinct = []
    for ranking in rankings:
        kind = (ranking["protocol"], ranking["lower_is_better"])
        if kind not in distinct:
            distinct.append(kind)
    if len(distinct) > 1:
        described = "; ".join(
            f"protocol {_protocol_text(protocol)} with lower_is_better={lower_is_better}"
            for protocol, lower_is_better in distinct
        )
        raise RegistryError(
            f"{folder} holds checkpoints ranked under different settings ({described}): "
            "move the checkpoint files that do not belong to another folder"
        )


def _entries_from_files(
    folder: Path, names: set[str]
) -> tuple[list[dict], list[dict], list[str]]:
    """Entries and rankings read from the metadata of checkpoint files, and unreadable names."""
    entries, rankings, unreadable = [], [], []
    for name in sorted(names):
        try:
            checkpoint = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # whatever torch raises, the file is unreadable
            warnings.warn(f"{folder}: skipping unreadable {name} ({exc})", RuntimeWarning)
            unreadable.append(name)
            continue
        if not isinstance(checkpoint, dict):
            checkpoint = {}
        if "lower_is_better" in checkpoint and "protocol" not in checkpoint:
            raise RegistryError(_older_version_message(folder))
        entry = {key: checkpoint.get(key) for key in _ENTRY_TYPES}
        entry["file"] = name
        ranking = {key: checkpoint.get(key) for key in _RANKING_TYPES}
        if _is_valid_entry(entry) and _is_valid_ranking(ranking):
            entries.append(entry)
            rankings.append(ranking)
        else:
            warnings.warn(f"{folder}: skipping {name}, it lacks registry metadata", RuntimeWarning)
            unreadable.append(name)
    return entries, rankings, unreadable


def _remove_stale_temp_files(folder: Path) -> None:
    now = time.time()
    for path in folder.iterdir():
        if not path.name.startswith(TEMP_PREFIX):
            continue
        try:
            if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                path.unlink()
        except FileNotFoundError:
            pass  # its writer moved or removed it meanwhile


def _write_index(folder: Path, index: dict) -> None:
    text = json.dumps(index, indent=2) + "\n"
    _write_atomically(folder / INDEX_NAME, lambda file: file.write(text.encode("utf-8")))


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    temp_path = _write_temp(path, write)
    try:
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _write_temp(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a hidden temporary file beside ``path`` (same filesystem: ``os.replace`` is atomic)."""
    temp_path = path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        with open(temp_path, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return temp_path


def _existing_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"checkpoint root {str(root)!r} {problem}; pass the folder the trainer saved "
            f"to (default {DEFAULT_ROOT})"
        )
    return root


def _instance_folders(root: Path) -> list[Path]:
    return sorted(
        path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")
    )


def _format_instance(folder: Path) -> str:
    try:
        index = read_index(folder)
    except RegistryError as exc:
        return f"{folder.name}: cannot be listed: {exc}"
    if index is None or not index["entries"]:
        return f"{folder.name}: no checkpoints yet"
    entries = index["entries"]
    direction = "lower" if index["lower_is_better"] else "higher"
    title = (
        f"{folder.name}  ({len(entries)} checkpoint(s), top {index['top_k']} kept, "
        f"{direction} score is better)\nprotocol: {_protocol_text(index['protocol'])}"
    )
    rows = [
        [
            str(rank),
            f"{entry['score']:.6g} ± {entry['half_width']:.3g}",
            entry["run_name"],
            str(entry["global_step"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["created"])),
            str((folder / entry["file"]).absolute()),
        ]
        for rank, entry in enumerate(entries, start=1)
    ]
    header = ["rank", "score ± 95% CI", "run", "step", "created", "path"]
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
