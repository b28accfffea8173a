#!/usr/bin/python
"""Ansible module: one Prometheus textfile-collector file, written atomically and only when it changes."""

from __future__ import annotations

DOCUMENTATION = r"""
module: prometheus_textfile
short_description: Write a Prometheus text-format file for node_exporter's textfile collector
description:
  - Renders I(metrics) in the Prometheus text exposition format (HELP and TYPE lines, one sample a
    line, label values escaped) and writes it to I(path) atomically: a temporary file in the same
    directory whose name does not end in C(.prom) (the collector ignores it), flushed to disk, then
    renamed over I(path) (rename(2)). A scrape sees the old file or the new one, never half of one.
  - The file is written only when its content changes, so a role that writes the same values twice
    reports no change the second time.
options:
  path:
    description: >-
      The file to write; its name must end in C(.prom). Its directory is created (mode 0755, with its
      parents) when missing.
    type: path
    required: true
  metrics:
    description: >-
      The metric families, in the order given. Each is a dict: C(name), C(type) (gauge, counter or
      untyped; a counter's name must end in C(_total)), C(help), and C(samples), a list of dicts with
      C(value) (a number) and optional C(labels) (a dict of label name to value).
    type: list
    elements: dict
    required: true
  mode:
    description: Mode of the file (the collector runs as another user and must read it).
    type: str
    default: "0644"
"""

import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*\Z")
TYPES = ("gauge", "counter", "untyped")


def escape_label(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text):
    return str(text).replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def render(metrics):
    """The exposition text of the metric families, or raise ValueError naming what is wrong."""
    lines = []
    seen = set()
    for family in metrics:
        name = family.get("name", "")
        kind = family.get("type", "gauge")
        if not METRIC_NAME.match(str(name)):
            raise ValueError(f"metric name {name!r} is not a Prometheus metric name")
        if name in seen:
            raise ValueError(f"metric {name} is given twice")
        seen.add(name)
        if kind not in TYPES:
            raise ValueError(f"metric {name}: type {kind!r} is not one of {', '.join(TYPES)}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        lines.append(f"# HELP {name} {escape_help(family.get('help') or name)}")
        lines.append(f"# TYPE {name} {kind}")
        for sample in family.get("samples") or []:
            labels = sample.get("labels") or {}
            for label in labels:
                if not LABEL_NAME.match(str(label)) or str(label).startswith("__"):
                    raise ValueError(f"metric {name}: label name {label!r} is not allowed")
            try:
                value = format_value(sample.get("value"))
            except (TypeError, ValueError):
                raise ValueError(f"metric {name}: value {sample.get('value')!r} is not a number") from None
            text = ",".join(f'{label}="{escape_label(labels[label])}"' for label in sorted(labels))
            lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")
    return "\n".join(lines) + "\n"


def write_atomic(path, text, mode):
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "metrics": {"type": "list", "elements": "dict", "required": True},
            "mode": {"type": "str", "default": "0644"},
        },
        supports_check_mode=True,
    )
    path = module.params["path"]
    if not path.endswith(".prom"):
        module.fail_json(msg=f"{path}: the textfile collector reads only files whose name ends in .prom")
    try:
        mode = int(module.params["mode"], 8)
        text = render(module.params["metrics"])
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        if module.check_mode:
            module.exit_json(changed=True, path=path, content=text, diff={"before": "", "after": text})
        try:
            os.makedirs(directory, mode=0o755)  # the collector runs as its own user: it must list it
        except OSError as exc:
            module.fail_json(msg=f"cannot create {directory}: {exc}")
    try:
        with open(path, encoding="utf-8") as handle:
            before = handle.read()
    except FileNotFoundError:
        before = None
    mode_changed = before is not None and (os.stat(path).st_mode & 0o7777) != mode
    changed = before != text or mode_changed
    if changed and not module.check_mode:
        write_atomic(path, text, mode)
    diff = {"before": before or "", "after": text, "before_header": path, "after_header": path}
    module.exit_json(changed=changed, path=path, content=text, diff=diff)


if __name__ == "__main__":
    main()
