"""`audit index`: register the training set and its contributors, and embed it into the vector table.

Crash safety: vectors are written to LanceDB before their DuckDB rows commit, and
every run first drops vectors whose ids DuckDB never committed, so a kill at any
moment leaves both stores agreeing after the next run.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import embed, ingest, prompts, sources
from .errors import AuditError
from .progress import Progress, Silent
from .prompts.base import clean
from .search import VectorTable
from .sources import Entry
from .store import Store, record_encoder, record_vector_table, utcnow
from .workspace import Workspace

log = logging.getLogger("auditor")

MANIFEST_NAME = "contributors.csv"


def _text(value: str | None) -> str | None:
    return clean(value).strip() or None if value else None


def read_manifest(manifest: str | os.PathLike) -> list[Entry]:
    """Rows of a contributors manifest: path, contributor_id [, contributor_name, caption, license]; paths relative to the file.
    UTF-8 with or without a BOM; text is cleaned like metadata (prompts.base.clean). A path listed twice for one
    contributor is one entry; listed for two or more, one entry with `claimants` set and no contributor (conflict_path)."""
    manifest = Path(manifest).resolve()
    previous = csv.field_size_limit()
    reader = None
    try:
        # A caption field may be as long as a sidecar is read (later cut to [scan] max_text_chars); csv's default
        # stops at 128 KiB.
        csv.field_size_limit(max(previous, prompts.MAX_SIDECAR_BYTES))
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "contributor_id"} - set(reader.fieldnames or [])
            if missing:
                raise AuditError(
                    f"{manifest}: missing column(s) {', '.join(sorted(missing))}; the manifest needs at least path,contributor_id"
                )
            rows = list(reader)
    except FileNotFoundError:
        raise AuditError(f"manifest {manifest} does not exist") from None
    except UnicodeDecodeError:
        raise AuditError(f"manifest {manifest} is not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise AuditError(f"manifest {manifest}, line {reader.line_num + 1 if reader else 1}: {exc}") from None
    finally:
        csv.field_size_limit(previous)
    base = manifest.parent
    entries: dict[str, Entry] = {}
    for row in rows:
        if not row.get("path"):
            continue
        entry = Entry(
            path=os.path.normpath(base / row["path"]),
            contributor_id=_text(row.get("contributor_id")),
            contributor_name=_text(row.get("contributor_name")),
            caption=_text(row.get("caption")),
            license=_text(row.get("license")),
        )
        seen = entries.setdefault(entry.path, entry)
        if seen is not entry and entry.contributor_id and entry.contributor_id not in seen.owners:
            seen.claimants = (*seen.owners, entry.contributor_id)
            seen.contributor_id = None
    return list(entries.values())


def discover_entries(root: str | os.PathLike) -> list[Entry]:
    """Without a manifest: every image under root; the contributor is its top-level folder's name."""
    root = Path(root)
    entries = []
    for path in ingest.discover(root):
        parts = Path(path).relative_to(root).parts
        entries.append(Entry(path=path, contributor_id=parts[0] if len(parts) > 1 else None))
    return entries


def people_of(entries: list[Entry]) -> dict[str, Entry]:
    """Each contributor's entry to register them from: their first, or the first that gives a name."""
    people: dict[str, Entry] = {}
    for entry in entries:
        note_person(people, entry)
    return people


def note_person(people: dict[str, Entry], entry: Entry) -> None:
    if entry.contributor_id:
        seen = people.setdefault(entry.contributor_id, entry)
        if not seen.contributor_name and entry.contributor_name:
            people[entry.contributor_id] = entry


def upsert_contributors(store: Store, people: dict[str, Entry]) -> int:
    """Register these contributors, or update the name and licence of those already registered."""
    if not people:
        return 0
    data = pa.table(
        {
            "id": list(people),
            "name": [e.contributor_name for e in people.values()],
            "license": [e.license for e in people.values()],
        }
    )
    store.con.register("_people", data)
    try:
        store.con.execute(
            "INSERT INTO contributors (id, name, license) SELECT id, name, license FROM _people"
            " ON CONFLICT (id) DO UPDATE SET name = coalesce(excluded.name, contributors.name),"
            " license = coalesce(excluded.license, contributors.license)"
        )
    finally:
        store.con.unregister("_people")
    return len(people)


