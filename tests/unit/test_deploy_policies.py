"""Deployment files: the IAM policy grants exactly the AWS calls the cloud daemon's code makes,
the ECS task definition and the Dockerfile hold together.

The IAM actions are derived from the code itself: every ``cloud_daemon/*.py`` is parsed (ast) for
calls whose method name is an operation of the Kinesis, IoT or DynamoDB botocore service models
(``client.get_records(...)``), operation names handed to a dispatcher as strings
(``getattr(client, "put_item")``, ``self._call("CreateThing", ...)``), and
``get_paginator("...")`` / ``get_waiter("...")``. A new
call without its permission, or a permission no code uses any more, fails the test.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import botocore
import botocore.session
import pytest
from botocore.validate import ParamValidator

from cloud_daemon.config import ENV_PREFIX as CLOUD_ENV_PREFIX
from cloud_daemon.config import CloudConfig, StoreKind, load_cloud_config
from sandbox.airvantage import ApplicationModel
from shared import messages
from shared.config import env_names

ROOT = Path(__file__).resolve().parents[2]
CLOUD = ROOT / "cloud_daemon"
IAM_POLICY = ROOT / "deploy" / "iam" / "cloud-daemon-policy.json"
TASK_DEFINITION = ROOT / "deploy" / "ecs" / "task-definition.json"
DOCKERFILE = ROOT / "deploy" / "ecs" / "Dockerfile"

SERVICES = ("kinesis", "iot", "dynamodb")
# Which receiver names point at which client, for the few operation names two services share.
RECEIVER_HINTS = {"kinesis": "kinesis", "iot": "iot", "dynamo": "dynamodb", "ddb": "dynamodb"}
# Helpers an operator runs once with administrator credentials (docs/operations.md, "AWS"),
# never the running daemon: their calls (CreateTable, DescribeTable) stay out of its role.
SETUP_ONLY = {"create_lease_table": "leases.py", "create_ledger_table": "ledger.py"}
# AWS offers no resource type for these, so they can only be granted on "*".
UNSCOPED_ACTIONS = {"iot:CreateCertificateFromCsr", "iot:DescribeEndpoint", "iot:ListCertificates"}
# Statements whose actions must be exactly what one module calls on that resource.
STATEMENT_MODULES = {"LeaseTable": "leases.py", "IssuanceLedger": "ledger.py"}
PLACEHOLDERS = ("REGION", "ACCOUNT_ID")


# --- deriving the actions from the code --------------------------------------------------------


@cache
def operations() -> Mapping[str, tuple[tuple[str, str], ...]]:
    """snake_case method name -> ((service, OperationName), ...) over the three services."""
    session = botocore.session.Session()
    table: dict[str, list[tuple[str, str]]] = {}
    for service in SERVICES:
        for name in session.get_service_model(service).operation_names:
            table.setdefault(botocore.xform_name(name), []).append((service, name))
    return {key: tuple(value) for key, value in table.items()}


@cache
def pascal_operations() -> Mapping[str, tuple[tuple[str, str], ...]]:
    """OperationName (``GetRecords``) -> ((service, OperationName), ...)."""
    table: dict[str, list[tuple[str, str]]] = {}
    for candidates in operations().values():
        for service, name in candidates:
            table.setdefault(name, []).append((service, name))
    return {key: tuple(value) for key, value in table.items()}


@cache
def waiter_operations() -> Mapping[str, tuple[tuple[str, str], ...]]:
    """waiter name (``table_exists``) -> ((service, OperationName), ...)."""
    session = botocore.session.Session()
    table: dict[str, list[tuple[str, str]]] = {}
    for service in SERVICES:
        try:
            model = session.get_waiter_model(service)
        except botocore.exceptions.UnknownServiceError:  # a service without waiters
            continue
        for name in model.waiter_names:
            table.setdefault(botocore.xform_name(name), []).append(
                (service, model.get_waiter(name).operation)
            )
    return {key: tuple(value) for key, value in table.items()}


@dataclass(frozen=True, slots=True)
class Call:
    module: str
    line: int
    function: str | None  # the innermost enclosing function
    action: str  # kinesis:GetRecords


def _service_for(
    candidates: tuple[tuple[str, str], ...], receiver: str, where: str
) -> tuple[str, str]:
    if len(candidates) == 1:
        return candidates[0]
    hinted = [
        c
        for c in candidates
        if any(hint in receiver.lower() and c[0] == svc for hint, svc in RECEIVER_HINTS.items())
    ]
    if len(hinted) != 1:
        services = sorted(svc for svc, _ in candidates)
        raise AssertionError(
            f"{where}: {candidates[0][1]} exists in {services}; name the client variable after "
            f"its service ({', '.join(RECEIVER_HINTS)}) so the policy test can tell which"
        )
    return hinted[0]


class _CallFinder(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module = module
        self.functions: list[str] = []
        self.calls: list[Call] = []

    def _record(
        self, node: ast.AST, candidates: tuple[tuple[str, str], ...], receiver: str
    ) -> None:
        where = f"{self.module}:{getattr(node, 'lineno', 0)}"
        service, operation = _service_for(candidates, receiver, where)
        self.calls.append(
            Call(
                module=self.module,
                line=getattr(node, "lineno", 0),
                function=self.functions[-1] if self.functions else None,
                action=f"{service}:{operation}",
            )
        )

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = _visit_function  # noqa: N815 - ast.NodeVisitor's naming
    visit_AsyncFunctionDef = _visit_function  # noqa: N815 - ast.NodeVisitor's naming

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        receiver = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        literal_args = [
            a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
        ]
        if isinstance(func, ast.Attribute) and func.attr in ("get_paginator", "get_waiter"):
            table = operations() if func.attr == "get_paginator" else waiter_operations()
            for name in literal_args[:1]:
                if name in table:
                    self._record(node, table[name], receiver)
        else:
            # A method named like an operation, on anything but the object itself.
            if (
                isinstance(func, ast.Attribute)
                and func.attr in operations()
                and receiver not in ("self", "cls")
            ):
                self._record(node, operations()[func.attr], receiver)
            # An operation name handed to a dispatcher, as the method's name or the API's:
            # getattr(client, "put_item"), self._call("CreateThing", ...).
            for name in literal_args:
                for table in (operations(), pascal_operations()):
                    if name in table:
                        self._record(node, table[name], receiver)
        self.generic_visit(node)


def find_calls(source: str, module: str) -> list[Call]:
    finder = _CallFinder(module)
    finder.visit(ast.parse(source))
    return finder.calls


def _cloud_modules() -> Iterator[Path]:
    return iter(sorted(CLOUD.glob("*.py")))


def runtime_calls() -> list[Call]:
    """Every AWS call in the cloud daemon's code, setup-only helpers left out."""
    calls = []
    for path in _cloud_modules():
        for call in find_calls(path.read_text(encoding="utf-8"), path.name):
            if SETUP_ONLY.get(call.function or "") == call.module:
                continue
            calls.append(call)
    return calls


