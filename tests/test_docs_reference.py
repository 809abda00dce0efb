"""The reference tables of README.md and docs/*.md say what the code has: every setting with its
default (alerting_app/settings.py), every metric with its type and labels (alerting_app/metrics.py),
every route with its methods (web/). They were written by hand over many sessions, and nothing
compared them with the code: a default changed, a metric or a route added, was left behind there."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from alerting_app import metrics
from alerting_app.app import app
from alerting_app.settings import Settings

# Importing them registers their views on the app: the API's (web/__init__.py), and the probes and /metrics.
for _views in ("web", "web.operations"):
    importlib.import_module(_views)

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A settings table's first cell: variables in backticks, one or several (`A`, `B` or `A` / `B`),
# after an optional word naming their group (`grouping: ...`); `DELIVERY_*` names no one setting.
_NAME = r"`[A-Z][A-Z0-9_]*`"
_SETTINGS_CELL = re.compile(rf"^(?:[a-z]+: )?({_NAME}(?:(?:, | / ){_NAME})*)$")
_SEPARATOR = re.compile(r", | / ")
# Settings documented in another setting's row rather than their own: they are its fallbacks.
_DOCUMENTED_WITH = {"AWS_REGION": "KAFKA_AWS_REGION", "AWS_DEFAULT_REGION": "KAFKA_AWS_REGION"}
_METHODS = "GET|POST|PUT|PATCH|DELETE"
_ROUTE = re.compile(rf"`((?:{_METHODS})(?:/(?:{_METHODS}))*) (/[^`\s?]*)(?:\?[^`]*)?`")


def table_rows(text: str) -> list[list[str]]:
    """The cells of each table row of a Markdown text (its header and separator rows included)."""
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            for line in text.splitlines() if line.startswith("|")]


def documented_settings(documents: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """Each variable of the settings tables: (the default a row gives it, where) for each of its rows."""
    found = {}
    for document in documents:
        for cells in table_rows(document.read_text()):
            match = _SETTINGS_CELL.match(cells[0])
            if len(cells) < 3 or match is None:
                continue
            names = [name.strip("`") for name in _SEPARATOR.split(match[1])]
            defaults = _SEPARATOR.split(cells[1]) if len(names) > 1 else [cells[1]]
            if len(defaults) == 1:  # one value for all of them (`unset`)
                defaults *= len(names)
            assert len(defaults) == len(names), f"{document.name}: {cells[0]} has {len(names)} names, defaults {cells[1]}"
            for name, default in zip(names, defaults):
                found.setdefault(name, []).append((default, f"{document.name}: {cells[0]}"))
    return found


def _shown_default(text: str) -> str:
    # `.alerting-data` (also when set empty) -> .alerting-data; `1,000` -> 1,000
    return text.split(" (")[0].replace("`", "").strip()


def default_disagreement(real: object, documented: str) -> str | None:
    """Why `documented` (a table's default cell) does not say `real`, or None when it does."""
    shown = _shown_default(documented)
    if real is None:  # unset: "—", "unset", or what stands in for it ("system CAs")
        number = re.fullmatch(r"-?[\d,.]+", shown)
        return f"says {shown!r}, the setting is unset by default" if number or shown in ("true", "false") else None
    if isinstance(real, bool):
        return None if shown == str(real).lower() else f"says {shown!r}, the default is {str(real).lower()}"
    if isinstance(real, (int, float)):
        try:
            agrees = float(shown.replace(",", "")) == real
        except ValueError:
            agrees = False
        return None if agrees else f"says {shown!r}, the default is {real:g}"
    return None if shown == str(real) else f"says {shown!r}, the default is {str(real)!r}"


def variables_read_beside_settings() -> set[str]:
    """Variables the code reads itself, with healthcheck.setting (MIGRATIONS_DIR): no Settings field,
    but a setting all the same, documented in the same table."""
    names = set()
    for path in (ROOT / "alerting_app").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setting"
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)):
                names.add(node.args[1].value)
    return names


def test_every_setting_is_in_a_settings_table_with_its_default() -> None:
    documented = documented_settings(DOCUMENTS)
    assert len(documented) > 50  # the pattern still finds the tables (63 names on 29 Nov)
    problems = []
    for field_name, field in Settings.model_fields.items():
        variable = field_name.upper()
        if variable in _DOCUMENTED_WITH:
            rows = documented.get(_DOCUMENTED_WITH[variable], [])
            if not any(variable in default for default, _ in rows):
                problems.append(f"{variable}: not named in {_DOCUMENTED_WITH[variable]}'s row")
            continue
        if variable not in documented:
            problems.append(f"{variable}: in no settings table of README.md or docs/")
            continue
        for default, where in documented[variable]:  # README.md's and its topic's page may both give it
            why = default_disagreement(field.default, default)
            if why:
                problems.append(f"{variable} ({where}): {why}")
    assert not problems, "\n".join(problems)


def test_every_variable_a_settings_table_names_is_read() -> None:
    read = {name.upper() for name in Settings.model_fields} | variables_read_beside_settings()
    assert "MIGRATIONS_DIR" in read
    unknown = {name: rows for name, rows in documented_settings(DOCUMENTS).items() if name not in read}
    assert not unknown, f"documented as settings, but nothing reads them: {unknown}"