@dataclass
class IndexResult:
    encoder_id: str
    added: int = 0
    re_embedded: int = 0
    unchanged: int = 0
    errors: int = 0
    rows: int = 0
    ann_index: str | None = None
    seconds: float = 0.0
    error_samples: list[tuple[str, str]] = field(default_factory=list)


def index_training(
    ws: Workspace,
    source: str | os.PathLike | None,
    manifest: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    engine: str = "local",
    allow_outside: bool = False,
    fields: sources.Fields | None = None,
) -> IndexResult:
    """Register and embed a training set (None: only embed registered images this encoder lacks).

    `source`: a folder of images (with its contributors manifest), or WebDataset tar shards or Parquet manifests named
    by a path, URL or pattern (`shards/{00000..00999}.tar`; sources.py), their columns and fields named by `fields`
    (default: [sources] in audit.toml). Re-running adds only images whose sha256 is new, and reads only the shards not
    read to their end before. Files resolving outside the folder (or a Parquet file's folder) are refused
    (index_errors: outside_training_dir) unless `allow_outside`."""
    started = time.perf_counter()
    progress = progress or Silent()
    limits = ws.limits
    fields = fields or ws.config.sources.fields()
    storage = ws.storage
    source = open_source(source, manifest, limits=limits, fields=fields, storage=storage, allow_outside=allow_outside)
    batch_size = batch_size or ws.config.encoder.batch_size
    if engine == "ray":
        if not isinstance(source, FolderSource):
            raise AuditError("--engine ray reads training folders only for now; index shards and Parquet without it")
        from . import engine_ray

        return engine_ray.index_training(
            ws, source.entries, device=device, batch_size=batch_size, limits=limits, progress=progress
        )
    if engine != "local":
        raise AuditError(f"unknown engine {engine!r}; use local or ray")

    with ws.writing(), Store(ws.db_path) as store:
        encoder = embed.load(ws.encoder_dir(), ws.device(device), ws.config.encoder.precision)
        table = ws.vector_table(encoder)
        ledger = IndexLedger(store, encoder, table, source.entries, ws.lancedb_uri)
        units = [
            *sources.registered_units(list(ledger.by_path.values()), fields, limits, storage),
            *source.units(ledger.done),
        ]
        progress.start("indexing", sum(unit.size or 1 for unit in units))
        batch: list[tuple[Entry, ingest.Item]] = []

        def load(entry: Entry) -> tuple[Entry, ingest.Item]:
            if entry.refused:
                return entry, ingest.Item(entry.path, error=ingest.IngestError(*entry.refused))
            return entry, ingest.load_item(
                entry.path,
                limits,
                encoder.preprocess,
                ledger.is_embedded,
                lambda path, info, max_chars: ledger.caption_of(entry, max_chars),
                read=lambda path, limits: sources.entry_bytes(entry, limits, storage),
            )

        def flush() -> None:
            if not batch:
                return
            ids, new_rows = ledger.assign(batch)
            vectors = encoder.index_features(
                np.stack([item.pixels for _, item in batch]),
                [item.text for _, item in batch],
                [item.sha256 for _, item in batch],
            )
            table.add(ids, [entry.contributor_id for entry, _ in batch], vectors)
            ledger.commit(ids, new_rows, len(batch))
            batch.clear()

        # One unit (a shard, a Parquet file, the folder) at a time: its last batch is committed before it is recorded
        # as read, so a rerun after a kill starts at the unit in flight.
        for unit in units:
            samples = 0
            for entry, item in ingest.load_all(unit, ws.config.scan.loader_threads, load):
                samples += 1
                if unit.size is not None:
                    progress.advance()
                if ledger.take(item, entry):
                    batch.append((entry, item))
                if len(batch) >= batch_size:
                    flush()
            flush()
            if unit.size is None:
                progress.advance()
            ledger.unit_done(unit, samples)
        ledger.finish()
    ledger.result.seconds = time.perf_counter() - started
    return ledger.result