# --- reading the policy ------------------------------------------------------------------------


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def load_policy(path: Path = IAM_POLICY) -> dict[str, Any]:
    policy: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return policy


def granted(statements: Iterable[Mapping[str, Any]]) -> set[str]:
    return {action for s in statements for action in _as_list(s["Action"])}


def _report(actions: Iterable[str], calls: list[Call]) -> str:
    lines = []
    for action in sorted(actions):
        where = [f"{c.module}:{c.line}" for c in calls if c.action == action]
        lines.append(f"  {action}" + (f" ({', '.join(where)})" if where else ""))
    return "\n".join(lines)


# --- the IAM policy ----------------------------------------------------------------------------


def test_policy_grants_exactly_what_the_code_calls() -> None:
    calls = runtime_calls()
    needed = {c.action for c in calls}
    allowed = granted(load_policy()["Statement"])
    missing, unused = needed - allowed, allowed - needed
    assert not missing, f"the code calls, the policy lacks:\n{_report(missing, calls)}"
    assert not unused, f"the policy grants, no code calls:\n{_report(unused, calls)}"
    # The consumer exists, so this can never pass vacuously.
    assert {"kinesis:GetRecords", "kinesis:GetShardIterator"} <= needed


def test_policy_shape() -> None:
    policy = load_policy()
    assert policy["Version"] == "2012-10-17"
    sids = [s["Sid"] for s in policy["Statement"]]
    assert len(sids) == len(set(sids)), "statement ids are unique"
    for statement in policy["Statement"]:
        assert set(statement) == {"Sid", "Effect", "Action", "Resource"}, statement["Sid"]
        assert statement["Effect"] == "Allow"
        for action in _as_list(statement["Action"]):
            assert re.fullmatch(r"(kinesis|iot|dynamodb):[A-Z][A-Za-z0-9]+", action), action


