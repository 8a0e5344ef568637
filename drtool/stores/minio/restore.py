"""MinIO restore: every object back with its content type and metadata, in parallel.

Before any upload every blob the restore needs is read, hashed, authenticated and checked
against the index (size, sha256), so a damaged blob fails the run with the target bucket
untouched. When the scratch dir has room for all of them, that one pass keeps the checked
plaintext there and the uploads read it (:func:`stage_blobs`: each blob is fetched and
decrypted once); otherwise the plaintext is discarded and each upload decrypts its blob again
into a scratch file, checked the same way, and only then puts it. With ``force`` an object
already in the bucket with the same size, content type, metadata and sha256 (read back) is
skipped. Objects under the restored prefix that the snapshot lacks ("extra" objects) are kept
and counted (``merge``, the default), or removed after every snapshot object is in place
(``mirror``): either way the result says how many, because a bucket that still holds objects
the snapshot never had is not the snapshot's bucket.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from drtool.errors import IntegrityError, UsageError
from drtool.repository.access import Repo, read_object, snapshot_header
from drtool.repository.manifest import ComponentEntry, Manifest, ObjectEntry
from drtool.repository.minio_index import IndexEntry, decode_index
from drtool.sources.minio import ALL_BUCKETS, MinioStore, ObjectMeta
from drtool.stores.stage import Plain, blob_header, check_all, stage

INDEX_SUFFIX = ".index.zst.age"
MAX_PROBLEMS = 10
#: free space left in the scratch dir after keeping every staged blob (else re-read per upload)
SCRATCH_RESERVE = 256 * 1024 * 1024
#: keep the plaintext only when the scratch dir could hold it this many times over: the target's
#: MinIO data (and PostgreSQL's) may share that disk on a one-host stack or a drill
KEEP_MARGIN = 2
#: free inodes left after the kept files
INODE_RESERVE = 1000
#: filesystems that are RAM: keeping a bucket there takes memory beside the live stack
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BucketSnapshot:
    """One bucket of a snapshot (its index, filtered by prefix) and where it goes."""

    bucket: str
    target: str
    entries: list[IndexEntry]
    prefix: str = ""  # only keys under it were chosen, and only they are compared

    @property
    def size(self) -> int:
        """Plaintext bytes of the objects."""
        return sum(e.size for e in self.entries)


@dataclass(frozen=True)
class BucketOutcome:
    """Objects put, skipped (already identical), and extra (not in the snapshot) in one bucket."""

    bucket: str
    uploaded: int
    skipped: int
    extra: int = 0  # objects under the prefix that the snapshot lacks, before any removal
    removed: bool = False  # mirror mode: the extra objects were removed


def load(
    repo: Repo,
    m: Manifest,
    comp: ComponentEntry,
    identities: list[str],
    *,
    target_buckets: tuple[str, ...],
    prefix: str,
) -> list[BucketSnapshot]:
    """Read every bucket index of the snapshot; map the buckets onto the target's.

    Buckets map by position when the target lists as many as the snapshot holds, else (and
    for ``buckets = ["*"]``) by name.
    """
    indexes = [o for o in comp.objects if o.kind == "minio_index"]
    sources = [index_bucket(o.key) for o in indexes]
    mapping = bucket_mapping(sources, target_buckets)
    manifest_blobs = {o.key: o for o in comp.objects if o.kind == "blob"}
    result = []
    for obj, bucket in zip(indexes, sources, strict=True):
        header = snapshot_header(m, "minio", obj.kind)
        entries = decode_index(read_object(repo, obj, header, identities))
        for e in entries:
            if manifest_blobs.get(e.blob_entry().key) != e.blob_entry():
                raise IntegrityError(f"{obj.key}: names a blob the manifest does not list")
        chosen = [e for e in entries if e.key.startswith(prefix)]
        result.append(BucketSnapshot(bucket, mapping[bucket], chosen, prefix))
    return result


def index_bucket(key: str) -> str:
    """The bucket a snapshot's index object holds (``.../<bucket>.index.zst.age``)."""
    return key.rsplit("/", 1)[-1].removesuffix(INDEX_SUFFIX)


def bucket_mapping(sources: list[str], target_buckets: tuple[str, ...]) -> dict[str, str]:
    """Source bucket -> target bucket: by position when the target lists as many as there are
    sources, else (and for ``buckets = ["*"]``) by name."""
    if len(target_buckets) == len(sources) and target_buckets != (ALL_BUCKETS,):
        return dict(zip(sources, target_buckets, strict=True))
    return {b: b for b in sources}


def held_objects(store: MinioStore, bucket: str) -> int | None:
    """Objects in the target bucket now; None when the bucket does not exist."""
    if not store.bucket_exists(bucket):
        return None
    return sum(1 for _ in store.list_objects(bucket))


