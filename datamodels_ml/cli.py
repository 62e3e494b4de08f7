"""Command line: ``python -m datamodels_ml <command> key=value ...`` (omegaconf dot-list overrides).

Thin by design: look the command up, parse its structured config, call one function. Errors a user
can cause (``UserError``) print one line and exit 2; a failed model exits 1; Ctrl-C exits 130,
SIGTERM 143 (raised as an interrupt, so every open MLflow run ends KILLED, not RUNNING). Under
``mlflow run``, a command that fails ends the run ``mlflow run`` made FAILED itself.

The original MadryLab tools' spelling is accepted too: ``--key=value``/``--key value``, bare
``--flag`` for a boolean key, a command's ``ALIASES`` (``--worker.index`` for ``index``), and, for a
command that runs the user's script (``SCRIPT_ARGV``), the script's own ``--section.key=value``
options, passed through to its ``sys.argv``.

Every command takes ``threads=N``: the CPU threads of torch and of the BLAS libraries, for the
command and the processes it starts (0, the default: every CPU the process is allotted, see
``cpus``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import typing
import warnings
from typing import Any

from datamodels_ml.errors import UserError

# name -> (module, config class, function, one-line summary, YAML config key or None)
COMMANDS: dict[str, tuple[str, str, str, str, str | None]] = {
    "init": ("datamodels_ml.store.commands", "InitConfig", "init", "create a store from a spec", None),
    "status": ("datamodels_ml.store.commands", "StatusConfig", "status", "show completed/missing models and failures", None),
    "worker": ("datamodels_ml.training.worker", "WorkerConfig", "worker", "train one model index and write its row", None),
    "train": ("datamodels_ml.training.train", "TrainConfig", "train", "train every incomplete index over GPU/CPU slots", None),
    "write_dataset": ("datamodels_ml.dataset.write_dataset", "WriteDatasetConfig", "write_dataset",
                      "write the completed rows of a store to an FFCV .beton", None),
    "regress": ("datamodels_ml.regression.regress", "RegressConfig", "regress", "fit the datamodels (lasso paths)", "config"),
    "evaluate": ("datamodels_ml.evaluation.evaluate", "EvaluateConfig", "evaluate",
                 "score datamodels, or any method's scores=FILE, on held-out models (LDS, correlations)", None),
    "export_lds": ("datamodels_ml.evaluation.ground_truth", "ExportConfig", "export_lds",
                   "write held-out models' masks and outputs as LDS ground truth for dattri, TRAK, kronfluence", None),
    "compare": ("datamodels_ml.compare", "CompareConfig", "compare",
                "TRAK (traker, CPU) vs datamodels on the digits demo: LDS with intervals against compute", "config"),
    "budget": ("datamodels_ml.evaluation.budget", "BudgetConfig", "budget",
               "LDS against the number of models used for the regression", "config"),
    "demo": ("datamodels_ml.pipeline", "DemoConfig", "demo",
             "the whole workflow on the digits example (init, train, write_dataset, regress, evaluate)", "config"),
}

# name -> (module, function): the command's own config reader, where it has one (regress: configs written
# for the original tools keep the original's meaning); the others merge schema <- YAML <- command line.
LOADERS: dict[str, tuple[str, str]] = {"regress": ("datamodels_ml.regression.original_config", "load_config")}


def _usage() -> str:
    lines = ["usage: python -m datamodels_ml <command> key=value ...", "", "commands:"]
    lines += [f"  {name:<14} {entry[3]}" for name, entry in COMMANDS.items()]
    lines += ["", "`python -m datamodels_ml <command> --help` lists a command's keys."]
    return "\n".join(lines)


def _help(name: str, schema: type, func, yaml_key: str | None) -> str:
    from datamodels_ml.config import describe

    doc = (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else COMMANDS[name][3]
    lines = [f"usage: python -m datamodels_ml {name} key=value ...", "", doc, "", "keys:"]
    if yaml_key:
        lines.append(f"  {yaml_key:<28} YAML file merged under the command-line keys")
    lines += describe(schema)
    lines.append(f"  {'threads':<28} CPU threads for torch and the BLAS libraries, here and in the processes this "
                 f"command starts (0: every CPU allotted: affinity mask, cgroup quota) (default 0)")
    aliases = getattr(schema, "ALIASES", {})
    if aliases:
        lines += ["", "the original tools' spelling (e.g. --" + next(iter(aliases)) + "=...; not with our key as well):"]
        lines += [f"  {alias:<28} = {ours}" for alias, ours in aliases.items()]
    if getattr(schema, "SCRIPT_ARGV", None):
        lines += ["", "options for the script (the original tools' fastargs spelling):",
                  f"  {'--section.key=value':<28} any option whose section is not a key above, and -C FILE,",
                  f"  {'':<28} go to the script's sys.argv as written (after {schema.SCRIPT_ARGV}=[...]);",
                  f"  {'':<28} fastargs then parses known arguments only, as under the original worker"]
    return "\n".join(lines)


def normalize_args(args: list[str], *, config_key: str | None = None) -> list[str]:
    """Accept ``--key value`` and ``--key=value`` (how ``mlflow run`` passes extra ``-P`` parameters and
    how the original tools' fastargs spell options) as well as ``key=value``; for a command that
    reads a YAML file, ``-C FILE`` / ``--config-file FILE`` (the original's spelling) name it."""
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token in ("-C", "--config-file") or token.startswith(("-C=", "--config-file=")):
            if config_key is None:
                raise UserError(f"option '{token.split('=')[0]}' names a config file, which this command does not read")
            if "=" in token:
                out.append(f"{config_key}={token.split('=', 1)[1]}")
            elif i + 1 < len(args):
                out.append(f"{config_key}={args[i + 1]}")
                i += 1
            else:
                raise UserError(f"option '{token}' needs a file")
        elif token.startswith("--") and len(token) > 2 and token not in ("--help",):
            body = token[2:]
            if "=" in body:
                out.append(body)
            elif i + 1 < len(args):
                out.append(f"{body}={args[i + 1]}")
                i += 1
            else:
                raise UserError(f"option '{token}' needs a value")
        else:
            out.append(token)
        i += 1
    return out


def _field_names(schema: type) -> set[str]:
    """The command's own top-level keys, and the sections of the original spellings it accepts."""
    own = {f.name for f in dataclasses.fields(schema)}
    return own | {alias.split(".")[0] for alias in getattr(schema, "ALIASES", {})}


def _is_bool_key(schema: type, name: str) -> bool:
    """Whether ``name`` (a dotted key, or one of the schema's ``ALIASES``) is a boolean field."""
    name = getattr(schema, "ALIASES", {}).get(name, name)
    node: Any = schema
    for part in name.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return False
        try:
            hints = typing.get_type_hints(node)
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: not a flag we know
            return False
        if part not in hints:
            return False
        node = hints[part]
    return node in (bool, typing.Optional[bool])


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def bare_flags(schema: type, args: list[str]) -> list[str]:
    """A boolean key given as a bare ``--name`` (the original tools' flags, e.g.
    ``--cfg.ignore_completed``) becomes ``name=true``; ``--name false`` keeps its value."""
    out: list[str] = []
    for i, token in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else ""
        if (token.startswith("--") and "=" not in token and _is_bool_key(schema, token[2:])
                and nxt.lower() not in _BOOL_WORDS):
            out.append(f"{token[2:]}=true")
        else:
            out.append(token)
    return out


def apply_aliases(schema: type, tokens: list[str]) -> list[str]:
    """Rewrite the original tools' spelling of a key (the schema's ``ALIASES``, e.g.
    ``worker.index`` -> ``index``) into ours; a setting given both ways is refused."""
    aliases: dict[str, str] = getattr(schema, "ALIASES", {})
    if not aliases:
        return tokens
    given = {t.split("=", 1)[0] for t in tokens}
    for alias, ours in aliases.items():
        if alias in given and ours in given:
            raise UserError(f"'{ours}' and '{alias}' name the same setting: give one of them")
    sections = {alias.split(".")[0] for alias in aliases} - {f.name for f in dataclasses.fields(schema)}
    out = []
    for token in tokens:
        key, eq, value = token.partition("=")
        if key.split(".")[0] in sections and key not in aliases:
            known = ", ".join(a for a in aliases if a.split(".")[0] == key.split(".")[0])
            raise UserError(f"unknown config key '{key}' (the original's spellings accepted here: {known})")
        out.append(f"{aliases[key]}={value}" if eq and key in aliases else token)
    return out


def split_script_options(schema: type, args: list[str]) -> tuple[list[str], list[str]]:
    """For a command that runs the user's script (its schema names a ``SCRIPT_ARGV`` field): split
    off the options in the original tools' fastargs spelling that are not the command's own keys.

    Returns ``(ours, script)``. ``--section.key=value``, ``--section.key value`` and a bare
    ``--section.flag`` whose section is not one of the command's keys (nor of its ``ALIASES``), and
    ``-C FILE`` / ``--config-file FILE``, go to ``script`` as written (the script's ``sys.argv``).
    """
    own = _field_names(schema)

    def is_ours(token: str) -> bool:
        return "=" in token and not token.startswith("-") and token.split("=", 1)[0].split(".")[0] in own

    ours: list[str] = []
    script: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        name = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if token in ("-C", "--config-file") or token.startswith(("-C=", "--config-file=")):
            script.append(token.replace("-C=", "--config-file=", 1) if token.startswith("-C=") else token)
            if "=" not in token and nxt is not None:
                script.append(nxt)
                i += 1
        elif "." in name and name.split(".")[0] not in own:
            script.append(token)
            if "=" not in token and nxt is not None and not nxt.startswith("--") and not is_ours(nxt):
                script.append(nxt)
                i += 1
        else:
            ours.append(token)
        i += 1
    return ours, script


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, schema_name, func_name, _summary, yaml_key = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"error: command '{name}' is not available: {exc}", file=sys.stderr)
        return 2
    schema, func = getattr(module, schema_name), getattr(module, func_name)
    if any(a in ("-h", "--help") for a in rest):
        print(_help(name, schema, func, yaml_key))
        return 0
    warnings.simplefilter("ignore", category=FutureWarning)
    attached = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run` made for this command, if any
    code = 1
    try:
        loader = None
        if name in LOADERS:
            loader = getattr(importlib.import_module(LOADERS[name][0]), LOADERS[name][1])
        code = _call(schema, func, rest, yaml_key, loader)
        return code
    finally:
        if attached:
            from datamodels_ml.tracking import runs as tracking

            tracking.finish_attached(attached, name, code)
        from datamodels_ml.tracking import links

        links.print_links()  # each run's address, when a tracking server or `make ui` is there to show it


def take_threads(tokens: list[str]) -> tuple[list[str], int | None]:
    """Split off the ``threads=N`` that every command takes: ``(other tokens, N or None)``."""
    out, threads = [], None
    for token in tokens:
        key, eq, value = token.partition("=")
        if eq and key == "threads":
            if not value.strip().isdigit():
                raise UserError(f"threads must be a whole number >= 0 (0: every CPU allotted), got '{value}'")
            threads = int(value)
        else:
            out.append(token)
    return out, threads


def _call(schema: Any, func: Any, rest: list[str], yaml_key: str | None, loader: Any = None) -> int:
    """Parse the command's config (with the command's own ``load_config`` when it has one: regress,
    whose original configs keep the original's meaning) and run it; the exit code (errors a user can
    cause: one line, 2)."""
    from datamodels_ml.config import load
    from datamodels_ml.interrupts import terminate_as_interrupt

    try:
        script_key = getattr(schema, "SCRIPT_ARGV", None)
        script: list[str] = []
        rest = bare_flags(schema, rest)
        if script_key:
            rest, script = split_script_options(schema, rest)
        tokens, threads = take_threads(normalize_args(rest, config_key=yaml_key))
        if threads is not None:
            from datamodels_ml.cpus import set_threads

            set_threads(threads)
        tokens = apply_aliases(schema, tokens)
        cfg = loader(tokens) if loader is not None else load(schema, tokens, config_key=yaml_key)
        if script:  # after any argv=[...] given as a key
            setattr(cfg, script_key, [*getattr(cfg, script_key), *script])
        with terminate_as_interrupt("terminated (SIGTERM)"):
            return int(func(cfg) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only directory: one line naming the file
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1


if __name__ == "__main__":
    raise SystemExit(main())