def test_resources_are_scoped() -> None:
    arn = {
        "kinesis": r"arn:aws:kinesis:REGION:ACCOUNT_ID:stream/[A-Za-z0-9_.-]+",
        "dynamodb": r"arn:aws:dynamodb:REGION:ACCOUNT_ID:table/[A-Za-z0-9_.-]+",
        "iot": r"arn:aws:iot:REGION:ACCOUNT_ID:(thing|cert|policy)/[A-Za-z0-9_.*-]+",
    }
    for statement in load_policy()["Statement"]:
        actions = _as_list(statement["Action"])
        resources = _as_list(statement["Resource"])
        services = {a.split(":")[0] for a in actions}
        assert len(services) == 1, f"{statement['Sid']}: one service per statement"
        (service,) = services
        if "*" in resources:
            assert resources == ["*"]
            assert set(actions) <= UNSCOPED_ACTIONS, f"{statement['Sid']}: only these on '*'"
            continue
        for resource in resources:
            assert re.fullmatch(arn[service], resource), resource
        assert not set(actions) & UNSCOPED_ACTIONS


def test_table_statements_match_their_modules() -> None:
    statements = {s["Sid"]: s for s in load_policy()["Statement"]}
    calls = runtime_calls()
    for sid, module in STATEMENT_MODULES.items():
        expected = {c.action for c in calls if c.module == module}
        assert set(_as_list(statements[sid]["Action"])) == expected, sid


# The one switch under which the running daemon may call a setup helper (the sandbox, a first
# run with administrator credentials); the shipped task definition leaves it off.
SETUP_SWITCH = "create_tables"


def _unguarded_uses(source: str, function: str) -> list[int]:
    """Lines using ``function`` outside an ``if`` whose test names :data:`SETUP_SWITCH`."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
        if name != function or not isinstance(node, ast.Name | ast.Attribute):
            continue
        ancestor: ast.AST | None = node
        while ancestor is not None:
            if isinstance(ancestor, ast.If) and SETUP_SWITCH in ast.unparse(ancestor.test):
                break
            ancestor = parents.get(ancestor)
        else:
            lines.append(node.lineno)
    return lines


def test_setup_helpers_exist_and_stay_out_of_the_running_daemon() -> None:
    for function, module in SETUP_ONLY.items():
        tree = ast.parse((CLOUD / module).read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)}
        assert function in defined, f"{module} no longer defines {function}: update SETUP_ONLY"
        for path in _cloud_modules():
            if path.name in (module, "__main__.py"):
                continue
            lines = _unguarded_uses(path.read_text(encoding="utf-8"), function)
            assert not lines, (
                f"{path.name}:{lines} uses {function} outside `if ...{SETUP_SWITCH}`: "
                "the running daemon would need CreateTable"
            )


def test_the_setup_guard_is_recognised() -> None:
    source = textwrap.dedent(
        """
        from cloud_daemon.leases import create_lease_table
        async def start(store, client):
            if store.create_tables:
                await create_lease_table(client, "t")
            await create_lease_table(client, "u")
        """
    )
    assert _unguarded_uses(source, "create_lease_table") == [6]


_SAMPLE = """
async def consume(self):
    await self._kinesis.get_records(ShardIterator=it)
    await self.list_shards()            # our own method, not a client call
    paginator = client.get_paginator("list_things")
async def store(self):
    await getattr(self._client, "put_item")(TableName=t)
    await self._conditional("update_item", Item={})
    await self._call("CreateThing", thingName="t")