def extra_keys(store: MinioStore, snap: BucketSnapshot) -> list[str]:
    """Keys under the snapshot's prefix in the target bucket that the snapshot lacks."""
    if not store.bucket_exists(snap.target):
        return []
    wanted = {e.key for e in snap.entries}
    return [
        o.key
        for o in store.list_objects(snap.target)
        if o.key.startswith(snap.prefix) and o.key not in wanted
    ]


def blobs_needed(buckets: list[BucketSnapshot]) -> list[ObjectEntry]:
    """The distinct blobs the restore reads."""
    unique = {e.blob_entry().key: e.blob_entry() for b in buckets for e in b.entries}
    return [unique[k] for k in sorted(unique)]


def check_blobs(
    repo: Repo,
    buckets: list[BucketSnapshot],
    identities: list[str],
    workers: int,
    cancel: threading.Event | None = None,
) -> None:
    """Read, hash and authenticate every blob the restore needs (nothing is written)."""
    blobs = blobs_needed(buckets)
    items = [(b, blob_header(repo, b)) for b in blobs]
    check_all(repo, items, identities, workers=workers, cancel=cancel)


@dataclass(frozen=True)
class ScratchFigures:
    """What the scratch dir's filesystem offers (``os.statvfs`` and its mount's type)."""

    free: int  # bytes an unprivileged writer may use (f_bavail * f_frsize)
    block: int  # f_frsize: every file takes whole blocks
    inodes: int  # f_favail
    fs_type: str  # from /proc/mounts; "" when unknown
    #: f_files: 0 when the filesystem has no fixed inode table (btrfs, vfat report 0 inodes,
    #: free ones included): then free inodes say nothing and are not checked
    total_inodes: int = 1

    @classmethod
    def of(cls, directory: Path) -> ScratchFigures:
        """The figures of the filesystem holding ``directory``."""
        st = os.statvfs(directory)
        return cls(
            st.f_bavail * st.f_frsize,
            st.f_frsize or 4096,
            st.f_favail,
            mount_type(directory),
            st.f_files,
        )