class FolderSource:
    """A folder of image files and its contributors manifest: every entry is known before reading, so the ledger
    settles manifest refusals and conflicts up front; its entries are read with the registered ones (one unit)."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries

    def units(self, done: set[str]) -> list[sources.Unit]:
        return []


def open_source(
    target: str | os.PathLike | None,
    manifest: str | os.PathLike | None = None,
    *,
    limits: ingest.Limits,
    fields: sources.Fields,
    storage: sources.Storage,
    allow_outside: bool = False,
) -> FolderSource | sources.ContainerSource:
    """The training source `target` names: a folder, or shards / Parquet files (by their names' endings)."""
    if target is None or (not sources.is_remote(str(target)) and Path(target).is_dir()):
        return FolderSource(read_entries(target, manifest, allow_outside=allow_outside))
    uris = sources.list_shards(os.fspath(target), storage)
    kinds = {sources.kind_of(uri) for uri in uris}
    if not uris:
        raise AuditError(f"no shards or Parquet files match {target}")
    if kinds == {None} and len(uris) == 1 and not os.path.exists(uris[0]):
        raise AuditError(f"training folder {uris[0]} does not exist")
    if None in kinds or len(kinds) != 1:
        raise AuditError(
            f"{target} is not a folder, nor WebDataset shards (.tar) or Parquet files (.parquet) only; "
            "name a training folder or a pattern such as shards/{00000..00099}.tar"
        )
    if manifest is not None:
        raise AuditError("--contributors is for training folders; shards and Parquet files carry their contributors")
    if sources.is_remote(uris[0]):
        storage.filesystem(uris[0])  # storage settings that cannot work fail here, in one line
    return sources.ContainerSource(uris, fields, limits, storage, allow_outside=allow_outside)


def read_entries(
    training_dir: str | os.PathLike | None, manifest: str | os.PathLike | None = None, *, allow_outside: bool = False
) -> list[Entry]:
    """The training entries of a folder: from its manifest (given, or TRAINING_DIR/contributors.csv), else one per image.
    An entry whose file resolves outside TRAINING_DIR (`../x.png`, an absolute path, a symlink pointing out) is refused
    (outside_training_dir) unless `allow_outside`."""
    if training_dir is None:
        return []
    training_dir = Path(training_dir).resolve()
    if not training_dir.is_dir():
        raise AuditError(f"training folder {training_dir} does not exist")
    if manifest is None and (training_dir / MANIFEST_NAME).is_file():
        manifest = training_dir / MANIFEST_NAME
    entries = read_manifest(manifest) if manifest else discover_entries(training_dir)
    root = os.path.realpath(training_dir)
    for entry in entries:
        try:
            real = os.path.realpath(entry.path)
        except ValueError:  # a NUL in the path
            entry.refused = ("not_a_file", "the path contains a NUL character")
            continue
        if not allow_outside and os.path.commonpath([root, real]) != root:
            entry.refused = (
                "outside_training_dir",
                f"resolves to {ingest.display_path(real)}, outside the training folder {ingest.display_path(root)};"
                " `audit index --allow-outside` indexes it",
            )
    return entries


def own(store: Store, table: VectorTable) -> None:
    """Make sure `table` is this workspace's, recording it there when no workspace has yet; refuse another's.

    A table with no owner recorded is claimed when it is empty, when this store's vector_tables lists it (written
    before owners were recorded), or when every vector in it is one of this store's training images; otherwise it holds
    vectors of an unknown workspace and is refused, as another's is. Everything reconcile deletes is then this
    workspace's own: vectors its interrupted runs appended."""
    mine = store.value("SELECT id FROM workspace")
    here = str(store.path.parent)
    owner, owner_dir = table.owner()
    if owner is None:
        ids = table.ids()
        listed = store.value("SELECT count(*) FROM vector_tables WHERE table_name = ?", [table.name])
        committed = np.asarray([r[0] for r in store.rows("SELECT id FROM training_images")], np.int64)
        if len(ids) and not listed and len(np.setdiff1d(ids, committed)):
            raise AuditError(
                f"LanceDB table {table.name} at {table.uri} holds {len(ids)} vectors that no workspace recorded as its"
                f" own, not all of them training images of this workspace ({here}); point [paths] lancedb in"
                f" {store.path.parent / 'audit.toml'} at a location of its own"
            )
        table.claim(mine, here)
        owner, owner_dir = table.owner()  # another workspace claiming at the same moment: the last commit wins
    if owner != mine:
        raise AuditError(
            f"LanceDB table {table.name} at {table.uri} belongs to workspace {owner} ({owner_dir}), not to this"
            f" workspace {mine} ({here}); two workspaces cannot share a vector table: point [paths] lancedb in"
            f" {store.path.parent / 'audit.toml'} at a location of its own"
        )


def reconcile(store: Store, table: VectorTable) -> tuple[int, int]:
    """Make the stores agree before anything reads them; call under `ws.writing()`. Returns (vectors, attributions) dropped.

    The table must be this workspace's (own): another workspace's vectors are never deleted or searched.
    Vectors are appended to LanceDB before their training_images rows commit, so a killed `audit index` can leave
    vectors whose rows never committed: they are dropped (the next index embeds those images again, under the same
    ids). Attribution rows citing a training id the store does not have (made by a scan that searched such vectors,
    before this check existed) are dropped with the rest of their generation's ranking, so the next scan attributes the
    generation again; kept, they would be credited to whichever image is later registered under that id."""
    own(store, table)
    committed = np.asarray([r[0] for r in store.rows("SELECT id FROM training_images")], np.int64)
    dangling = np.setdiff1d(table.ids(), committed)
    if len(dangling):
        log.warning("dropping %d vector(s) whose training_images rows never committed", len(dangling))
        table.delete_ids(dangling)
    with store.transaction():
        rankings = (
            "SELECT DISTINCT a.generation_id, a.method, a.encoder_id FROM attributions a"
            " WHERE NOT EXISTS (SELECT 1 FROM training_images t WHERE t.id = a.training_id)"
        )
        dropped = store.value(
            f"SELECT count(*) FROM attributions WHERE (generation_id, method, encoder_id) IN ({rankings})"
        )
        if dropped:
            log.warning("dropping %d attribution row(s) of rankings that cite unregistered training ids", dropped)
            store.con.execute(f"DELETE FROM attributions WHERE (generation_id, method, encoder_id) IN ({rankings})")
    return len(dangling), int(dropped or 0)


class IndexLedger:
    """The audit-store side of `audit index`, shared by every engine: contributors, which contents are
    registered and embedded, id assignment, and the commit of each batch after its vectors are written.

    Opening it makes the stores agree (reconcile: a crash between the two writes). Ownership (schemas/README.md,
    index_errors): a contributor is registered with their first indexed image; content the manifest lists for two or
    more contributors (one path twice: conflict_path; the same bytes at two paths: conflict_content) is registered
    without a contributor, so nobody is paid for it until the manifest names one owner; content already registered to
    a contributor keeps that owner when the manifest lists it for another (conflict_content, reported)."""

    def __init__(
        self, store: Store, encoder: embed.Encoder, table: VectorTable, entries: list[Entry], lancedb_uri: str
    ):
        self.store = store
        self.table = table
        self.encoder_id = encoder.id
        self.lancedb_uri = lancedb_uri
        self.result = IndexResult(encoder.id)
        self.errors: list[tuple[str, str, str]] = []
        for entry in entries:
            if entry.refused:
                self.errors.append((ingest.display_path(entry.path), *entry.refused))
            elif len(entry.claimants) > 1:
                self.errors.append(
                    (
                        ingest.display_path(entry.path),
                        "conflict_path",
                        f"listed for contributors {' and '.join(entry.claimants)}; indexed without a contributor"
                        " until the manifest lists it for one",
                    )
                )
        entries = [entry for entry in entries if not entry.refused]
        self.people = people_of(entries)
        with store.transaction():
            record_encoder(store, encoder.id, encoder.name, str(encoder.directory), encoder.dim, encoder.config)
            # New contributors are registered with their first indexed image (commit); known ones get name updates.
            self.listed = {r[0] for r in store.rows("SELECT id FROM contributors")}
            upsert_contributors(store, {c: p for c, p in self.people.items() if c in self.listed})
        reconcile(store, table)

        # Shards and Parquet files read to their end (a failed one is read again).
        self.done = {r[0] for r in store.rows("SELECT shard FROM training_shards WHERE status = 'done'")}
        self.written = 0  # of self.errors, how many are in index_errors already
        self.embedded = set(table.ids().tolist())
        self.registered, self.owner, self.registered_path = {}, {}, {}
        for sha, i, contributor, path in store.rows("SELECT sha256, id, contributor_id, path FROM training_images"):
            self.registered[sha], self.owner[sha], self.registered_path[sha] = i, contributor, path
        entries = list(entries)
        # Registered images this encoder has not embedded yet (e.g. after switching encoders).
        for i, path, contributor, caption, shard, key, member in store.rows(
            "SELECT id, path, contributor_id, caption, shard, shard_key, shard_member FROM training_images ORDER BY id"
        ):
            if i not in self.embedded:
                entries.append(
                    Entry(
                        path, contributor, caption=caption, known_id=i, shard=shard, shard_key=key, shard_member=member
                    )
                )
        self.by_path = {e.path: e for e in entries}
        self.next_id = store.next_id("training_images")
        self.seen: set[str] = set()
        # Who this run's manifest lists each content for: sha256 -> {contributor: first path}.
        self.claims: dict[str, dict[str, str]] = {}

    def is_embedded(self, sha256: str) -> bool:
        return sha256 in self.registered and self.registered[sha256] in self.embedded

    def caption_of(self, entry: Entry, max_chars: int) -> tuple[str | None, str]:
        """The caption embedded with an entry's image: its source's, else (a file) its sidecar's."""
        if entry.caption:
            return entry.caption[:max_chars], entry.caption_source
        if entry.shard:
            return None, "none"
        return prompts.read_sidecar(entry.path, max_chars)

    def take(self, item: ingest.Item, entry: Entry) -> bool:
        """Count one loaded file (of `entry`); True when its content should be embedded in the caller's next batch."""
        if entry.warning:
            self.errors.append((entry.path, *entry.warning))
        if item.error:
            self.errors.append((item.path, item.error.code, item.error.reason))
            return False
        if entry.known_id is None:
            note_person(self.people, entry)
            claims = self.claims.setdefault(item.sha256, {})
            for contributor in entry.owners:
                claims.setdefault(contributor, item.path)
        if item.skipped or item.sha256 in self.seen:
            self.result.unchanged += 1
            return False
        self.seen.add(item.sha256)
        return True

    def assign(self, batch: list[tuple[Entry, ingest.Item]]) -> tuple[np.ndarray, list[tuple[int, Entry, ingest.Item]]]:
        """The vector id of each item (its registered id, or the next new one) and the rows to register."""
        ids, new_rows = [], []
        for entry, item in batch:
            if item.sha256 in self.registered:
                ids.append(self.registered[item.sha256])
                self.result.re_embedded += 1
            else:
                ids.append(self.next_id)
                new_rows.append((self.next_id, entry, item))
                self.next_id += 1
        return np.asarray(ids, np.int64), new_rows

    def commit(self, ids: np.ndarray, new_rows: list[tuple[int, Entry, ingest.Item]], n: int) -> None:
        """Register the batch's new images and their contributors; call after its vectors are in the table."""
        with self.store.transaction():
            self._register({e.contributor_id for _, e, _ in new_rows})
            self.store.insert_arrow("training_images", _training_rows(new_rows))
        for i, entry, item in new_rows:
            self.registered[item.sha256] = i
            self.owner[item.sha256] = entry.contributor_id
            self.registered_path[item.sha256] = item.path
        self.embedded.update(np.asarray(ids).tolist())
        self.result.added += len(new_rows)
        log.info("indexed batch of %d (%d new)", n, len(new_rows))

    def _register(self, contributors: set[str | None]) -> None:
        new = {c for c in contributors if c and c not in self.listed}
        upsert_contributors(self.store, {c: self.people.get(c, Entry("", c)) for c in new})
        self.listed |= new

    def _ownership(self) -> list[tuple[str | None, str]]:
        """Settle this run's claims (see the class doc): conflict errors, and the (owner, sha256) updates to make."""
        updates = []
        for sha, claims in self.claims.items():
            if sha not in self.registered:
                continue
            owner = self.owner[sha]
            if len(claims) > 1:
                first, first_path = next(iter(claims.items()))
                for contributor, path in claims.items():
                    if path != first_path:
                        self.errors.append(
                            (
                                path,
                                "conflict_content",
                                f"same bytes as {first_path} (listed for contributor {first}); listed here for"
                                f" contributor {contributor}; indexed without a contributor until the manifest lists"
                                " it for one",
                            )
                        )
                if owner is not None:
                    updates.append((None, sha))
            elif claims:
                ((contributor, path),) = claims.items()
                if owner is None:
                    updates.append((contributor, sha))
                elif owner != contributor:
                    self.errors.append(
                        (
                            path,
                            "conflict_content",
                            f"same bytes as training image {self.registered[sha]} ({self.registered_path[sha]}),"
                            f" registered to contributor {owner}; listed here for contributor {contributor};"
                            f" it stays {owner}'s",
                        )
                    )
        return updates

    def unit_done(self, unit: sources.Unit, samples: int) -> None:
        """Record a unit read to its end (its samples are committed): its errors, and the shard as read, or as failed
        (read again next run) when it stopped early. One transaction, so a kill leaves the unit to be read again."""
        if unit.error:
            self.errors.append((unit.shard or "", *unit.error))
        with self.store.transaction():
            errors = self._write_errors()
            if unit.shard:
                self.store.con.execute(
                    "INSERT OR REPLACE INTO training_shards (shard, status, samples, errors, reason, indexed_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        unit.shard,
                        "failed" if unit.error else "done",
                        samples,
                        errors,
                        unit.error[1] if unit.error else None,
                        utcnow(),
                    ],
                )

    def _write_errors(self) -> int:
        """Append the errors not written yet to index_errors (inside a transaction); returns how many."""
        new = self.errors[self.written :]
        self.store.insert_arrow(
            "index_errors",
            pa.table({"path": [e[0] for e in new], "code": [e[1] for e in new], "reason": [e[2] for e in new]}),
        )
        self.written = len(self.errors)
        return len(new)

    def finish(self) -> IndexResult:
        """Settle ownership, record the errors, build or maintain the ANN index, and record the vector table."""
        result, table = self.result, self.table
        updates = self._ownership()
        errors = self.errors
        result.errors = len(errors)
        result.error_samples = [(p, r) for p, _, r in errors[:5]]
        with self.store.transaction():
            if updates:
                self._register({owner for owner, _ in updates})
                self.store.con.executemany("UPDATE training_images SET contributor_id = ? WHERE sha256 = ?", updates)
            self._write_errors()
            result.ann_index = table.maintain()
            result.rows = table.count()
            record_vector_table(
                self.store, self.encoder_id, self.lancedb_uri, table.name, result.rows, table.version, result.ann_index
            )
        return result


