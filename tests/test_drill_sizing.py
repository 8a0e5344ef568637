"""19.12: a docker drill's container memory limits, sized from the snapshot's manifest.

Pure arithmetic on a manifest: the real containers started with these limits are in
``test_drill_docker.py`` (a snapshot too large for a fixed limit passes once it is sized).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from drtool.drills.definition import DockerImages, parse_definition
from drtool.drills.sizing import FLOOR_MIB, MIB, STEP_MIB, limit_bytes, size_limits
from drtool.errors import ConfigError
from drtool.repository.manifest import ComponentEntry, Manifest, ObjectEntry


def manifest(rdb: int, dump: int, largest_object: int, index: int) -> Manifest:
    """A manifest whose stores hold data of these sizes (bytes)."""
    blob = ObjectEntry("blobs/aa", "blob", largest_object, "0" * 64)
    small = ObjectEntry("blobs/bb", "blob", 1000, "1" * 64)
    idx = ObjectEntry("snap/minio/attachments.index", "minio_index", index, "2" * 64)
    return Manifest(
        "repo", "snap", "", "", "host", "stack", "test",
        (
            ComponentEntry("postgres", (), dump, 0.0),
            ComponentEntry("redis", (), rdb, 0.0),
            ComponentEntry("minio", (idx, blob, small), largest_object + 1000, 0.0),
        ),
    )  # fmt: skip


def limits(images: DockerImages) -> dict[str, int]:
    sizes = {
        role: limit_bytes(getattr(images, f"{role}_memory"))
        for role in ("postgres", "redis", "minio")
    }
    assert all(v is not None for v in sizes.values()), sizes
    return {role: int(v or 0) // MIB for role, v in sizes.items()}


def test_a_small_snapshot_gets_the_floor() -> None:
    sized, why = size_limits(DockerImages(), manifest(1000, 1000, 1000, 100))
    assert limits(sized) == FLOOR_MIB
    assert all("floor" in s.why for s in why)


def test_limits_grow_with_the_snapshot_and_stop_at_the_ceiling() -> None:
    small, _ = size_limits(DockerImages(), manifest(10 * MIB, 10 * MIB, 10 * MIB, MIB))
    large, why = size_limits(DockerImages(), manifest(200 * MIB, 4000 * MIB, 100 * MIB, MIB))
    assert limits(small)["redis"] >= FLOOR_MIB["redis"]
    assert limits(large)["redis"] > limits(small)["redis"] >= 4 * 10
    assert limits(large)["minio"] > limits(small)["minio"] >= FLOOR_MIB["minio"]
    assert limits(large)["postgres"] > limits(small)["postgres"] >= FLOOR_MIB["postgres"]
    # the case of issue 19.12: a 54 MiB object no longer meets a fixed 256m MinIO
    assert limits(size_limits(DockerImages(), manifest(0, 0, 54 * MIB, MIB))[0])["minio"] > 256
    huge, why = size_limits(DockerImages(), manifest(10**12, 10**12, 10**12, MIB))
    assert limits(huge) == {"postgres": 4096, "redis": 8192, "minio": 4096}
    assert all("ceiling" in s.why for s in why)


def test_tmpfs_counts_the_data_against_the_limit() -> None:
    snapshot = manifest(MIB, 400 * MIB, 300 * MIB, MIB)
    on_disk, _ = size_limits(DockerImages(), snapshot)
    in_memory, _ = size_limits(DockerImages(data="tmpfs"), snapshot)
    # limits grow in steps of STEP_MIB
    assert limits(in_memory)["postgres"] >= limits(on_disk)["postgres"] + 3 * 400 - STEP_MIB
    assert limits(in_memory)["minio"] >= limits(on_disk)["minio"] + 300 - STEP_MIB


def test_an_explicit_limit_always_wins() -> None:
    images = replace(DockerImages(), redis_memory="16m")
    sized, why = size_limits(images, manifest(500 * MIB, 0, 0, 0))
    assert sized.redis_memory == "16m"
    assert [s.why for s in why if s.role == "redis"] == ["set in the definition"]
    assert limits(sized)["postgres"] == FLOOR_MIB["postgres"]


def test_no_manifest_gives_the_floor() -> None:
    assert limits(size_limits(DockerImages(), None)[0]) == FLOOR_MIB


@pytest.mark.parametrize("value", ["lots", "256 m", "1.5g", "-1m"])
def test_a_malformed_limit_is_refused_at_load(value: str) -> None:
    with pytest.raises(ConfigError, match=r"docker\.minio_memory: expected a memory limit"):
        parse_definition(f'[docker]\nminio_memory = "{value}"\n')
