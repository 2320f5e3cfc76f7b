"""Best-LTA checkpoint registry: the top-k evaluated policies ever trained per problem instance, in a database.

Researchers train many PPO runs on the same problem instance and want "the best policy we ever trained for
instance X". The trainer evaluates each candidate under a fixed evaluation protocol and calls
``CheckpointSaver.submit`` with the evaluated score (mean LTA return) and its 95% confidence half-width; the
checkpoint is stored only if the score is among the k best ever submitted for that instance, by any run, process
or machine using the same database.

Where: a registry is a database reached through SQLAlchemy. A location without ``://`` is a folder holding the
SQLite file ``registry.db`` (embedded, no server: one machine; the trainer's default is ``runs/checkpoints``);
``postgresql://user@host/db`` is shared by many machines (it may be the database of a sweep's Optuna study).
Two tables, ``registry_instances`` (one row per instance: its protocol, ranking direction and k) and
``registry_entries`` (score, half_width, run_name, global_step, created, host, and the checkpoint's bytes, a
``torch.save`` of the trainer's dict plus that metadata).

Meaning: scores are comparable only under one evaluation protocol (a JSON-able dict, compared by value) and one
direction (``lower_is_better``), recorded with an instance's first entry; a saver with another protocol or
direction is refused with a one-line ``RegistryError``. A score enters only if it strictly beats the k-th (on
equal scores the older entry stays first); NaN or infinite scores never enter. A score and half-width equal to an
entry's exactly do not enter either: under one protocol (common random numbers) that is the same policy as far as
the protocol can tell (under a priority rule, networks that make the same decisions give identical trajectories),
so the earlier entry stays and ``CheckpointSaver.duplicate_of`` names it. The instance stores its k: a
saver with a larger ``top_k`` raises it, one with a smaller one never lowers it.

What the database guarantees, so this module does not have to (the folder registry before it locked files,
repaired its index from the checkpoints' metadata, merged orphans and cleaned stale temporary files):

* a submission is one transaction (entry in, displaced entries out, k raised): a writer killed at any point
  leaves the registry as before or as after it, never in between, and readers only ever see committed states;
* writers to one instance are serialised: each write transaction begins by writing the instance's row, which
  holds that row's lock (PostgreSQL) or the database's write lock (SQLite) until it ends, so the k-th score it
  compares with is the latest; a wait longer than ``lock_timeout`` fails with a ``RegistryError``;
* the transaction of a writer that dies is rolled back: by PostgreSQL when its connection drops (or stays idle
  in the transaction for ``lock_timeout``: a frozen machine does not block the others), by SQLite from its
  journal, and the dead process's file lock goes with it.

What stays here: the ranking rule, the protocol check, serialising the checkpoint before the transaction (only
if the cheap pre-check, one indexed query for the k-th score, lets it in), the leaderboard, export and the
import of folder registries. ``python checkpoint_saver.py --help`` lists the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import socket
import sys
import time
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterator

import sqlalchemy as sa
import torch
from sqlalchemy.dialects import postgresql, sqlite

DEFAULT_ROOT = "runs/checkpoints"
DATABASE_NAME = "registry.db"
DEFAULT_LOCK_TIMEOUT = 60.0
CONNECT_TIMEOUT_SECONDS = 10
MAX_INSTANCE_KEY_LENGTH = 120
HASH_LENGTH = 10
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._=,+-]+")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_=,+-][A-Za-z0-9._=,+-]*")

_schema = sa.MetaData()
instances_table = sa.Table(
    "registry_instances", _schema,
    sa.Column("instance", sa.String(MAX_INSTANCE_KEY_LENGTH), primary_key=True),
    sa.Column("protocol", sa.Text, nullable=False),  # JSON, sorted keys
    sa.Column("lower_is_better", sa.Boolean, nullable=False),
    sa.Column("top_k", sa.Integer, nullable=False),
)
entries_table = sa.Table(
    "registry_entries", _schema,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instance", sa.ForeignKey(instances_table.c.instance), nullable=False),
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("half_width", sa.Double, nullable=False),
    sa.Column("run_name", sa.Text, nullable=False),
    sa.Column("global_step", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Double, nullable=False),  # time.time()
    sa.Column("host", sa.Text),  # None for entries imported from folders, which did not record it
    sa.Column("checkpoint", sa.LargeBinary, nullable=False),
    sa.Index("registry_entries_by_score", "instance", "score"),
)
ENTRY_FIELDS = ("id", "score", "half_width", "run_name", "global_step", "created", "host")


class RegistryError(ValueError):
    """The registry cannot be used as asked; the message is one line saying what to do."""


def instance_key(env_id: str, env_kwargs: dict | None = None, problem_instance: str | None = None) -> str:
    """Readable, file-name-safe name of a problem instance.

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
    _write_atomically(Path(path), _serialise(obj))