def mount_type(directory: Path) -> str:
    """The filesystem type of the mount holding ``directory`` (longest /proc/mounts prefix)."""
    real = str(directory.resolve())
    best, kind = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def keep_decision(figures: ScratchFigures, sizes: list[int], others: int) -> str:
    """'' when the plaintext of blobs of ``sizes`` may be kept in the scratch dir, else why not.

    Keeping is an optimisation, never a risk: every byte the rest of the restore writes must
    still fit afterwards. ``others``: scratch bytes the other stores of this restore stage and
    write while restoring (their ``staged_bytes``). Each file is counted in whole filesystem
    blocks, must leave :data:`INODE_RESERVE` inodes (unless the filesystem counts none), and
    the bytes must fit :data:`KEEP_MARGIN` times over plus :data:`SCRATCH_RESERVE` (the
    target's MinIO data may share the disk). Never on tmpfs/ramfs: that is RAM beside the
    live stack.
    """
    if figures.fs_type in RAM_FILESYSTEMS:
        return f"the scratch dir is on {figures.fs_type} (RAM)"
    block = max(1, figures.block)
    kept = sum(-(-size // block) * block for size in sizes)
    if figures.total_inodes and figures.inodes < len(sizes) + INODE_RESERVE:
        return f"{figures.inodes:,} free inodes for {len(sizes):,} files"
    needed = KEEP_MARGIN * kept + SCRATCH_RESERVE + others
    if figures.free < needed:
        return f"{figures.free:,} bytes free, keeping needs {needed:,}"
    return ""


class KeptBlobs:
    """The checked plaintext of each blob kept in the scratch dir, removed after its last use.

    Each blob is counted once per object that uses it (in every restored bucket); a file is
    unlinked as soon as the last of them is uploaded or skipped, so the scratch dir shrinks as
    the uploads go on instead of holding the whole bucket to the end.
    """

    def __init__(self, paths: dict[str, Path], uses: Counter[str]) -> None:
        self.paths = paths
        self._uses = Counter({k: uses[k] for k in paths})
        self._lock = threading.Lock()

    def get(self, key: str) -> Path | None:
        """The kept file of blob ``key``, if any."""
        return self.paths.get(key)

    def release(self, key: str) -> None:
        """One use of blob ``key`` is done; the last one removes its file."""
        with self._lock:
            if key not in self._uses:
                return
            self._uses[key] -= 1
            last = self._uses[key] <= 0
            if last:
                del self._uses[key]
        if last:
            self.paths[key].unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.paths)


def stage_blobs(
    repo: Repo,
    buckets: list[BucketSnapshot],
    identities: list[str],
    workdir: Path,
    workers: int,
    *,
    others: int = 0,
    cancel: threading.Event | None = None,
) -> KeptBlobs:
    """Check every blob the restore needs; keep its plaintext in ``workdir`` if safe.

    Returns the checked scratch file of each blob key: empty when :func:`keep_decision` says
    no (then only :func:`check_blobs` runs, and each upload stages its blob again). Either
    way a damaged blob raises before anything is put.
    """
    plain = {e.blob_entry().key: Plain(e.size, e.sha256) for b in buckets for e in b.entries}
    uses = Counter(e.blob_entry().key for b in buckets for e in b.entries)
    sizes = [p.size or 0 for p in plain.values()]
    if keep_decision(ScratchFigures.of(workdir), sizes, others):
        check_blobs(repo, buckets, identities, workers, cancel)
        return KeptBlobs({}, uses)
    blobs = blobs_needed(buckets)
    paths = {b.key: workdir / f"blob-{i}" for i, b in enumerate(blobs)}

    def one(blob: ObjectEntry) -> None:
        header = blob_header(repo, blob)
        stage(repo, blob, header, identities, paths[blob.key], plain[blob.key], cancel=cancel)

    _parallel(one, blobs, workers)
    return KeptBlobs(paths, uses)


def restore(
    repo: Repo,
    store: MinioStore,
    snap: BucketSnapshot,
    identities: list[str],
    workdir: Path,
    *,
    force: bool,
    workers: int,
    mirror: bool = False,
    staged: KeptBlobs | None = None,
) -> BucketOutcome:
    """Put every object of ``snap`` into its target bucket (created if missing).

    ``staged``: each blob's checked plaintext (:func:`stage_blobs`), released after each
    object's upload or skip; a blob not in it is staged here, into a scratch file removed
    after its upload.

    Then the extra objects (under the prefix, not in the snapshot) are counted and, with
    ``mirror``, removed: only after every snapshot object is in place, so a failed put never
    leaves a bucket emptied.
    """
    held = held_objects(store, snap.target)
    if held and not force:
        raise UsageError(
            f"minio bucket {snap.target}: holds {held} objects now; "
            "nothing changed, use --force to restore into it"
        )
    store.ensure_bucket(snap.target)
    counter = itertools.count()

    def one(e: IndexEntry) -> bool:
        blob = e.blob_entry()
        try:
            return put(e, blob)
        finally:
            if staged is not None:
                staged.release(blob.key)

    def put(e: IndexEntry, blob: ObjectEntry) -> bool:
        meta = ObjectMeta(e.content_type, e.metadata)
        if force and _identical(store, snap.target, e, meta):
            return False
        checked = staged.get(blob.key) if staged is not None else None
        if checked is not None:
            store.upload(snap.target, e.key, checked, meta)
            return True
        path = workdir / f"object-{next(counter)}"
        try:
            stage(repo, blob, blob_header(repo, blob), identities, path, Plain(e.size, e.sha256))
            store.upload(snap.target, e.key, path, meta)
        finally:
            path.unlink(missing_ok=True)
        return True

    done = _parallel(one, snap.entries, workers)
    uploaded = sum(done)
    extra = extra_keys(store, snap)
    if mirror and extra:
        _parallel(lambda key: store.delete(snap.target, key), extra, workers)
    return BucketOutcome(snap.target, uploaded, len(done) - uploaded, len(extra), mirror)


def _sha256_of(store: MinioStore, bucket: str, key: str) -> tuple[int, str, ObjectMeta]:
    meta, stream = store.read(bucket, key)
    digest, size = hashlib.sha256(), 0
    for chunk in stream:
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest(), meta


def _identical(store: MinioStore, bucket: str, e: IndexEntry, meta: ObjectMeta) -> bool:
    found = store.head(bucket, e.key)
    if found is None or found != (e.size, meta):
        return False
    size, sha, _ = _sha256_of(store, bucket, e.key)
    return size == e.size and sha == e.sha256


def verify(store: MinioStore, snap: BucketSnapshot, workers: int) -> list[str]:
    """Read every restored object back: size, sha256, content type and metadata."""

    def one(e: IndexEntry) -> str | None:
        size, sha, meta = _sha256_of(store, snap.target, e.key)
        where = f"minio {snap.target}/{e.key}"
        if size != e.size or sha != e.sha256:
            return f"{where}: {size} bytes with another sha256 than the snapshot's"
        if meta != ObjectMeta(e.content_type, e.metadata):
            return f"{where}: content type or metadata differ from the snapshot's"
        return None

    problems = [p for p in _parallel(one, snap.entries, workers) if p]
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more"]
    return problems


def _parallel(fn: Callable[[T], R], items: list[T], workers: int) -> list[R]:
    """``fn`` over ``items`` on a small pool; the first failure cancels the rest and raises."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            return list(pool.map(fn, items))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