def _training_rows(rows: list[tuple[int, Entry, ingest.Item]]) -> pa.Table:
    now = utcnow()
    return pa.table(
        {
            "id": pa.array([i for i, _, _ in rows], pa.int64()),
            "path": [item.path for _, _, item in rows],
            "sha256": [item.sha256 for _, _, item in rows],
            "contributor_id": [entry.contributor_id for _, entry, _ in rows],
            "caption": [item.text for _, _, item in rows],
            "caption_source": [item.text_source for _, _, item in rows],
            "width": pa.array([item.width for _, _, item in rows], pa.int32()),
            "height": pa.array([item.height for _, _, item in rows], pa.int32()),
            "indexed_at": pa.array([now] * len(rows), pa.timestamp("us")),
            "shard": pa.array([entry.shard for _, entry, _ in rows], pa.string()),
            "shard_key": pa.array([entry.shard_key for _, entry, _ in rows], pa.string()),
            "shard_member": pa.array([entry.shard_member for _, entry, _ in rows], pa.string()),
        }
    )


def reindex(
    ws: Workspace, bundle: str | os.PathLike, *, device: str | None = None, progress: Progress | None = None
) -> IndexResult:
    """Point the workspace at another encoder and embed every registered training image into its own table.
    Attributions made by the previous encoder keep its id and stay queryable."""
    embed.read_config(bundle)  # fail before changing anything
    previous = ws.config.encoder.path
    ws.config.encoder.path = str(Path(bundle).expanduser().resolve())
    try:
        return index_training(ws, None, device=device, progress=progress)
    except Exception:
        ws.config.encoder.path = previous
        raise
    finally:
        ws.save()