def registry_url(location: str | os.PathLike) -> str:
    """A database URL as given, or the SQLite file ``registry.db`` in the folder ``location``."""
    location = str(location)
    return location if "://" in location else f"sqlite:///{Path(location) / DATABASE_NAME}"


def without_password(location: str | None) -> str | None:
    """The location with any password of its URL removed: for messages, and for options saved in files."""
    return None if location is None else re.sub(r"(://[^:/@]+):[^@]*@", r"\1@", str(location))


def open_database(location: str | os.PathLike, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                  create: bool = True) -> sa.Engine:
    """An engine on the registry at ``location``, its tables made if missing.

    Without ``create`` (to read), a registry that does not exist raises ``FileNotFoundError`` instead of being
    made.
    Raises ``RegistryError`` for a URL that is not SQLite or PostgreSQL or a database that cannot be reached.
    """
    if not (0 < lock_timeout < math.inf):
        raise ValueError(f"lock_timeout must be a positive number of seconds, got {lock_timeout}")
    shown = without_password(location)
    try:
        url = sa.make_url(registry_url(location))
    except sa.exc.ArgumentError:
        raise RegistryError(f"{shown!r} is neither a folder nor a database URL: give "
                            "postgresql://user@host/db, sqlite:///path.db or a folder") from None
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise RegistryError(f"the registry {shown} must be a SQLite file, not an in-memory database")
        path = Path(url.database)
        if not create and not path.is_file():
            raise FileNotFoundError(f"no registry at {path}: give the --registry the runs saved to (default "
                                    f"{DEFAULT_ROOT}). {legacy_hint(location)}".strip())
        path.parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": lock_timeout}
    elif url.get_backend_name() == "postgresql":
        milliseconds = int(lock_timeout * 1000)
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_SECONDS,
                        "options": f"-c lock_timeout={milliseconds} "
                                   f"-c idle_in_transaction_session_timeout={milliseconds}"}
    else:
        raise RegistryError(f"the registry {shown} is on {url.get_backend_name()}: give a postgresql:// or "
                            "sqlite:/// URL, or a folder")
    engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    for attempt in range(3):
        try:
            if create:
                _schema.create_all(engine)
            elif not sa.inspect(engine).has_table(instances_table.name):
                engine.dispose()
                raise FileNotFoundError(f"no registry in {shown}: give the --registry the runs saved to")
            return engine
        except sa.exc.DBAPIError as error:
            # Processes starting together on an empty database race to create the tables: the losers fail
            # once (PostgreSQL: an integrity error; SQLite: "table ... already exists"), then find them made.
            lost_the_race = "already exists" in str(error.orig)
            if (isinstance(error, sa.exc.OperationalError) and not lost_the_race) or attempt == 2:
                engine.dispose()
                raise _database_error(shown, error) from None
            time.sleep(0.2 * (attempt + 1))