async def create_lease_table(client, name):
    await client.create_table(TableName=name)
    await client.get_waiter("table_exists").wait(TableName=name)
def tag(iot_client, ddb):
    iot_client.tag_resource(resourceArn="a", tags=[])
    ddb.tag_resource(ResourceArn="a", Tags=[])
"""


def test_the_scanner_finds_every_kind_of_call() -> None:
    calls = find_calls(_SAMPLE, "leases.py")
    assert [(c.action, c.function) for c in calls] == [
        ("kinesis:GetRecords", "consume"),
        ("iot:ListThings", "consume"),
        ("dynamodb:PutItem", "store"),
        ("dynamodb:UpdateItem", "store"),
        ("iot:CreateThing", "store"),
        ("dynamodb:CreateTable", "create_lease_table"),
        ("dynamodb:DescribeTable", "create_lease_table"),
        ("iot:TagResource", "tag"),
        ("dynamodb:TagResource", "tag"),
    ]


def test_the_scanner_refuses_an_ambiguous_receiver() -> None:
    with pytest.raises(AssertionError, match="name the client variable"):
        find_calls("client.tag_resource(ResourceArn='a')", "x.py")


# --- the ECS task definition -------------------------------------------------------------------


@pytest.fixture(scope="module")
def container() -> dict[str, Any]:
    task = json.loads(TASK_DEFINITION.read_text(encoding="utf-8"))
    assert task["requiresCompatibilities"] == ["FARGATE"]
    assert task["networkMode"] == "awsvpc"
    assert task["taskRoleArn"].endswith(":role/ztp-cloud-task")
    (definition,) = task["containerDefinitions"]
    result: dict[str, Any] = definition
    return result


def test_task_definition_is_what_register_task_definition_accepts() -> None:
    # botocore's own model of the ECS API: a misspelt key or a wrong type is reported here,
    # not by `aws ecs register-task-definition` on deployment day.
    model = botocore.session.Session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    task = json.loads(TASK_DEFINITION.read_text(encoding="utf-8"))
    report = ParamValidator().validate(task, shape)
    assert not report.has_errors(), report.generate_report()


def test_task_stops_gracefully_and_logs(container: dict[str, Any]) -> None:
    # The daemon checkpoints and releases its leases on SIGTERM; Fargate allows up to 120 s.
    assert 30 <= container["stopTimeout"] <= 120
    assert container["essential"] is True
    logs = container["logConfiguration"]
    assert logs["logDriver"] == "awslogs"
    assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(logs["options"])


def test_task_configuration_and_secrets(container: dict[str, Any]) -> None:
    environment = {e["name"]: e["value"] for e in container["environment"]}
    secrets = {s["name"]: s["valueFrom"] for s in container["secrets"]}
    names = list(environment) + list(secrets)
    assert all(name.startswith("ZTP_CLOUD_") for name in names), names
    assert len(names) == len(set(names))
    secretish = re.compile(r"SECRET|PASSWORD|TOKEN|PRIVATE_KEY")
    assert not [n for n in environment if secretish.search(n)], "secrets come from Secrets Manager"
    assert "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET" in secrets
    for value_from in secrets.values():
        assert value_from.startswith("arn:aws:secretsmanager:REGION:ACCOUNT_ID:secret:")


def _task_environment(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment as the daemon would see it, secrets given dummy values."""
    env = {e["name"]: e["value"] for e in container["environment"]}
    env.update({s["name"]: "secret-from-secrets-manager" for s in container["secrets"]})
    return env


