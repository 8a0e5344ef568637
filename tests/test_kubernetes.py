"""deploy/kubernetes/ checked offline: rendered by kustomize, validated, held to the schedule.

No cluster runs here (ADR 0024). What can be checked without one is checked: every
kustomization under deploy/kubernetes/ renders with ``kubectl kustomize``; every resource
validates against the Kubernetes OpenAPI schemas that ``kubernetes-validate`` bundles, pinned
to one version, strictly (an unknown field fails); and semantic checks catch drift from the
rest of the repository: one CronJob per scheduled job with the same timing, retries and time
zone, the configs and schedules in ConfigMaps load with drtool's own loaders, every container
is confined and limited, no secret is inlined, no workload but the drill gets near the
identity and none gets Kubernetes API rights. The alert rules for CronJobs
(monitoring/kubernetes-alerts.yml) are checked and unit-tested with promtool, their max ages
against the schedules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.docker_tier import require_image
from support.stacks import make_repository, source_stack

from drtool import keys
from drtool.config import load_config
from drtool.drills.definition import parse_definition
from drtool.endpoints import PostgresEndpoint, S3Endpoint
from drtool.errors import ConfigError
from drtool.services.scheduling.jobs import DAYS, RETRYABLE, JobSpec, load_schedules

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "monitoring" / "kubernetes-alerts.yml"
# The Kubernetes version the manifests are written for (CronJob timeZone: 1.27; Job
# podFailurePolicy: 1.31) and the bundled schemas they are validated against.
K8S_VERSION = "1.32.0"
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
KUSTOMIZATIONS = sorted(
    str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")
)
UID = 10001  # the image's drtool user (Dockerfile)
WEEK_MIN = 7 * 24 * 60
Resource = dict[str, Any]


def need(binary: str | None, what: str) -> str:
    """The binary's path, or skip (fail when DRTOOL_REQUIRE_SERVERS=1, as in CI)."""
    if binary is None:
        if os.environ.get("DRTOOL_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{what} not installed (DRTOOL_REQUIRE_SERVERS=1)", pytrace=False)
        pytest.skip(f"{what} not installed")
    return binary


_rendered: dict[str, list[Resource]] = {}


def render(kustomization: str) -> list[Resource]:
    """``kubectl kustomize deploy/kubernetes/<kustomization>`` as a list of resources."""
    if kustomization not in _rendered:
        kubectl = need(KUBECTL, "kubectl (with kustomize)")
        done = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / kustomization)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"kubectl kustomize {kustomization}: {done.stderr}"
        _rendered[kustomization] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return _rendered[kustomization]


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def ns_name(r: Resource) -> tuple[str, str]:
    return (r["metadata"]["namespace"], r["metadata"]["name"])


def name_of(r: Resource) -> str:
    return f"{r['kind']}/{r['metadata'].get('namespace', '-')}/{r['metadata']['name']}"