class CheckpointSaver:
    """Keeps the k best evaluated checkpoints of one instance in the registry at ``location``.

    ``protocol`` describes how scores were evaluated; only scores of equal protocols (and equal
    ``lower_is_better``) are ranked together. ``top_k`` raises the instance's stored k but never lowers it.
    """

    def __init__(self, location: str | os.PathLike, instance: str, top_k: int = 5, lower_is_better: bool = False,
                 *, protocol: dict, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not _is_safe_name(instance):
            raise ValueError(f"instance {instance!r} is not a safe name; build it with instance_key()")
        self.instance = instance
        self.top_k = top_k
        self.lower_is_better = lower_is_better
        self.protocol = _canonical_protocol(protocol)
        self.location = without_password(location)
        self.duplicate_of: dict | None = None  # the entry the last submission equalled exactly, if it did
        self.engine = open_database(location, lock_timeout)
        weakref.finalize(self, self.engine.dispose)  # a sweep worker makes a saver per run: no connection piles up
        # The instance's protocol and direction, and the score to beat under the larger of its k and ours.
        stored_k = instances_table.c.top_k
        offset = sa.select(sa.case((stored_k > top_k, stored_k), else_=top_k) - 1).where(
            instances_table.c.instance == instance).scalar_subquery()
        self._precheck = sa.select(
            instances_table.c.protocol, instances_table.c.lower_is_better,
            _kth_score_query(instance, lower_is_better, offset).scalar_subquery().label("kth_score"),
        ).where(instances_table.c.instance == instance)

    def check(self) -> None:
        """Raise ``RegistryError`` unless this saver may write to the registry.

        Meant to be called before training: it takes the instance's write lock in a transaction it rolls
        back, so an unwritable registry, or one ranking this instance by another protocol or the other way
        round, is refused before any work is done.
        """
        with self._writing(commit=False):
            pass

    def would_enter(self, score: float) -> bool:
        """Whether ``score`` may enter the top-k; cheap: one indexed query, no lock, no checkpoint.

        False only when the score certainly does not enter (or is not finite); ``submit`` decides for
        good in its transaction.
        """
        score = float(score)
        if not math.isfinite(score):
            return False
        with _connected(self.engine, self.location) as connection:
            stored = connection.execute(self._precheck).one_or_none()
        if stored is None or _incompatibility(stored, self.location, self.instance, self.protocol,
                                              self.lower_is_better):
            return True  # an empty instance takes any score; submit raises the clear error
        return _beats(score, stored.kth_score, self.lower_is_better)

    def submit(self, score: float, checkpoint: dict | Callable[[], dict], run_name: str, global_step: int,
               half_width: float) -> bool:
        """Store the checkpoint if ``score`` enters the top-k; return whether it did.

        ``checkpoint`` is a dict or a zero-argument callable returning one, called only if the cheap
        pre-check passes. The stored dict is the checkpoint plus the metadata keys ``score``,
        ``half_width``, ``run_name``, ``global_step``, ``created``, ``host``, ``instance``, ``protocol``,
        ``lower_is_better`` and ``top_k`` (which override same-named keys). Non-finite scores are never
        stored. A submission whose score and half-width equal an entry's exactly is not stored (the same
        policy as far as the protocol can tell); ``duplicate_of`` is then that entry, else None. Raises
        ``RegistryError`` if the instance is ranked by another protocol or direction, on a lock timeout, or if
        the database fails.
        """
        self.duplicate_of = None
        score = float(score)
        if not math.isfinite(score):
            return False
        half_width = float(half_width)
        if not (math.isfinite(half_width) and half_width >= 0):
            raise ValueError(f"half_width must be finite and >= 0, got {half_width}")
        if not self.would_enter(score):
            return False
        if callable(checkpoint):
            checkpoint = checkpoint()
        if not isinstance(checkpoint, dict):
            raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
        entry = {"score": score, "half_width": half_width, "run_name": str(run_name),
                 "global_step": int(global_step), "created": time.time(), "host": socket.gethostname()}
        metadata = {**entry, "instance": self.instance, "protocol": self.protocol,
                    "lower_is_better": self.lower_is_better, "top_k": self.top_k}
        entry["checkpoint"] = _serialise({**checkpoint, **metadata})
        with self._writing() as (connection, top_k):
            if not _beats(score, _kth_score(connection, self.instance, top_k, self.lower_is_better),
                          self.lower_is_better):
                return False
            self.duplicate_of = _equal_entry(connection, self.instance, score, half_width)
            if self.duplicate_of is not None:
                return False
            connection.execute(sa.insert(entries_table), [{**entry, "instance": self.instance}])
            _trim(connection, self.instance, top_k, self.lower_is_better)
        return True

    def entries(self) -> list[dict]:
        """The instance's entries, best first (without their checkpoints)."""
        with _connected(self.engine, self.location) as connection:
            return _ranked_entries(connection, self.instance, self.lower_is_better)

    def _writing(self, commit: bool = True) -> contextlib.AbstractContextManager:
        return _instance_transaction(self.engine, self.location, self.instance, self.protocol,
                                     self.lower_is_better, self.top_k, commit)


def read_instance(location: str | os.PathLike, instance: str) -> dict | None:
    """``{"protocol", "top_k", "lower_is_better", "entries"}`` of an instance (entries best first, without
    checkpoints), or None if the registry holds none of it."""
    with _reading(location) as connection:
        return _read_instance(connection, instance)


def entry_bytes(location: str | os.PathLike, instance: str, rank: int = 1) -> bytes:
    """The checkpoint of entry ``rank`` (1 = best) of ``instance`` (its key or a unique part), as ``torch.save``
    wrote it: ``torch.load(io.BytesIO(data), weights_only=True)`` reads it."""
    return _entry(location, instance, rank)[1]


def export_entry(location: str | os.PathLike, instance: str, rank: int = 1,
                 path: str | os.PathLike | None = None) -> tuple[dict, Path]:
    """Write entry ``rank`` of ``instance`` to the ``.pt`` file ``path`` (default ``INSTANCE-rankN.pt``);
    return the entry (with its ``instance``) and the path."""
    entry, data = _entry(location, instance, rank)
    path = Path(path or f"{entry['instance']}-rank{rank}.pt")
    _write_atomically(path, data)
    return entry, path


def legacy_hint(location: str | os.PathLike, instance: str = "*") -> str:
    """How to import the folder registries of the previous version (of ``instance``) in the folder
    ``location``, or "" if it holds none."""
    location = str(location)
    if "://" in location or not any(Path(location).glob(f"{instance}/index.json")):
        return ""
    return (f"{location} holds folder registries of the previous version, which the database does not read: "
            f"import them with python checkpoint_saver.py import {location}")


def resolve_instance(known: list[str], part: str, location: str | os.PathLike) -> str:
    """The instance named ``part`` among ``known``, or else the only one containing it."""
    if part in known:
        return part
    matches = [name for name in known if part in name]
    if len(matches) == 1:
        return matches[0]
    shown = without_password(location)
    if matches:
        raise RegistryError(f"instance {part!r} is ambiguous in the registry {shown}, it matches "
                            f"{', '.join(matches)}; give more of the name")
    raise RegistryError(f"no instance matching {part!r} in the registry {shown}; known instances: "
                        f"{', '.join(known) or 'none'} (omit --instance to list all)")


def leaderboard(location: str | os.PathLike = DEFAULT_ROOT, instance: str | None = None) -> str:
    """Text tables of the best checkpoints, one per instance sorted by name.

    ``instance`` is an instance key or a unique part of one.
    """
    with _reading(location) as connection:
        known = _instance_names(connection)
        names = known if instance is None else [resolve_instance(known, instance, location)]
        tables = [_format_instance(name, _read_instance(connection, name)) for name in names]
    if not tables:
        return f"No checkpoints yet in the registry {without_password(location)}. {legacy_hint(location)}".strip()
    option = "" if str(location) == DEFAULT_ROOT else f" --registry {without_password(location)}"
    return "\n\n".join(tables) + (f"\n\nexport one: python checkpoint_saver.py export INSTANCE --rank N{option}"
                                  "\nin Python: ppo_continuous.load_checkpoint(instance=..., rank=N)")


def import_folders(root: str | os.PathLike, location: str | os.PathLike) -> tuple[list[str], bool]:
    """Import the folder registries under ``root`` (``<instance>/index.json`` and checkpoint files, as
    written by the version before the database) into the registry at ``location``.

    Every checkpoint file carries its entry's metadata, so the files are the source: entries listed in
    ``index.json`` and files a killed writer left unlisted alike; the index adds its k. Entries already in
    the registry are skipped, so importing twice changes nothing; the instance then keeps its k best, as a
    submission would. Nothing in ``root`` is changed. Returns one line per instance and whether all went in.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root} to import")
    folders = sorted(path for path in root.iterdir() if (path / "index.json").is_file())
    if not folders:
        raise FileNotFoundError(f"no folder registry under {root} (no <instance>/index.json)")
    engine = open_database(location)
    lines, complete = [], True
    try:
        for folder in folders:
            try:
                lines.append(_import_folder(engine, folder, location))
            except RegistryError as error:
                lines.append(f"{folder.name}: not imported: {error}")
                complete = False
    finally:
        engine.dispose()
    return lines, complete


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv.pop(0) if argv and argv[0] in ("export", "import") else "show"
    parser = argparse.ArgumentParser(
        prog="python checkpoint_saver.py" + ("" if command == "show" else f" {command}"),
        description={"show": "The best checkpoints per problem instance: the leaderboard.",
                     "export": "Write an entry of the registry to a .pt file.",
                     "import": "Copy folder registries of the previous version into the database."}[command],
        epilog="commands: export INSTANCE [--rank N] [--out FILE.pt]; import FOLDER (a folder registry of "
               "the previous version). Each takes --registry.")
    if command == "import":
        parser.add_argument("folder", help="the folder holding <instance>/index.json")
    elif command == "export":
        parser.add_argument("instance", help="its key or a unique part of it")
        parser.add_argument("--rank", type=int, default=1, help="1 (default) is the best")
        parser.add_argument("--out", help="the .pt file to write (default: INSTANCE-rankN.pt)")
    else:
        parser.add_argument("--instance", help="show only this instance (its key or a unique part)")
    parser.add_argument("--registry", help=f"database URL or folder of registry.db (default: {DEFAULT_ROOT}; "
                                           "for import: FOLDER)")
    args = parser.parse_args(argv)
    try:
        if command == "import":
            lines, complete = import_folders(args.folder, args.registry or args.folder)
            print("\n".join(lines))
            print(f"the folders under {args.folder} are untouched; remove them once the leaderboard "
                  f"shows their entries")
            return 0 if complete else 2
        location = args.registry or DEFAULT_ROOT
        if command == "export":
            entry, out = export_entry(location, args.instance, args.rank, args.out)
            print(f"wrote {out}: {entry['instance']} rank {args.rank}, score {entry['score']:.6g} ± "
                  f"{entry['half_width']:.3g}, run {entry['run_name']}, step {entry['global_step']}")
        else:
            print(leaderboard(location, args.instance))
    except (OSError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _sanitise(text: str) -> str:
    text = _UNSAFE_CHARACTERS.sub("_", text)
    text = re.sub(r"\.{2,}", ".", text)
    return text.strip(".")  # no hidden files, no trailing dots (invalid on Windows)


def _is_safe_name(name: str) -> bool:
    return bool(_SAFE_NAME.fullmatch(name)) and ".." not in name and len(name) <= MAX_INSTANCE_KEY_LENGTH


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


def _serialise(obj: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, then move it over ``path`` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".tmp-{path.name}.{uuid.uuid4().hex}")
    try:
        with open(temp_path, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def _database_error(shown: str, error: sa.exc.DBAPIError) -> RegistryError:
    text = str(error.orig).strip() or type(error.orig).__name__
    first_line = text.splitlines()[0]
    if "lock" in first_line:
        return RegistryError(f"the registry {shown} stayed locked by other writers beyond the lock timeout "
                             f"({first_line}); try again, or stop a process that hangs")
    return RegistryError(f"cannot use the registry {shown}: {first_line}")


def _rank_order(lower_is_better: bool) -> tuple:
    score = entries_table.c.score
    # Equal scores: the older entry ranks first.
    return score.asc() if lower_is_better else score.desc(), entries_table.c.created, entries_table.c.id


def _beats(score: float, kth_score: float | None, lower_is_better: bool) -> bool:
    if kth_score is None:  # fewer than k entries
        return True
    return score < kth_score if lower_is_better else score > kth_score


def _kth_score_query(instance: str, lower_is_better: bool, offset: int | sa.ScalarSelect) -> sa.Select:
    """The score ranked ``offset + 1``-th (none if there are fewer entries)."""
    return (sa.select(entries_table.c.score).where(entries_table.c.instance == instance)
            .order_by(*_rank_order(lower_is_better)).offset(offset).limit(1))


def _kth_score(connection: sa.Connection, instance: str, top_k: int, lower_is_better: bool) -> float | None:
    return connection.execute(_kth_score_query(instance, lower_is_better, top_k - 1)).scalar()


def _equal_entry(connection: sa.Connection, instance: str, score: float, half_width: float) -> dict | None:
    """The oldest entry of ``instance`` with exactly this score and half-width ({run_name, global_step}), or None."""
    row = connection.execute(
        sa.select(entries_table.c.run_name, entries_table.c.global_step)
        .where(entries_table.c.instance == instance, entries_table.c.score == score,
               entries_table.c.half_width == half_width)
        .order_by(entries_table.c.created, entries_table.c.id).limit(1)
    ).one_or_none()
    return None if row is None else dict(row._mapping)


def _incompatibility(stored: sa.Row, shown: str, instance: str, protocol: dict,
                     lower_is_better: bool) -> str | None:
    """Why a writer with this protocol and direction may not write to an instance stored as ``stored``."""
    where = f"instance {instance} in the registry {shown}"
    if json.loads(stored.protocol) != protocol:
        return (f"{where} ranks checkpoints evaluated under protocol {stored.protocol}; this run's protocol is "
                f"{_protocol_text(protocol)}: use the same evaluation options or another --problem-instance or "
                "--registry")
    if stored.lower_is_better != lower_is_better:
        return (f"{where} ranks checkpoints with lower_is_better={stored.lower_is_better}; this run has "
                f"lower_is_better={lower_is_better}: use the same --lower-is-better setting or another "
                "--problem-instance or --registry")
    return None


@contextlib.contextmanager
def _instance_transaction(engine: sa.Engine, shown: str, instance: str, protocol: dict, lower_is_better: bool,
                          top_k: int, commit: bool = True) -> Iterator[tuple[sa.Connection, int]]:
    """A transaction holding the instance's write lock, refused if the instance ranks by another protocol or
    direction; yields the connection and the instance's k."""
    try:
        with engine.connect() as connection, connection.begin() as transaction:
            stored = _lock_instance(connection, instance, protocol, lower_is_better, top_k)
            problem = _incompatibility(stored, shown, instance, protocol, lower_is_better)
            if problem is not None:
                raise RegistryError(problem)
            yield connection, stored.top_k
            if not commit:
                transaction.rollback()
    except sa.exc.DBAPIError as error:
        raise _database_error(shown, error) from None


def _lock_instance(connection: sa.Connection, instance: str, protocol: dict, lower_is_better: bool,
                   top_k: int) -> sa.Row:
    """Write the instance's row first thing in the transaction (inserted with this protocol if new, its k
    raised to ``top_k``), which takes the instance's write lock; return the row as stored."""
    insert = (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)(instances_table)
    stored_k = instances_table.c.top_k
    connection.execute(
        insert.values(instance=instance, protocol=_protocol_text(protocol), lower_is_better=lower_is_better,
                      top_k=top_k)
        .on_conflict_do_update(index_elements=[instances_table.c.instance],
                               set_={"top_k": sa.case((stored_k < top_k, top_k), else_=stored_k)})
    )
    return connection.execute(sa.select(instances_table).where(instances_table.c.instance == instance)).one()


def _trim(connection: sa.Connection, instance: str, top_k: int, lower_is_better: bool) -> None:
    """Delete the entries ranked below the k-th."""
    displaced = connection.execute(
        sa.select(entries_table.c.id).where(entries_table.c.instance == instance)
        .order_by(*_rank_order(lower_is_better)).offset(top_k)
    ).scalars().all()
    if displaced:
        connection.execute(sa.delete(entries_table).where(entries_table.c.id.in_(displaced)))


def _ranked_entries(connection: sa.Connection, instance: str, lower_is_better: bool) -> list[dict]:
    rows = connection.execute(
        sa.select(*(entries_table.c[name] for name in ENTRY_FIELDS),
                  sa.func.length(entries_table.c.checkpoint).label("bytes"))
        .where(entries_table.c.instance == instance).order_by(*_rank_order(lower_is_better))
    )
    return [dict(row._mapping) for row in rows]


def _read_instance(connection: sa.Connection, instance: str) -> dict | None:
    stored = connection.execute(
        sa.select(instances_table).where(instances_table.c.instance == instance)
    ).one_or_none()
    if stored is None:
        return None
    return {"protocol": json.loads(stored.protocol), "top_k": stored.top_k,
            "lower_is_better": stored.lower_is_better,
            "entries": _ranked_entries(connection, instance, stored.lower_is_better)}


@contextlib.contextmanager
def _connected(engine: sa.Engine, shown: str) -> Iterator[sa.Connection]:
    """A connection for reading, whose database errors are ``RegistryError``s."""
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            yield connection  # reads only: no transaction to begin and roll back
    except sa.exc.DBAPIError as error:
        raise _database_error(shown, error) from None


@contextlib.contextmanager
def _reading(location: str | os.PathLike) -> Iterator[sa.Connection]:
    """A connection to an existing registry, closed with its engine afterwards."""
    engine = open_database(location, create=False)
    try:
        with _connected(engine, without_password(location)) as connection:
            yield connection
    finally:
        engine.dispose()


def _instance_names(connection: sa.Connection) -> list[str]:
    return sorted(connection.execute(sa.select(instances_table.c.instance)).scalars())


def _entry(location: str | os.PathLike, instance: str, rank: int) -> tuple[dict, bytes]:
    with _reading(location) as connection:
        instance = resolve_instance(_instance_names(connection), instance, location)
        ranked = _read_instance(connection, instance)["entries"]
        if not 1 <= rank <= len(ranked):
            raise RegistryError(f"instance {instance} has {len(ranked)} entries in the registry "
                                f"{without_password(location)}: give a rank from 1 to {len(ranked)}")
        entry = {**ranked[rank - 1], "instance": instance}
        selected = sa.select(entries_table.c.checkpoint).where(entries_table.c.id == entry["id"])
        return entry, connection.execute(selected).scalar_one()


def _format_instance(name: str, stored: dict) -> str:
    entries = stored["entries"]
    direction = "lower" if stored["lower_is_better"] else "higher"
    title = (f"{name}\n{len(entries)} checkpoint(s), top {stored['top_k']} kept, {direction} score is better; "
             f"protocol: {_protocol_text(stored['protocol'])}")
    # A trainer's run name starts with the instance's key, which the title already shows: "…" stands for it.
    rows = [[str(rank), f"{entry['score']:.6g} ± {entry['half_width']:.3g}",
             entry["run_name"].replace(f"{name}__", "…__", 1) if entry["run_name"].startswith(f"{name}__")
             else entry["run_name"],
             str(entry["global_step"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["created"])),
             entry["host"] or "?", f"{entry['bytes'] / 1024:.0f} KiB"]
            for rank, entry in enumerate(entries, start=1)]
    header = ["rank", "score ± 95% CI", "run", "step", "created", "host", "size"]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if column in (0, 1, 3, 6) else cell.ljust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    return title + "\n" + "\n".join(lines)


_IMPORTED_FIELDS = {"score": float, "half_width": float, "run_name": str, "global_step": int, "created": float}


def _import_folder(engine: sa.Engine, folder: Path, location: str | os.PathLike) -> str:
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except ValueError:
        index = {}  # the files alone are enough, as the folder registry's own repair knew
    if isinstance(index, list):
        raise RegistryError("an older version's registry, whose scores were not evaluated under a protocol")
    found, unusable = [], []
    for path in sorted(folder.glob("*.pt")):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            entry = {key: kind(checkpoint[key]) for key, kind in _IMPORTED_FIELDS.items()}
            kind = (_protocol_text(checkpoint["protocol"]), bool(checkpoint["lower_is_better"]))
            top_k = int(checkpoint["top_k"])
        except Exception:  # whatever torch or a missing key raises, the file cannot be imported
            unusable.append(path.name)
            continue
        found.append((entry, kind, top_k, path))
    kinds = {kind for _, kind, _, _ in found}
    if len(kinds) > 1:
        raise RegistryError(f"its files were ranked under different protocols or directions: {sorted(kinds)}")
    if not found:
        return f"{folder.name}: nothing to import" + (f" ({len(unusable)} unreadable file(s))" if unusable else "")
    protocol_text, lower_is_better = kinds.pop()
    index_k = index.get("top_k") if isinstance(index, dict) and isinstance(index.get("top_k"), int) else 1
    top_k = max([top_k for _, _, top_k, _ in found] + [index_k])
    with _instance_transaction(engine, without_password(location), folder.name, json.loads(protocol_text),
                               lower_is_better, top_k) as (connection, stored_k):
        existing = {(row.run_name, row.global_step, row.created) for row in connection.execute(
            sa.select(entries_table.c.run_name, entries_table.c.global_step, entries_table.c.created)
            .where(entries_table.c.instance == folder.name))}
        new = [(entry, path) for entry, _, _, path in found
               if (entry["run_name"], entry["global_step"], entry["created"]) not in existing]
        for entry, path in new:
            connection.execute(sa.insert(entries_table), [{**entry, "instance": folder.name, "host": None,
                                                           "checkpoint": path.read_bytes()}])
        _trim(connection, folder.name, stored_k, lower_is_better)
        kept = len(_ranked_entries(connection, folder.name, lower_is_better))
    parts = [f"{len(new)} imported", f"{len(found) - len(new)} already there", f"{kept} kept (top {stored_k})"]
    if unusable:
        parts.append(f"{len(unusable)} unreadable file(s) left out: {', '.join(unusable)}")
    return f"{folder.name}: " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