def test_task_environment_is_a_valid_cloud_configuration(container: dict[str, Any]) -> None:
    env = _task_environment(container)
    known = env_names(CloudConfig, env_prefix=CLOUD_ENV_PREFIX)
    assert not set(env) - set(known), "names no configuration key reads"
    config = load_cloud_config(None, env)
    assert config.store.kind is StoreKind.DYNAMODB, "several tasks share leases and ledger"
    assert config.store.create_tables is False, "the task role has no CreateTable"
    # The names the daemon will use are the resources the IAM policy grants.
    resources = {r for s in load_policy()["Statement"] for r in _as_list(s["Resource"])}
    expected = {
        f"arn:aws:kinesis:REGION:ACCOUNT_ID:stream/{config.kinesis.stream}",
        f"arn:aws:dynamodb:REGION:ACCOUNT_ID:table/{config.store.lease_table}",
        f"arn:aws:dynamodb:REGION:ACCOUNT_ID:table/{config.store.ledger_table}",
        f"arn:aws:iot:REGION:ACCOUNT_ID:policy/{config.iot.policy_name}",
    }
    assert expected <= resources
    command = " ".join(container["healthCheck"]["command"])
    assert f"127.0.0.1:{config.http.port}/healthz" in command
    assert config.http.host in ("0.0.0.0", "127.0.0.1")  # noqa: S104 - reachable by the probe
    # Writable despite the read-only root: the store path is the task's volume.
    (mount,) = container["mountPoints"]
    assert mount["containerPath"] == str(config.store.path)
    assert mount["readOnly"] is False
    assert json.loads(dockerfile_instructions()["VOLUME"][-1]) == [str(config.store.path)]
    assert config.shutdown_timeout < container["stopTimeout"], "drained before ECS kills it"


def test_task_health_check_and_user_match_the_image(container: dict[str, Any]) -> None:
    instructions = dockerfile_instructions()
    command = container["healthCheck"]["command"]
    assert command[0] == "CMD"
    docker_health = instructions["HEALTHCHECK"][-1]
    assert json.loads(docker_health[docker_health.index("CMD") + 3 :].strip()) == command[1:]
    found = re.search(r"127\.0\.0\.1:(\d+)/healthz", " ".join(command))
    assert found is not None
    port = int(found.group(1))
    assert [p["containerPort"] for p in container["portMappings"]] == [port]
    assert instructions["EXPOSE"] == [str(port)]
    assert container["user"] == instructions["USER"][-1]
    assert container["readonlyRootFilesystem"] is True


# --- the Dockerfile ----------------------------------------------------------------------------


def _logical_lines(text: str) -> Iterator[str]:
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        yield current + line
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"


def dockerfile_instructions(*, stage: int = -1) -> dict[str, list[str]]:
    """Instruction -> arguments, for one build stage (the final one by default)."""
    stages: list[dict[str, list[str]]] = []
    for line in _logical_lines(DOCKERFILE.read_text(encoding="utf-8")):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append({})
        if stages:
            stages[-1].setdefault(keyword, []).append(rest.strip())
    return stages[stage]