def pod_specs(resources: list[Resource]) -> list[tuple[Resource, dict[str, Any]]]:
    """Each workload with its pod spec (CronJob, Job, Deployment, StatefulSet, DaemonSet, Pod)."""
    found = []
    for r in resources:
        spec = r.get("spec", {})
        if r["kind"] == "CronJob":
            found.append((r, spec["jobTemplate"]["spec"]["template"]["spec"]))
        elif r["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            found.append((r, spec["template"]["spec"]))
        elif r["kind"] == "Pod":
            found.append((r, spec))
    return found


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def configmap(resources: list[Resource], namespace: str, prefix: str) -> dict[str, str]:
    """The data of the one ConfigMap in ``namespace`` named ``prefix-<hash>``."""
    found = [
        r
        for r in of_kind(resources, "ConfigMap")
        if r["metadata"]["namespace"] == namespace
        and r["metadata"]["name"].rsplit("-", 1)[0] == prefix
    ]
    assert len(found) == 1, f"expected one ConfigMap {prefix} in {namespace}, got {len(found)}"
    return dict(found[0]["data"])


# -- cron: the schedule file's timing as the minutes of a week a CronJob fires at ------------


class NoCronEquivalent(Exception):
    """A schedule job whose timing no cron expression reproduces."""


def _cron_field(text: str, lo: int, hi: int) -> set[int]:
    """One cron field (``*``, ``N``, ``A-B``, any of them ``/STEP``, comma lists): its values."""
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            first, last = lo, hi
        elif "-" in span:
            first, last = (int(x) for x in span.split("-", 1))
        else:
            first = int(span)
            last = hi if step_text else first
        if not (lo <= first <= last <= hi) or step < 1:
            raise ValueError(f"cron field {text!r}: outside {lo}-{hi}")
        values.update(range(first, last + 1, step))
    return values


def cron_fires(expression: str) -> set[int]:
    """The minutes of the week (0: Sunday 00:00) at which ``expression`` fires.

    Only what drtool's schedules need: day of month and month must be ``*``.
    """
    fields = expression.split()
    if len(fields) != 5 or fields[2] != "*" or fields[3] != "*":
        raise ValueError(f"cron {expression!r}: expected 'M H * * DOW'")
    minutes = _cron_field(fields[0], 0, 59)
    hours = _cron_field(fields[1], 0, 23)
    days = {d % 7 for d in _cron_field(fields[4], 0, 7)}
    return {d * 1440 + h * 60 + m for d in days for h in hours for m in minutes}


def cron_of(spec: JobSpec) -> str:
    """The cron expression of a schedule job (interval jobs: at phase 0); or NoCronEquivalent."""
    if spec.at:
        hour, minute = (int(x) for x in spec.at.split(":"))
        dow = str(DAYS.index(spec.on) + 1 if spec.on != "sunday" else 0) if spec.on else "*"
        return f"{minute} {hour} * * {dow}"
    seconds = spec.every_s
    if seconds % 60 == 0 and 60 % (seconds // 60) == 0 and seconds < 3600:
        return f"*/{seconds // 60} * * * *"
    if seconds % 3600 == 0 and 24 % (seconds // 3600) == 0:
        return "0 * * * *" if seconds == 3600 else f"0 */{seconds // 3600} * * *"
    if seconds == 86400:
        return "0 0 * * *"
    if seconds == 7 * 86400:
        return "0 0 * * 0"
    raise NoCronEquivalent(
        f"job {spec.name}: every = {spec.describe()[6:]} has no cron equivalent (a cron "
        "interval must divide an hour, a day or be a day or a week); give the job an `at`"
    )


def same_timing(spec: JobSpec, expression: str) -> bool:
    """Does ``expression`` fire exactly when ``spec`` runs (an interval job at any phase)?"""
    want = cron_fires(cron_of(spec))
    got = cron_fires(expression)
    if spec.at:
        return got == want
    shift = min(got)
    return shift < spec.every_s // 60 and got == {(m + shift) % WEEK_MIN for m in want}


def test_cron_conversion_of_every_schedule_form_and_refusal_of_the_rest() -> None:
    """The three forms of schedules/default.toml map to cron; a form cron cannot express
    (every 7m, every 90m, every 5d) fails the check instead of passing unnoticed."""

    def job(**timing: Any) -> JobSpec:
        return JobSpec(name="x", kind="backup", **timing)

    assert cron_of(job(every_s=6 * 3600)) == "0 */6 * * *"
    assert cron_of(job(every_s=3600)) == "0 * * * *"
    assert cron_of(job(every_s=900)) == "*/15 * * * *"
    assert cron_of(job(at="03:00")) == "0 3 * * *"
    assert cron_of(job(at="04:00", on="sunday")) == "0 4 * * 0"
    assert cron_of(job(at="23:45", on="saturday")) == "45 23 * * 6"
    assert same_timing(job(every_s=6 * 3600), "15 */6 * * *")
    assert same_timing(job(every_s=6 * 3600), "15 3-23/6 * * *")
    assert not same_timing(job(every_s=6 * 3600), "15 */4 * * *")
    assert not same_timing(job(every_s=3600), "0 0-22 * * *")  # skips 23:00
    assert not same_timing(job(at="03:00"), "0 3 * * 1-5")
    assert same_timing(job(at="04:00", on="sunday"), "0 4 * * 7")
    for seconds in (7 * 60, 90 * 60, 5 * 86400):
        with pytest.raises(NoCronEquivalent):
            cron_of(job(every_s=seconds))


# -- rendering and schema validation ---------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_resource_validates_against_the_pinned_kubernetes_schemas(
    kustomization: str,
) -> None:
    """Strict validation: a typo'd or misplaced field, a wrong type or a missing required
    field fails, as the API server would refuse it; a kind without a bundled schema fails too."""
    resources = render(kustomization)
    assert resources, f"{kustomization} renders nothing"
    problems = []
    for r in resources:
        try:
            kubernetes_validate.validate(r, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{name_of(r)}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name_of(r)}: no schema ({exc.message})")
    assert not problems, "\n".join(problems)


def test_the_schema_check_refuses_what_the_api_server_would() -> None:
    """The pinned strict schemas catch a misspelt field, a wrong type and a missing required
    field (the last one was a real slip in these manifests: a podFailurePolicy condition
    pattern without its status)."""
    [wal] = of_kind(render("base"), "Deployment")
    [cron] = [
        c for c in of_kind(render("base"), "CronJob") if c["metadata"]["name"] == "drtool-full"
    ]
    kubernetes_validate.validate(wal, K8S_VERSION, strict=True)
    typo = json.loads(json.dumps(wal))
    typo["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    wrong_type = json.loads(json.dumps(wal))
    wrong_type["spec"]["replicas"] = "1"
    no_status = json.loads(json.dumps(cron))
    del no_status["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"][
        0
    ]["status"]
    for bad in (typo, wrong_type, no_status):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_every_kustomization_is_checked() -> None:
    assert {"base", "base/backup", "base/drill", "overlays/example"} <= set(KUSTOMIZATIONS)


# -- the schedule ----------------------------------------------------------------------------


def schedule_of(
    resources: list[Resource], namespace: str, prefix: str, tmp_path: Path
) -> list[JobSpec]:
    """The jobs of a schedule ConfigMap, read by drtool's own loader.

    A drill job's definition path is a mount in the pod; it is checked on its own
    (``test_the_drill_definition_is_the_weekly_one_on_the_local_runtime``), so it is blanked
    here: the loader would look for it on this machine.
    """
    directory = tmp_path / f"{namespace}-{prefix}"
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in configmap(resources, namespace, prefix).items():
        (directory / name).write_text(without_definitions(text))
    return load_schedules(directory)


def without_definitions(schedule: str) -> str:
    """A schedule file's text with each drill job's ``definition`` path blanked."""
    for table in tomllib.loads(schedule).get("jobs", {}).values():
        if "definition" in table:
            schedule = schedule.replace(f'"{table["definition"]}"', '""')
    return schedule


SCHEDULES = {"drtool": "drtool-schedule", "drtool-drill": "drtool-drill-schedule"}


@pytest.mark.parametrize("kustomization", ["base", "overlays/example"])
def test_every_scheduled_job_has_exactly_one_cronjob_that_runs_it_on_its_schedule(
    kustomization: str, tmp_path: Path
) -> None:
    """Per namespace, the schedule ConfigMap's jobs and the CronJobs are one to one: each
    CronJob runs `drtool schedule run --once JOB --metrics-port 0` at the job's times in its
    time zone, never concurrently with itself, with the job's retries as backoffLimit and
    the retryable exit codes of drtool's scheduler as the only ones retried."""
    resources = render(kustomization)
    cronjobs = of_kind(resources, "CronJob")
    retryable = sorted({cls.exit_code for cls in RETRYABLE})
    problems = []
    seen: set[str] = set()
    for namespace, prefix in SCHEDULES.items():
        for spec in schedule_of(resources, namespace, prefix, tmp_path):
            runs = [
                c
                for c in cronjobs
                if c["metadata"]["namespace"] == namespace
                and containers(c["spec"]["jobTemplate"]["spec"]["template"]["spec"])[-1]["args"]
                == ["schedule", "run", "--once", spec.name, "--metrics-port", "0"]
            ]
            if len(runs) != 1:
                problems.append(f"job {spec.name}: {len(runs)} CronJobs run it in {namespace}")
                continue
            cron = runs[0]
            seen.add(name_of(cron))
            job = cron["spec"]["jobTemplate"]["spec"]
            if not same_timing(spec, cron["spec"]["schedule"]):
                problems.append(
                    f"job {spec.name} ({spec.describe()}): CronJob {cron['metadata']['name']} "
                    f"runs at {cron['spec']['schedule']!r}, expected like {cron_of(spec)!r}"
                )
            if cron["spec"].get("timeZone") != (spec.timezone or None):
                problems.append(f"job {spec.name}: timeZone {cron['spec'].get('timeZone')}")
            if cron["spec"].get("concurrencyPolicy") != "Forbid":
                problems.append(f"job {spec.name}: concurrencyPolicy is not Forbid")
            if not cron["spec"].get("startingDeadlineSeconds"):
                problems.append(f"job {spec.name}: no startingDeadlineSeconds")
            if not job.get("activeDeadlineSeconds"):
                problems.append(f"job {spec.name}: no activeDeadlineSeconds")
            if job.get("backoffLimit") != spec.retries:
                problems.append(f"job {spec.name}: backoffLimit {job.get('backoffLimit')}")
            rules = job.get("podFailurePolicy", {}).get("rules", [])
            fail_fast = [r["onExitCodes"] for r in rules if r["action"] == "FailJob"]
            if fail_fast != [{"containerName": "drtool", "operator": "NotIn", "values": retryable}]:
                problems.append(f"job {spec.name}: podFailurePolicy retries {fail_fast}")
    orphans = {name_of(c) for c in cronjobs} - seen
    assert not problems and not orphans, "\n".join([*problems, *(f"{o}: no job" for o in orphans)])


def test_the_base_schedules_are_the_repository_s(tmp_path: Path) -> None:
    """The backup CronJobs follow schedules/default.toml itself (kustomize cannot read it
    from outside deploy/, so the ConfigMap holds a copy that must not drift), and the drill
    CronJob the drill job of schedules/drill.toml (its definition path aside)."""
    resources = render("base")
    mounted = configmap(resources, "drtool", "drtool-schedule")
    assert mounted == {"default.toml": (ROOT / "schedules" / "default.toml").read_text()}, (
        "deploy/kubernetes/base/backup/files/default.toml differs from schedules/default.toml"
    )
    [drill] = schedule_of(resources, "drtool-drill", "drtool-drill-schedule", tmp_path)
    shipped_dir = tmp_path / "shipped"
    shipped_dir.mkdir()
    text = (ROOT / "schedules" / "drill.toml").read_text()
    (shipped_dir / "drill.toml").write_text(without_definitions(text))
    [shipped] = load_schedules(shipped_dir)
    assert replace(drill, source="", jitter_s=0) == replace(shipped, source="", jitter_s=0)


def test_the_drill_definition_is_the_weekly_one_on_the_local_runtime() -> None:
    """The drill pod runs restore_drills/weekly.toml's drill, with its servers in the pod
    (runtime = "local": no Docker engine, no API access) and its reports in the pod's volume."""
    resources = render("base")
    [text] = configmap(resources, "drtool-drill", "drtool-drill-definition").values()
    k8s = parse_definition(text, source="drtool-drill-definition")
    shipped = parse_definition((ROOT / "restore_drills" / "weekly.toml").read_text())
    assert k8s.runtime == "local"
    assert k8s.report.dir.startswith("/var/lib/drtool/")
    assert replace(k8s, runtime=shipped.runtime, report=shipped.report, docker=shipped.docker) == (
        shipped
    )
    [drill] = of_kind([r for r in resources if r["metadata"]["name"] == "drtool-drill"], "CronJob")
    mounts = containers(drill["spec"]["jobTemplate"]["spec"]["template"]["spec"])[-1]
    [schedule] = configmap(resources, "drtool-drill", "drtool-drill-schedule").values()
    definition = tomllib.loads(schedule)["jobs"]["drill"]["definition"]
    assert any(definition.startswith(m["mountPath"] + "/") for m in mounts["volumeMounts"]), (
        f"the drill's definition {definition} is not mounted"
    )


# -- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", ["base", "overlays/example"])
def test_each_pod_s_config_and_environment_load_with_drtool(
    kustomization: str, tmp_path: Path
) -> None:
    """drtool's loader accepts each mounted config with the pod's environment: every
    DRTOOL_* variable names a setting, every secret comes from a file (the loader refuses a
    secret written in the config), and no config holds a key."""
    resources = render(kustomization)
    for workload, pod in pod_specs(resources):
        namespace = workload["metadata"]["namespace"]
        container = pod["containers"][-1]
        env = {e["name"]: e["value"] for e in container["env"]}
        config_volume = next(m for m in container["volumeMounts"] if m["name"] == "config")
        volume = next(v for v in pod["volumes"] if v["name"] == "config")
        prefix = volume["configMap"]["name"].rsplit("-", 1)[0]
        text = configmap(resources, namespace, prefix)[config_volume["subPath"]]
        assert not keys.contains_identity(text) and "drtool-sign-1:" not in text
        config = tmp_path / f"{namespace}-{prefix}.toml"
        config.write_text(text)
        local_env = {}
        for name, value in env.items():
            if name.endswith("_FILE") and value.startswith("/run/secrets/"):
                secret = tmp_path / Path(value).name
                secret.write_text("not-a-real-secret")
                value = str(secret)
            local_env[name] = value
        local_env["DRTOOL_CONFIG"] = str(config)
        try:
            load_config(None, local_env)
        except ConfigError as exc:
            pytest.fail(f"{name_of(workload)}: {exc.message}")


# -- security --------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", ["base", "overlays/example"])
def test_every_container_is_confined_and_limited(kustomization: str) -> None:
    """Each container (init containers too): CPU and memory requests and limits, uid 10001
    and non-root, read-only root, no privilege escalation, every capability dropped; each
    pod: RuntimeDefault seccomp, its own ServiceAccount and no API token."""
    problems = []
    for workload, pod in pod_specs(render(kustomization)):
        where = name_of(workload)
        context = pod.get("securityContext", {})
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts an API token")
        if pod.get("serviceAccountName", "default") == "default":
            problems.append(f"{where}: runs as the default ServiceAccount")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{where}: shares a host namespace")
        for c in containers(pod):
            ctx = {**context, **c.get("securityContext", {})}
            what = f"{where} container {c['name']}"
            for kind in ("requests", "limits"):
                have = c.get("resources", {}).get(kind, {})
                if not {"cpu", "memory"} <= set(have):
                    problems.append(f"{what}: no cpu/memory {kind}")
            if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser") != UID:
                problems.append(f"{what}: not runAsNonRoot as uid {UID}")
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{what}: root filesystem is writable")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{what}: may escalate privileges")
            if c.get("securityContext", {}).get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{what}: capabilities not all dropped")
            if c.get("securityContext", {}).get("capabilities", {}).get("add"):
                problems.append(f"{what}: adds capabilities")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_secret_value_is_in_the_manifests(kustomization: str) -> None:
    """Secrets are referenced, never created here, and reach drtool as files only: no Secret
    resource, no secret in an env value or from secretKeyRef, Secret volumes 0400 or 0440."""
    resources = render(kustomization)
    problems = [f"{name_of(r)}: a Secret is rendered" for r in of_kind(resources, "Secret")]
    for workload, pod in pod_specs(resources):
        for c in containers(pod):
            for e in c.get("env", []):
                name = e["name"]
                if "valueFrom" in e:
                    problems.append(f"{name_of(workload)}: {name} from valueFrom")
                secretish = any(w in name for w in ("PASSWORD", "SECRET", "ACCESS_KEY", "TOKEN"))
                if secretish and not name.endswith("_FILE"):
                    problems.append(f"{name_of(workload)}: {name} holds a value")
            if c.get("envFrom"):
                problems.append(f"{name_of(workload)}: envFrom")
        for v in pod.get("volumes", []):
            mode = v.get("secret", {}).get("defaultMode")
            if "secret" in v and mode not in (0o400, 0o440):
                problems.append(f"{name_of(workload)}: Secret volume {v['name']} mode {mode}")
    for r in of_kind(resources, "ConfigMap"):
        for text in r.get("data", {}).values():
            if keys.contains_identity(text) or "drtool-sign-1:" in text:
                problems.append(f"{name_of(r)}: holds a key")
    assert not problems, "\n".join(problems)


def secret_names(pod: dict[str, Any]) -> set[str]:
    return {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}


def test_only_the_drill_namespace_gets_near_the_identity() -> None:
    """The identity Secret and DRTOOL_KEYS_IDENTITY_FILE exist in drtool-drill only; the
    backup side gets the signing key and the backup credentials, the drill neither."""
    resources = render("base")
    for workload, pod in pod_specs(resources):
        namespace = workload["metadata"]["namespace"]
        names = secret_names(pod)
        env = {e["name"] for c in containers(pod) for e in c.get("env", [])}
        if namespace == "drtool-drill":
            assert names == {"drtool-drill", "drtool-drill-identity"}, name_of(workload)
            assert "DRTOOL_KEYS_SIGNING_KEY_FILE" not in env
        else:
            assert namespace == "drtool", name_of(workload)
            assert not any("identity" in n for n in names), name_of(workload)
            assert "DRTOOL_KEYS_IDENTITY_FILE" not in env, name_of(workload)
            assert "drtool-signing-key" in names, name_of(workload)


def test_no_workload_gets_kubernetes_api_rights() -> None:
    """Nothing cluster-wide; no binding for the backup and WAL ServiceAccounts; whatever the
    drill is ever granted stays a Role in its own namespace without wildcards or writes to
    Secrets. Today it is granted nothing (its scratch stack is in its pod; ADR 0024)."""
    resources = render("base")
    kinds = {r["kind"] for r in resources}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, kinds
    for binding in of_kind(resources, "RoleBinding"):
        ns = binding["metadata"]["namespace"]
        for subject in binding.get("subjects", []):
            assert subject.get("name") not in ("drtool-backup", "drtool-wal"), name_of(binding)
            assert ns == "drtool-drill" and subject.get("namespace", ns) == ns, name_of(binding)
        assert binding["roleRef"]["kind"] == "Role", name_of(binding)
    for role in of_kind(resources, "Role"):
        assert role["metadata"]["namespace"] == "drtool-drill", name_of(role)
        for rule in role.get("rules", []):
            flat = [*rule.get("verbs", []), *rule.get("resources", []), *rule.get("apiGroups", [])]
            assert "*" not in flat, name_of(role)
            if "secrets" in rule.get("resources", []):
                assert set(rule["verbs"]) <= {"get"}, name_of(role)
    assert {ns_name(r) for r in of_kind(resources, "ServiceAccount")} == {
        ("drtool", "drtool-backup"),
        ("drtool", "drtool-wal"),
        ("drtool-drill", "drtool-drill"),
    }
    for r in of_kind(resources, "ServiceAccount"):
        assert r.get("automountServiceAccountToken") is False, name_of(r)


def test_the_wal_streamer_never_runs_twice() -> None:
    """One streamer per slot: replicas 1 and Recreate (a rolling update would start the new
    pod before the old one stops); its spool on its own volume; a liveness probe."""
    [wal] = of_kind(render("base"), "Deployment")
    spec = wal["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["wal", "stream"]
    assert "livenessProbe" in container
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "drtool-wal-spool"}]


def test_the_key_copy_gives_drtool_a_key_file_it_accepts(tmp_path: Path) -> None:
    """Kubernetes mounts a Secret file root's and, with fsGroup, readable by the group
    (0440), which drtool refuses for a key file. The init container's script, run here as
    rendered, copies it into a 0600-or-stricter file of the pod's user that drtool reads."""
    [wal] = of_kind(render("base"), "Deployment")
    [init] = wal["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["/bin/sh", "-c"]
    mounted = tmp_path / "in"
    copied = tmp_path / "out"
    mounted.mkdir()
    copied.mkdir()
    key = mounted / "drtool_signing_key"
    verify_key = keys.write_signing_key(key)
    key.chmod(0o440)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        keys.load_signing_key(key)
    env = {"PATH": os.environ["PATH"], "KEYS_IN": str(mounted), "KEYS_OUT": str(copied)}
    done = subprocess.run(
        ["/bin/sh", "-c", *init["args"]], env=env, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    copy = copied / "drtool_signing_key"
    assert copy.stat().st_mode & 0o077 == 0
    assert keys.verify_key_text(keys.load_signing_key(copy).public_key()) == verify_key


# -- monitoring ------------------------------------------------------------------------------


def recorded_max_ages() -> dict[tuple[str, str], tuple[str, int]]:
    """(namespace, cronjob) -> (kind, seconds) from the rules' recorded constants."""
    doc = yaml.safe_load(RULES.read_text())
    found = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("record") == "drtool:cronjob_max_age_seconds":
                labels = rule["labels"]
                seconds = int(rule["expr"].removeprefix("vector(").removesuffix(")"))
                found[(labels["namespace"], labels["cronjob"])] = (labels["kind"], seconds)
    return found


def test_the_alert_max_ages_are_the_schedule_s(tmp_path: Path) -> None:
    """Each CronJob's max age in the rules is its job's (max_age, by default twice its
    interval), for every job of the shipped schedules and no other."""
    resources = render("base")
    want = {}
    for namespace, prefix in SCHEDULES.items():
        for spec in schedule_of(resources, namespace, prefix, tmp_path):
            want[(namespace, f"drtool-{spec.name}")] = (spec.kind, spec.threshold_s)
    assert set(want) == {ns_name(c) for c in of_kind(resources, "CronJob")}
    assert recorded_max_ages() == want


def test_promtool_checks_the_kubernetes_rules() -> None:
    promtool = need(PROMTOOL, "promtool (Debian package prometheus)")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def ksm(name: str, labels: dict[str, str], value: float, steps: int) -> dict[str, str]:
    """A kube-state-metrics series held at ``value``."""
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{selector}}}", "values": f"{value!r}+0x{steps}"}


def job_series(
    labels: dict[str, str], start: float, failed: int, steps: int
) -> list[dict[str, str]]:
    """A Job's start time and Failed condition, as kube-state-metrics exports them."""
    return [
        ksm("kube_job_status_start_time", labels, start, steps),
        ksm("kube_job_failed", {**labels, "condition": "true"}, failed, steps),
    ]


def rendered_annotations(alert: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations with ``{{ $labels.x }}`` filled in from ``labels``."""
    doc = yaml.safe_load(RULES.read_text())
    [rule] = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    return {
        k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), v)
        for k, v in rule["annotations"].items()
    }


def expect(alert: str, severity: str, **labels: str) -> dict[str, Any]:
    return {
        "exp_labels": {**labels, "severity": severity},
        "exp_annotations": rendered_annotations(alert, labels),
    }


def test_the_kubernetes_alerts_with_promtool(tmp_path: Path) -> None:
    """promtool evaluates the rules on series in kube-state-metrics' shape at 50 h: the
    postgres CronJob last succeeded 14 h ago (max 12 h), the full one never did in 50 h (max
    48 h), verify last succeeded 49.5 h ago (max 48 h), redis and prune are fresh; the WAL
    streamer restarts every 10 minutes; redis's newest Job failed after its last
    success, prune's failed Job is older than its success; the newest drill Job failed; the
    WAL streamer has no available replica. The drill that last passed at 1 h is overdue at
    16 days, not at 15. Without kube-state-metrics, that is what fires."""
    promtool = need(PROMTOOL, "promtool (Debian package prometheus)")
    now = 50 * 3600
    steps = 50 * 6 + 6  # 10-minute steps to past `now`
    drtool = {"namespace": "drtool"}
    drill = {"namespace": "drtool-drill"}
    series = [
        *(
            ksm("kube_cronjob_created", {**drtool, "cronjob": f"drtool-{j}"}, 0, steps)
            for j in ("postgres", "redis", "full", "prune", "verify")
        ),
        ksm("kube_cronjob_created", {**drill, "cronjob": "drtool-drill"}, 0, steps),
        ksm("kube_cronjob_status_last_successful_time",
            {**drtool, "cronjob": "drtool-postgres"}, now - 14 * 3600, steps),
        ksm("kube_cronjob_status_last_successful_time",
            {**drtool, "cronjob": "drtool-redis"}, now - 1800, steps),
        ksm("kube_cronjob_status_last_successful_time",
            {**drtool, "cronjob": "drtool-prune"}, now - 3600, steps),
        ksm("kube_cronjob_status_last_successful_time",
            {**drtool, "cronjob": "drtool-verify"}, now - 49 * 3600 - 1800, steps),
        ksm("kube_cronjob_status_last_successful_time",
            {**drill, "cronjob": "drtool-drill"}, 3600, steps),
        # Jobs: redis failed after its last success, prune before its, the drill after its
        *job_series({**drtool, "job_name": "drtool-redis-29990000"}, now - 900, 1, steps),
        *job_series({**drtool, "job_name": "drtool-prune-29980000"}, now - 7200, 1, steps),
        *job_series({**drtool, "job_name": "drtool-verify-29990100"}, now - 3600, 0, steps),
        *job_series({**drill, "job_name": "drtool-drill-29990200"}, now - 3000, 1, steps),
        ksm("kube_deployment_status_replicas_available",
            {**drtool, "deployment": "drtool-wal"}, 0, steps),
        # the streamer restarts every 10 minutes
        {"series": 'kube_pod_container_status_restarts_total{container="drtool",'
                   'namespace="drtool",pod="drtool-wal-5d9f7c-abcde"}',
         "values": f"0+1x{steps}"},
    ]  # fmt: skip
    at = "50h"
    tests: list[dict[str, Any]] = [
        {"eval_time": at, "alertname": "DrtoolBackupOverdue", "exp_alerts": [
            expect("DrtoolBackupOverdue", "critical", **drtool, cronjob="drtool-postgres",
                   kind="backup"),
            expect("DrtoolBackupOverdue", "critical", **drtool, cronjob="drtool-full",
                   kind="backup"),
        ]},
        {"eval_time": at, "alertname": "DrtoolJobOverdue", "exp_alerts": [
            expect("DrtoolJobOverdue", "warning", **drtool, cronjob="drtool-verify",
                   kind="verify")]},
        {"eval_time": at, "alertname": "DrtoolDrillOverdue", "exp_alerts": []},
        {"eval_time": at, "alertname": "DrtoolJobFailed", "exp_alerts": [
            expect("DrtoolJobFailed", "warning", **drtool, cronjob="drtool-redis")]},
        {"eval_time": at, "alertname": "DrtoolDrillFailed", "exp_alerts": [
            expect("DrtoolDrillFailed", "critical", **drill, cronjob="drtool-drill")]},
        {"eval_time": at, "alertname": "DrtoolWalStreamerDown", "exp_alerts": [
            expect("DrtoolWalStreamerDown", "critical", **drtool, deployment="drtool-wal")]},
        {"eval_time": at, "alertname": "DrtoolWalStreamerRestarting", "exp_alerts": [
            expect("DrtoolWalStreamerRestarting", "warning", **drtool,
                   pod="drtool-wal-5d9f7c-abcde", container="drtool")]},
        {"eval_time": at, "alertname": "DrtoolCronJobsAbsent", "exp_alerts": []},
    ]  # fmt: skip
    # the drill's last success at 1 h: within its 15 days at 15 d, past them at 16 d
    drill_series = [
        ksm("kube_cronjob_created", {**drill, "cronjob": "drtool-drill"}, 0, 17 * 24),
        ksm("kube_cronjob_status_last_successful_time",
            {**drill, "cronjob": "drtool-drill"}, 3600, 17 * 24),
    ]  # fmt: skip
    drill_overdue: list[dict[str, Any]] = [
        {"eval_time": "15d", "alertname": "DrtoolDrillOverdue", "exp_alerts": []},
        {"eval_time": "16d", "alertname": "DrtoolDrillOverdue", "exp_alerts": [
            expect("DrtoolDrillOverdue", "critical", **drill, cronjob="drtool-drill",
                   kind="drill")]},
    ]  # fmt: skip
    absent: list[dict[str, Any]] = [
        {"eval_time": "1h", "alertname": "DrtoolCronJobsAbsent", "exp_alerts": [
            expect("DrtoolCronJobsAbsent", "critical", namespace="drtool")]},
        {"eval_time": "1h", "alertname": "DrtoolWalStreamerDown", "exp_alerts": [
            expect("DrtoolWalStreamerDown", "critical", namespace="drtool",
                   deployment="drtool-wal")]},
    ]  # fmt: skip
    rules = tmp_path / RULES.name
    shutil.copy(RULES, rules)
    doc = {
        "rule_files": [rules.name],
        "evaluation_interval": "1h",  # a `for` of 10-30 min passes in one step
        "tests": [
            {"interval": "10m", "input_series": series, "alert_rule_test": tests},
            {"interval": "1h", "input_series": drill_series, "alert_rule_test": drill_overdue},
            {
                "interval": "10m",
                "input_series": [ksm("up", {"job": "other"}, 1, 12)],
                "alert_rule_test": absent,
            },
        ],
    }
    (tmp_path / "tests.yml").write_text(json.dumps(doc, indent=1))  # JSON is YAML
    done = subprocess.run(
        [promtool, "test", "rules", "tests.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the image under a rendered pod's constraints (Docker tier) ------------------------------

DRTOOL_IMAGE = os.environ.get("DRTOOL_TEST_IMAGE", "drtool:ci")


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]]


@dataclass
class PodOnDocker:
    """A rendered pod's containers run by Docker in its stead (there is no kubelet here).

    Each pod volume is a host directory laid out as the kubelet would: a configMap's data as
    files (``configs`` replaces a ConfigMap's data by name prefix: the shipped configs name an
    off-site bucket); a secret's items as files of root, group the fsGroup, ``defaultMode``
    (content from ``secrets`` by volume and file name, else a placeholder); an emptyDir or PVC
    an empty directory the fsGroup may write (setgid). Each container runs with the pod's and
    its own security context, memory limit, mounts and environment, without a network.
    """

    docker_client: Any
    pod: dict[str, Any]
    dirs: dict[str, Path]
    extra_volumes: dict[str, dict[str, str]]

    @classmethod
    def lay_out(
        cls,
        docker_client: Any,
        resources: list[Resource],
        cronjob: str,
        base: Path,
        configs: dict[str, dict[str, str]],
        secrets: dict[str, dict[str, bytes]],
    ) -> PodOnDocker:
        [cron] = [c for c in of_kind(resources, "CronJob") if c["metadata"]["name"] == cronjob]
        namespace = cron["metadata"]["namespace"]
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        gid = pod["securityContext"]["fsGroup"]
        dirs = {}
        for volume in pod["volumes"]:
            path = base / volume["name"]
            path.mkdir(parents=True)
            if "configMap" in volume:
                prefix = volume["configMap"]["name"].rsplit("-", 1)[0]
                data = configs.get(prefix) or configmap(resources, namespace, prefix)
                for name, text in data.items():
                    (path / name).write_text(text)
                    (path / name).chmod(0o644)
            elif "secret" in volume:
                given = secrets.get(volume["name"], {})
                items = volume["secret"].get("items") or [{"path": n} for n in given]
                for item in items:
                    target = path / item["path"]
                    target.write_bytes(given.get(item["path"], b"placeholder"))
                    os.chown(target, 0, gid)
                    target.chmod(volume["secret"]["defaultMode"])
                path.chmod(0o755)
            else:
                os.chown(path, 0, gid)
                path.chmod(0o2770)
            dirs[volume["name"]] = path
        return cls(docker_client, pod, dirs, {})

    def run(self, container: dict[str, Any]) -> tuple[int, str]:
        """Run ``container`` to its end: its exit code and its output."""
        ctx = {**self.pod["securityContext"], **container["securityContext"]}
        assert ctx["readOnlyRootFilesystem"] and ctx["capabilities"]["drop"] == ["ALL"]
        assert ctx["allowPrivilegeEscalation"] is False
        volumes = dict(self.extra_volumes)
        for mount in container["volumeMounts"]:
            source = self.dirs[mount["name"]]
            if "subPath" in mount:
                source = source / mount["subPath"]
            mode = "ro" if mount.get("readOnly") else "rw"
            volumes[str(source)] = {"bind": mount["mountPath"], "mode": mode}
        argv = container.get("command", []) + container.get("args", [])
        entrypoint = argv[0] if "command" in container else None
        command = argv[1:] if "command" in container else argv
        box = self.docker_client.containers.run(
            DRTOOL_IMAGE,
            command=command,
            entrypoint=entrypoint,
            user=f"{ctx['runAsUser']}:{ctx['runAsGroup']}",
            group_add=[str(ctx["fsGroup"])],
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=_quantity_bytes(container["resources"]["limits"]["memory"]),
            environment={e["name"]: e["value"] for e in container.get("env", [])},
            volumes=volumes,
            network_mode="none",
            labels={"drtool.test": "kubernetes"},
            detach=True,
        )
        try:
            code = int(box.wait(timeout=900)["StatusCode"])
            return code, box.logs().decode(errors="replace")
        finally:
            box.remove(force=True, v=True)  # and the image's VOLUME, which a pod has not

    def run_pod(self) -> tuple[int, str]:
        """The init containers (each must succeed), then the one container."""
        for init in self.pod.get("initContainers", []):
            code, logs = self.run(init)
            assert code == 0, logs
        [container] = self.pod["containers"]
        return self.run(container)


@pytest.mark.docker
def test_the_prune_cronjob_pod_runs_in_the_drtool_image_as_rendered(
    docker_client: Any, tmp_path: Path
) -> None:
    """The drtool image run with the rendered drtool-prune pod's own constraints: its init
    container's script, then its container's args (`schedule run --once prune`), as uid 10001
    with the fsGroup, a read-only root, every capability dropped, no privilege escalation,
    its memory limit, its volumes at their mount paths and its environment; the shipped
    schedule, and a config for a file:// repository in the state volume. The key is copied,
    the job reads the copy (the mounted group-readable original would stop it with exit 2),
    succeeds, and its state lands in the state volume."""
    require_image(docker_client, DRTOOL_IMAGE)
    signing = tmp_path / "signing_key"
    verify_key = keys.write_signing_key(signing)
    recipient = keys.write_identity(tmp_path / "identity", passphrase=None)
    # no verify_key in the pod's config: drtool then trusts its own signing key's, so the job
    # reads the init container's copy of the key (a group-readable one would stop it, exit 2)
    pod_config = (
        f'[repository]\nurl = "file:///var/lib/drtool/repo"\n[keys]\nrecipients = ["{recipient}"]\n'
    )
    pod = PodOnDocker.lay_out(
        docker_client,
        render("base"),
        "drtool-prune",
        tmp_path / "pod",
        {"drtool-config": {"drtool.toml": pod_config}},
        {"keys-in": {"drtool_signing_key": signing.read_bytes()}},
    )
    state = pod.dirs["state"]
    # the repository, created from this host, then the pod user's as on the PVC
    host_config = tmp_path / "host.toml"
    host_config.write_text(
        f'[repository]\nurl = "file://{state}/repo"\n[keys]\nrecipients = ["{recipient}"]\n'
        f'verify_key = "{verify_key}"\nsigning_key_file = "{signing}"\n'
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "drtool"), "--config", str(host_config),
         "--home", str(tmp_path / "home"), "init"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    subprocess.run(["chown", "-R", "10001:10001", str(state / "repo")], check=True)
    code, logs = pod.run_pod()
    copy = pod.dirs["keys"] / "drtool_signing_key"
    assert (copy.stat().st_uid, copy.stat().st_mode & 0o777) == (UID, 0o600)
    assert code == 0, logs
    assert "job prune: kept 0, forgot 0 snapshots" in logs
    job_state = json.loads((state / "state" / "schedule" / "prune.json").read_text())
    assert job_state["exit_code"] == 0 and job_state["last_success"]


@pytest.mark.docker
def test_the_drill_cronjob_pod_restores_a_real_snapshot_in_its_own_pod(
    docker_client: Any, tmp_path: Path, pg_server: PostgresEndpoint, s3_server: S3Endpoint
) -> None:
    """The rendered drtool-drill pod, run by Docker in the test image (which, unlike the
    production image, carries a PostgreSQL server of this machine's major and redis-server:
    drill-image/Dockerfile's point): as uid 10001 with a read-only root, no capability and no
    network, it copies the identity, runs `schedule run --once drill` with the rendered
    schedule and weekly definition (runtime = "local"), restores the nightly-style snapshot
    of a seeded stack into servers inside its own container and passes. The repository
    (off-site S3 in the cluster) is a file:// directory mounted in."""
    require_image(docker_client, DRTOOL_IMAGE)
    with source_stack(tmp_path / "source", pg_server, s3_server) as source:
        repo = make_repository(tmp_path / "repo", source)
        snapshot = repo.backup()
    repository = tmp_path / "repo" / "repository"
    subprocess.run(["chown", "-R", "10001:10001", str(repository)], check=True)
    pod = PodOnDocker.lay_out(
        docker_client,
        render("base"),
        "drtool-drill",
        tmp_path / "pod",
        {
            "drtool-drill-config": {
                "drtool.toml": f'[repository]\nurl = "file:///repo"\n'
                f'[keys]\nverify_key = "{repo.verify_key}"\n'
            }
        },
        {"keys-in": {"drtool_identity": repo.identity.read_bytes()}},
    )
    pod.extra_volumes[str(repository)] = {"bind": "/repo", "mode": "rw"}
    code, logs = pod.run_pod()
    assert code == 0, logs[-4000:]
    assert "job drill: drill passed" in logs
    reports = list((pod.dirs["scratch"] / "reports").glob("*"))
    assert reports, "no drill report in the pod's scratch volume"
    assert snapshot in "".join(p.read_text() for p in reports if p.is_file())