def test_a_default_the_table_misstates_is_told(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("| Variable | Default | Meaning |\n|---|---|---|\n"
                    "| `WEB_PORT` | `6066` | port |\n"
                    "| `DELIVERY_ENDPOINT_BACKLOG`, `DELIVERY_MAX_HELD` | 1,000, 2,000 | held |\n"
                    "| `KAFKA_SSL_CERTFILE`, `KAFKA_SSL_KEYFILE` | unset | files |\n"
                    "| `DATA_DIR` | `.alerting-data` (also when set empty) | state |\n"
                    "| delivery: `DELIVERY_*` | see docs/delivery.md | retries |\n")
    documented = documented_settings([page])
    assert set(documented) == {"WEB_PORT", "DELIVERY_ENDPOINT_BACKLOG", "DELIVERY_MAX_HELD", "KAFKA_SSL_CERTFILE",
                               "KAFKA_SSL_KEYFILE", "DATA_DIR"}
    fields = Settings.model_fields

    def disagreement(variable: str) -> str | None:
        [(default, _)] = documented[variable]
        return default_disagreement(fields[variable.lower()].default, default)

    assert disagreement("WEB_PORT") is None
    assert disagreement("DELIVERY_ENDPOINT_BACKLOG") is None
    assert disagreement("DELIVERY_MAX_HELD") == "says '2,000', the default is 20000"
    assert disagreement("KAFKA_SSL_KEYFILE") is None
    assert disagreement("DATA_DIR") is None
    assert default_disagreement(None, "`25`") == "says '25', the setting is unset by default"
    assert default_disagreement(False, "`true`") == "says 'true', the default is false"


def code_metrics() -> dict[str, tuple[str, set[str]]]:
    """Each metric alerting_app/metrics.py registers: (its type, its labels)."""
    found = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            found[name] = (metric._type, set(metric._labelnames))
    return found


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """Each row of docs/operations.md's metrics table: (its type, its labels)."""
    found = {}
    for cells in table_rows((ROOT / "docs" / "operations.md").read_text()):
        if len(cells) == 4 and re.fullmatch(r"`alerting_\w+`", cells[0]):
            found[cells[0].strip("`")] = (cells[1], set(re.findall(r"`(\w+)`", cells[2])))
    return found


def test_every_metric_is_in_the_metrics_table_with_its_type_and_labels() -> None:
    in_code = code_metrics()
    assert len(in_code) > 15  # the metrics are still found (18 on 29 Nov)
    assert documented_metrics() == in_code


def code_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the worker serves, path parameters written `{}`."""
    routes = set()
    for path, view in app.web.views.items():
        for method in ("get", "post", "put", "patch", "delete"):
            # Faust's View answers every method (405); a route takes those its own class defines.
            if any(method in cls.__dict__ for cls in type(view).__mro__ if cls.__module__.startswith("web")):
                routes.add((method.upper(), re.sub(r"\{\w+\}", "{}", path)))
    return routes


def documented_routes(document: Path) -> set[tuple[str, str]]:
    """(method, path) of every `METHOD /path` (or `POST/GET /path`) the document names."""
    return {(method, re.sub(r"\{\w+\}", "{}", path))
            for methods, path in _ROUTE.findall(document.read_text()) for method in methods.split("/")}


def test_the_readme_names_every_route_with_its_methods_and_no_document_names_another() -> None:
    served = code_routes()
    assert ("PUT", "/api/v1/rules/{}") in served and ("GET", "/metrics") in served
    readme = documented_routes(ROOT / "README.md")
    assert served - readme == set(), "served, but not in README.md"
    for document in DOCUMENTS:
        assert documented_routes(document) - served == set(), f"named in {document.name}, but not served"


# A path of this repository, not one inside another package (`faust/tables/base.py`).
_REPOSITORY_PATH = re.compile(r"(?<![\w/.-])((?:alerting_app|agents|tables|web|tests|migrations|infra|bench)/[\w./-]*\w)")
# Named, not shipped: the operator's own env file, and the form of a migration's name.
_NOT_IN_THE_REPOSITORY = {"infra/.env", "migrations/NNN_name.sql"}


def missing_paths(documents: list[Path], root: Path) -> dict[str, list[str]]:
    """Each repository path the documents name that does not exist, with where; `migrations/012`
    names the migration numbered so."""
    missing: dict[str, list[str]] = {}
    for document in documents:
        for number, line in enumerate(document.read_text().splitlines(), 1):
            for path in _REPOSITORY_PATH.findall(line):
                if path in _NOT_IN_THE_REPOSITORY or (root / path).exists():
                    continue
                if re.fullmatch(r"migrations/\d{3}", path) and any((root / "migrations").glob(f"{path[11:]}_*.sql")):
                    continue
                missing.setdefault(path, []).append(f"{document.name}:{number}")
    return missing


def test_every_file_the_docs_name_exists() -> None:
    assert not missing_paths(DOCUMENTS, ROOT), "named in the docs, but not in the repository"


def test_a_renamed_file_is_told_and_another_package_s_is_not(tmp_path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "012_forgotten_deletions.sql").write_text("")
    page = tmp_path / "page.md"
    page.write_text("See `alerting_app/settings.py`, migrations/012 and migrations/013, "
                    "not faust/tables/base.py.\n")
    assert missing_paths([page], tmp_path) == {"alerting_app/settings.py": ["page.md:1"],
                                               "migrations/013": ["page.md:1"]}