def test_dockerfile_base_user_signal_entry() -> None:
    final = dockerfile_instructions()
    build = dockerfile_instructions(stage=0)
    arg_defaults = dict(
        a.split("=", 1) for a in _first_stage_args() if "=" in a
    )  # ARG before the first FROM
    for stage in (build, final):
        image = stage["FROM"][0].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image), image
    user = final["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert final["STOPSIGNAL"] == ["SIGTERM"]
    entry = json.loads(final["ENTRYPOINT"][-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert Path(entry[0]).name == "ztp-cloud"
    assert scripts["ztp-cloud"].startswith("cloud_daemon.")


def _first_stage_args() -> list[str]:
    args = []
    for line in _logical_lines(DOCKERFILE.read_text(encoding="utf-8")):
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            break
        if keyword.upper() == "ARG":
            args.append(rest.strip())
    return args


def test_dockerfile_health_check_needs_no_curl() -> None:
    health = dockerfile_instructions()["HEALTHCHECK"][-1]
    assert "/healthz" in health
    assert "urllib.request" in health
    instructions = " ".join(_logical_lines(DOCKERFILE.read_text(encoding="utf-8")))
    assert "curl" not in instructions
    assert "wget" not in instructions


def test_dockerfile_installs_the_project_from_files_that_exist() -> None:
    build = dockerfile_instructions(stage=0)
    assert any("pip install ." in run for run in build["RUN"])
    for copy in build["COPY"]:
        *sources, _destination = shlex.split(copy)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {Path(s).name for c in build["COPY"] for s in shlex.split(c)[:-1]}
    # The console script's package and what it imports from the repository.
    assert {"pyproject.toml", "shared", "cloud_daemon"} <= copied
    # Files the build backend reads besides the packages (setuptools fails without them).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    referenced = [project["readme"]] if isinstance(project.get("readme"), str) else []
    referenced += project.get("license-files", [])
    assert set(referenced) <= copied


# --- the device's IoT policy template ----------------------------------------------------------

IOT_TEMPLATE = ROOT / "cloud_daemon" / "policy" / "iot-policy.json"
THING = "${iot:Connection.Thing.ThingName}"
# AWS IoT refuses a policy document longer than this (whitespace not counted).
IOT_POLICY_MAX_CHARS = 2048
# What an aiomqtt client call needs from the policy.
MQTT_ACTIONS = {
    "publish": {"iot:Publish"},
    "subscribe": {"iot:Subscribe", "iot:Receive"},
}


def test_iot_policy_template_scopes_every_grant_to_its_own_thing() -> None:
    policy = json.loads(IOT_TEMPLATE.read_text(encoding="utf-8"))
    assert policy["Version"] == "2012-10-17"
    assert len(json.dumps(policy, separators=(",", ":"))) <= IOT_POLICY_MAX_CHARS
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement
        assert "NotResource" not in statement
        for action in _as_list(statement["Action"]):
            assert re.fullmatch(r"iot:[A-Z][A-Za-z]+", action), f"{action}: no wildcard action"
        for resource in _as_list(statement["Resource"]):
            assert THING in resource, f"{resource}: not scoped to the connecting thing"
    connects = [s for s in policy["Statement"] if "iot:Connect" in _as_list(s["Action"])]
    assert connects, "a device must be allowed to connect"
    for statement in connects:
        # Only as its own thing, and only with a certificate attached to that thing.
        assert all(r.endswith(f":client/{THING}") for r in _as_list(statement["Resource"]))
        attached = statement["Condition"]["Bool"]["iot:Connection.Thing.IsAttached"]
        assert attached == "true"


def test_iot_policy_template_allows_what_the_publisher_does() -> None:
    tree = ast.parse((ROOT / "ztp_daemon" / "publisher.py").read_text(encoding="utf-8"))
    needed = {"iot:Connect"}
    for node in ast.walk(tree):
        # A client method called, or bound to a local name on the hot path and called later.
        if isinstance(node, ast.Attribute):
            needed |= MQTT_ACTIONS.get(node.attr, set())
    assert "iot:Publish" in needed, "the publisher's publish call was not found"
    policy = json.loads(IOT_TEMPLATE.read_text(encoding="utf-8"))
    assert needed <= granted(policy["Statement"])


# --- the AirVantage application model in docs/airvantage-model.md ------------------------------


def test_documented_application_model_declares_what_the_daemons_exchange(tmp_path: Path) -> None:
    # The doc's generator writes the .app AirVantage needs; run it and read the XML it makes.
    text = (ROOT / "docs" / "airvantage-model.md").read_text(encoding="utf-8")
    generator = text.split("python3 - <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", generator], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "ztp-app.zip") as package:
        # Our own generator's output, not untrusted input.
        root = ElementTree.fromstring(package.read("ztp.app"))  # noqa: S314
    (asset,) = root.iter("asset")
    declared = {f"{asset.get('id')}.{v.get('path')}" for v in asset.iter("variable")}
    assert declared == {messages.REQUEST_PATH, messages.STATUS_PATH}
    commands = {f"{asset.get('id')}.{c.get('path')}": c for c in asset.iter("command")}
    assert set(commands) == {messages.DELIVER_COMMAND, messages.RENEW_COMMAND}
    assert list(commands[messages.RENEW_COMMAND].iter("parameter")) == []
    command = commands[messages.DELIVER_COMMAND]
    parameters = [p.get("id") for p in command.iter("parameter")]
    expected = [f"f{i:02d}" for i in range(1, messages.MAX_DELIVERY_FRAGMENTS + 1)]
    assert parameters == expected
    assert all(p.get("type") == "string" for p in command.iter("parameter"))


def test_operations_guide_lists_the_policy_as_it_is() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for statement in load_policy()["Statement"]:
        row = re.search(rf"^\| `{statement['Sid']}` \| ([^|]+) \|", guide, re.MULTILINE)
        assert row is not None, f"docs/operations.md has no row for {statement['Sid']}"
        listed = {name.strip(" `").split(":")[-1] for name in row.group(1).split(",")}
        actions = {a.split(":")[1] for a in _as_list(statement["Action"])}
        assert listed == actions, statement["Sid"]


def _runtime_distributions() -> set[str]:
    """The project's runtime dependencies and everything they require, transitively."""
    pending = [
        re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]
        for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    seen: set[str] = set()
    while pending:
        name = pending.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        pending += [
            re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r
        ]
    return seen


def test_the_image_holds_everything_the_cloud_daemon_imports() -> None:
    # The image copies only some packages and installs only the runtime dependencies: an import
    # of the sandbox, of the device daemon or of a test-only library would fail in ECS alone.
    copied = {
        Path(s).name for c in dockerfile_instructions(stage=0)["COPY"] for s in shlex.split(c)[:-1]
    }
    packages = {name for name in copied if (ROOT / name / "__init__.py").exists()}
    distributions = importlib.metadata.packages_distributions()
    runtime = _runtime_distributions()
    for package in sorted(packages):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    where = f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                    if top in sys.stdlib_module_names or top in packages:
                        continue
                    assert not (ROOT / top).is_dir(), f"{where}: the image does not copy {top}/"
                    owners = {d.lower().replace("_", "-") for d in distributions.get(top, [])}
                    assert owners & runtime, f"{where}: not a runtime dependency"


def _create_table_schema(module: str, function: str) -> tuple[set[tuple[str, str]], list[str]]:
    """(attribute definitions, key schema as 'name:TYPE') of the create_table call in a helper."""
    tree = ast.parse((CLOUD / module).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef) and node.name == function:
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "create_table":
                    keywords = {
                        k.arg: ast.literal_eval(k.value)
                        for k in call.keywords
                        if k.arg in ("AttributeDefinitions", "KeySchema")
                    }
                    attributes = {
                        (a["AttributeName"], a["AttributeType"])
                        for a in keywords["AttributeDefinitions"]
                    }
                    keys = [f"{k['AttributeName']}:{k['KeyType']}" for k in keywords["KeySchema"]]
                    return attributes, keys
    raise AssertionError(f"{module}: no create_table call in {function}")


def _documented_table(guide: str, table: str) -> tuple[set[tuple[str, str]], list[str]]:
    command = re.search(
        rf"aws dynamodb create-table --table-name {table} (.*?)--region", guide, re.DOTALL
    )
    assert command is not None, f"docs/operations.md does not create {table}"
    text = command.group(1).replace("\\\n", " ")
    attributes = set(re.findall(r"AttributeName=(\w+),AttributeType=(\w)", text))
    keys = [f"{n}:{t}" for n, t in re.findall(r"AttributeName=(\w+),KeyType=(\w+)", text)]
    return attributes, keys


@pytest.mark.parametrize(
    ("table", "module", "function"),
    [
        ("ztp-leases", "leases.py", "create_lease_table"),
        ("ztp-ledger", "ledger.py", "create_ledger_table"),
    ],
)
def test_operations_guide_creates_the_tables_the_code_expects(
    table: str, module: str, function: str
) -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert _documented_table(guide, table) == _create_table_schema(module, function)
    resources = {r for s in load_policy()["Statement"] for r in _as_list(s["Resource"])}
    assert f"arn:aws:dynamodb:REGION:ACCOUNT_ID:table/{table}" in resources


def test_sandbox_model_declares_exactly_what_the_daemons_exchange() -> None:
    model = ApplicationModel.load()
    assert model.variables == {messages.REQUEST_PATH, messages.STATUS_PATH}
    assert model.settings == frozenset(), "the daemons never use AirVantage settings"
    assert set(model.commands) == {messages.DELIVER_COMMAND, messages.RENEW_COMMAND}
    expected = {f"f{i:02d}" for i in range(1, messages.MAX_DELIVERY_FRAGMENTS + 1)}
    assert model.commands[messages.DELIVER_COMMAND].parameters == expected
    assert model.commands[messages.RENEW_COMMAND].parameters == frozenset()
