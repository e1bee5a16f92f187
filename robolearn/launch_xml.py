"""ROS 2 XML launch files read into resolved node command lines (the `robolearn launch` parser).

Meanings follow ros2/launch and launch_ros; docs/launch.md lists what is supported and what differs.
"""

from __future__ import annotations

import builtins
import math
import os
import re
import shlex
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NoReturn
from xml.parsers import expat

# The nodes `robolearn ament-install` writes a lib/robolearn/<exec> script for.
EXECUTABLES = ("sim_robot_node", "agent_node", "record_node", "learner_node", "camera_node")
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the repo root in a source checkout (holds launch/)


class LaunchError(ValueError):
    """A launch file problem; the message is one line naming the file and line."""


@dataclass
class NodeSpec:
    """One node to start: its full command line and environment, and how to run it."""
    label: str  # output prefix and log file name: the node name, else the executable
    cmd: list[str]
    env: dict[str, str]
    where: str  # file:line of its <node>
    output: str = "log"  # screen | log | both, as in ROS 2 (default log)
    shutdown_on_exit: bool = False
    respawn: bool = False
    respawn_delay: float = 0.0
    sigterm_timeout: float = 5.0  # after SIGINT, as ros2 launch
    sigkill_timeout: float = 5.0  # after SIGTERM


# ---- XML with line numbers (ElementTree drops them) ----

@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    line: int
    children: list[Element] = field(default_factory=list)


def read_xml(path: Path) -> Element:
    if not path.is_file():
        raise LaunchError(f"{path}: no such launch file")
    if path.suffix in (".py", ".yaml", ".yml"):
        raise LaunchError(f"{path}: only XML launch files are supported")
    parser, stack, roots = expat.ParserCreate(), [], []

    def start(tag: str, attrs: dict[str, str]) -> None:
        element = Element(tag, attrs, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(element)
        stack.append(element)

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: stack.pop()
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as err:
        raise LaunchError(f"{path}:{err.lineno}: malformed XML: {expat.ErrorString(err.code)}") from None
    return roots[0]


# ---- substitutions: $(name arg ...), args plain, 'single' or "double" quoted, nesting allowed ----

@dataclass
class Sub:
    name: str
    args: list[list[str | Sub]]
    where: str


ARITY = {"var": (1, 2), "env": (1, 2), "find-pkg-share": (1, 1), "eval": (1, 1), "dirname": (0, 0)}
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def parse_subst(text: str, where: str) -> list[str | Sub]:
    """The parts of an attribute value: literal text and substitutions (grammar of ros2/launch)."""
    parts, pos = _parse_parts(text, 0, "", None, where)
    return parts


def _parse_parts(text: str, pos: int, stops: str, quote: str | None, where: str) -> tuple[list, int]:
    parts: list[str | Sub] = []
    while pos < len(text) and text[pos] not in stops:
        if text.startswith("$(", pos):
            sub, pos = _parse_sub(text, pos + 2, quote, where)
            parts.append(sub)
            continue
        escaped = text[pos] == "\\" and pos + 1 < len(text)
        char = text[pos + 1] if escaped else text[pos]
        pos += 2 if escaped else 1
        if parts and isinstance(parts[-1], str):
            parts[-1] += char
        else:
            parts.append(char)
    return parts, pos


def _parse_sub(text: str, pos: int, quote: str | None, where: str) -> tuple[Sub, int]:
    match = _IDENT.match(text, pos)
    if not match:
        raise LaunchError(f"{where}: '$(' must be followed by a substitution name in {text!r}")
    name, pos, args = match.group(), match.end(), []
    while True:
        if pos >= len(text):
            raise LaunchError(f"{where}: unclosed $({name} in {text!r}")
        if text[pos] == ")":
            pos += 1
            break
        if text[pos] != " ":
            raise LaunchError(f"{where}: unexpected {text[pos]!r} in $({name} in {text!r}")
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == ")":  # ros2 launch's grammar rejects it too
            raise LaunchError(f"{where}: a space before ')' in $({name} in {text!r}")
        if pos < len(text) and text[pos] in "'\"" and text[pos] != quote:
            q = text[pos]
            arg, pos = _parse_parts(text, pos + 1, q, q, where)
            if pos >= len(text):
                raise LaunchError(f"{where}: unclosed {q} in {text!r}")
            pos += 1
        else:
            arg, pos = _parse_parts(text, pos, " )" + (quote or ""), quote, where)
        args.append(arg)
    if name not in ARITY:
        raise LaunchError(f"{where}: unknown substitution $({name}) (supported: {', '.join(ARITY)})")
    low, high = ARITY[name]
    if not low <= len(args) <= high:
        count = f"{low}" if low == high else f"{low} or {high}"
        raise LaunchError(f"{where}: $({name}) takes {count} argument(s), got {len(args)} in {text!r}")
    return Sub(name, args, where), pos


# eval is not a sandbox (launch files are trusted code, as in ROS 2); it keeps expressions to
# arithmetic, comparisons and math, which is what launch files use it for.
_EVAL_BUILTINS = {n: getattr(builtins, n) for n in ("abs", "all", "any", "bool", "float", "int", "len", "max",
                                                     "min", "pow", "round", "str", "sum", "True", "False", "None")}
_EVAL_GLOBALS = {"__builtins__": _EVAL_BUILTINS, "math": math,
                 **{k: v for k, v in vars(math).items() if not k.startswith("_")}}


@dataclass
class _Scope:
    configs: dict[str, str]  # launch configurations: args, lets, and ROS 2's 'ros_namespace'
    env: dict[str, str]
    file: Path
    given: frozenset[str]  # arguments the command line or <include> passed to this file
    depth: int = 0

    def where(self, element: Element) -> str:
        return f"{self.file}:{element.line}"


def resolve(scope: _Scope, parts: list[str | Sub]) -> str:
    return "".join(p if isinstance(p, str) else _perform(scope, p) for p in parts)


def _perform(scope: _Scope, sub: Sub) -> str:
    args = [resolve(scope, a) for a in sub.args]  # nested substitutions first, as in ROS 2
    if sub.name == "var":
        if args[0] in scope.configs:
            return scope.configs[args[0]]
        if len(args) == 2:
            return args[1]
        raise LaunchError(f"{sub.where}: $(var {args[0]}): no argument or let named {args[0]!r}")
    if sub.name == "env":
        value = scope.env.get(args[0], args[1] if len(args) == 2 else None)
        if value is None:
            raise LaunchError(f"{sub.where}: $(env {args[0]}): environment variable {args[0]} is not set")
        return value
    if sub.name == "find-pkg-share":
        return str(package_share(args[0], scope.env, sub.where))
    if sub.name == "dirname":
        return str(scope.file.parent)
    try:  # eval
        return str(eval(args[0], dict(_EVAL_GLOBALS)))
    except Exception as err:
        raise LaunchError(f"{sub.where}: $(eval {args[0]!r}) failed: {type(err).__name__}: {err}") from None


def split_args(scope: _Scope, parts: list[str | Sub], where: str) -> list[str]:
    """Command-line words: literal text is split like a shell, a substitution's value never is (as ROS 2)."""
    words: list[str] = []
    word: str | None = None
    for part in parts:
        if isinstance(part, Sub):
            word = (word or "") + _perform(scope, part)
            continue
        try:
            tokens = shlex.split(part)
        except ValueError as err:
            raise LaunchError(f"{where}: args: {err}") from None
        for i, token in enumerate(tokens):
            if (i > 0 or part[0].isspace()) and word is not None:
                words.append(word)
                word = None
            word = (word or "") + token
        if (part[-1].isspace() or not tokens) and word is not None:
            words.append(word)
            word = None
    return words + ([word] if word is not None else [])


# ---- the ament index: where packages and their executables live ----

def package_prefix(pkg: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The first AMENT_PREFIX_PATH prefix whose ament index registers `pkg`, as `ros2 run` looks."""
    for prefix in (os.environ if env is None else env).get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix and (Path(prefix) / "share/ament_index/resource_index/packages" / pkg).is_file():
            return Path(prefix)
    return None


def package_share(pkg: str, env: Mapping[str, str] | None = None, where: str = "") -> Path:
    """$(find-pkg-share PKG); for robolearn, a source checkout's root when no prefix registers it."""
    prefix = package_prefix(pkg, env)
    if prefix is not None:
        return prefix / "share" / pkg
    if pkg == "robolearn" and (SOURCE_ROOT / "launch").is_dir():
        return SOURCE_ROOT
    raise LaunchError(f"{where + ': ' if where else ''}package {pkg!r} not found: no share/ament_index/resource_index/"
                      f"packages/{pkg} under any AMENT_PREFIX_PATH prefix")


def package_executable(pkg: str, exe: str, env: Mapping[str, str] | None = None) -> Path | None:
    """PREFIX/lib/PKG/EXE of the prefix that registers PKG, if it is an executable file."""
    prefix = package_prefix(pkg, env)
    path = prefix / "lib" / pkg / exe if prefix else None
    return path if path and path.is_file() and os.access(path, os.X_OK) else None


def node_command(pkg: str | None, exe: str, env: Mapping[str, str], where: str) -> list[str]:
    if pkg == "robolearn":  # our nodes run from this interpreter, so no install step is needed
        if not re.fullmatch(r"[A-Za-z_]\w*", exe) or not (Path(__file__).parent / "ros" / f"{exe}.py").is_file():
            raise LaunchError(f"{where}: node exec={exe!r}: robolearn has no node robolearn/ros/{exe}.py")
        return [sys.executable, "-m", f"robolearn.ros.{exe}"]
    path = package_executable(pkg, exe, env) if pkg else shutil.which(exe, path=env.get("PATH"))
    if path is None:
        looked = f"lib/{pkg}/{exe} of a prefix in AMENT_PREFIX_PATH" if pkg else "PATH"
        raise LaunchError(f"{where}: node pkg={pkg!r} exec={exe!r}: no executable found ({looked})")
    return [str(path)]


def ament_install(prefix: str | Path) -> list[Path]:
    """Register robolearn in the ament index under PREFIX, so `ros2 launch/run robolearn ...` work."""
    if not (SOURCE_ROOT / "package.xml").is_file() or not (SOURCE_ROOT / "launch").is_dir():
        raise LaunchError(f"ament-install needs a source checkout: no package.xml and launch/ in {SOURCE_ROOT}")
    prefix, written = Path(prefix).resolve(), []
    marker = prefix / "share/ament_index/resource_index/packages/robolearn"
    share, lib = prefix / "share/robolearn", prefix / "lib/robolearn"
    for folder in (marker.parent, share / "launch", lib):
        folder.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    written.append(marker)
    sources = [SOURCE_ROOT / "package.xml"] + sorted(
        p for p in (SOURCE_ROOT / "launch").iterdir() if p.suffix in (".xml", ".yaml", ".yml"))
    for src in sources:
        dst = share / src.relative_to(SOURCE_ROOT)
        shutil.copyfile(src, dst)
        written.append(dst)
    for exe in EXECUTABLES:
        script = lib / exe
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom robolearn.ros.{exe} import main\nsys.exit(main())\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        written.append(script)
    return written


# ---- the file walk: check every tag and attribute, then perform the actions in order ----

# tag -> (required, optional) attributes; every action also takes `if` / `unless`.
ACTIONS: dict[str, tuple[set[str], set[str]]] = {
    "arg": ({"name"}, {"default", "description"}),
    "let": ({"name", "value"}, set()),
    "node": ({"exec"}, {"pkg", "name", "namespace", "output", "args", "on_exit", "respawn", "respawn_delay",
                        "sigterm_timeout", "sigkill_timeout"}),
    "include": ({"file"}, set()),
    "group": (set(), {"scoped"}),
    "push-ros-namespace": ({"namespace"}, set()),
    "push_ros_namespace": ({"namespace"}, set()),
    "set_env": ({"name", "value"}, set()),
}
CHILDREN: dict[str, dict[str, tuple[set[str], set[str]]]] = {  # tags that hold entities, not actions
    "node": {"param": (set(), {"name", "value", "from"}), "remap": ({"from", "to"}, set())},
    "include": {"arg": ({"name", "value"}, set())},
}


def _fail(where: str, message: str) -> NoReturn:
    raise LaunchError(f"{where}: {message}")


def _check(path: Path, element: Element, allowed: dict[str, tuple[set[str], set[str]]], inside: str) -> None:
    """Static checks of a whole file before anything runs, as ros2 launch parses a file before running it."""
    where = f"{path}:{element.line}"
    if element.tag not in allowed:
        _fail(where, f"unknown tag <{element.tag}> in <{inside}> (allowed: {', '.join(allowed) or 'none'})")
    required, optional = allowed[element.tag]
    optional = optional | ({"if", "unless"} if allowed is ACTIONS else set())
    for name, value in element.attrs.items():
        if name not in required | optional:
            known = ", ".join(sorted(required | optional))
            _fail(where, f"unknown attribute {name!r} of <{element.tag}> (allowed: {known})")
        parse_subst(value, where)
    for name in sorted(required - set(element.attrs)):
        _fail(where, f"<{element.tag}> needs the attribute {name!r}")
    if "if" in element.attrs and "unless" in element.attrs:
        _fail(where, f"<{element.tag}> takes `if` or `unless`, not both")
    if element.tag == "param" and set(element.attrs) not in ({"from"}, {"name", "value"}):
        _fail(where, "<param> takes from=FILE, or name and value")
    children = ACTIONS if element.tag == "group" else CHILDREN.get(element.tag, {})
    for child in element.children:
        _check(path, child, children, element.tag)


def _attr(scope: _Scope, element: Element, name: str, default: str | None = None) -> str | None:
    value = element.attrs.get(name)
    return default if value is None else resolve(scope, parse_subst(value, scope.where(element)))


def _truth(value: str, what: str, where: str) -> bool:
    word = value.strip().lower()
    if word not in ("true", "false", "1", "0"):
        _fail(where, f"{what}={value!r} must be true, false, 1 or 0")
    return word in ("true", "1")


def _number(value: str, what: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        _fail(where, f"{what}={value!r} is not a number")


def _join_namespace(base: str | None, ns: str | None) -> str | None:
    """launch_ros's prefix_namespace + make_namespace_absolute: relative `ns` goes under `base`."""
    if ns is None:
        combined = base
    elif not base or ns.startswith("/"):
        combined = ns
    else:
        combined = ("" if base == "/" else base) + "/" + ns
    if combined is None:
        return None
    combined = combined if combined == "/" else combined.rstrip("/")
    return combined if combined.startswith("/") else "/" + combined


def _do_arg(scope: _Scope, element: Element, nodes: list[NodeSpec]) -> None:
    name = _attr(scope, element, "name")
    default = _attr(scope, element, "default")
    if default is None and name not in scope.given:
        description = _attr(scope, element, "description")
        _fail(scope.where(element), f"missing required argument {name!r}" + (f" ({description})" if description else "")
              + f"; pass {name}:=VALUE")
    scope.configs.setdefault(name, default)


def _do_let(scope: _Scope, element: Element, nodes: list[NodeSpec]) -> None:
    scope.configs[_attr(scope, element, "name")] = _attr(scope, element, "value")


def _do_set_env(scope: _Scope, element: Element, nodes: list[NodeSpec]) -> None:
    scope.env[_attr(scope, element, "name")] = _attr(scope, element, "value")


def _do_push_ns(scope: _Scope, element: Element, nodes: list[NodeSpec]) -> None:
    ns = _join_namespace(scope.configs.get("ros_namespace"), _attr(scope, element, "namespace"))
    scope.configs["ros_namespace"] = ns


def _do_group(scope: _Scope, element: Element, nodes: list[NodeSpec]) -> None:
    scoped = _truth(_attr(scope, element, "scoped", "true"), "scoped", scope.where(element))
    inner = _Scope(dict(scope.configs), dict(scope.env), scope.file, scope.given, scope.depth) if scoped else scope
    _perform_actions(inner, element.children, nodes)


def _do_include(scope: _Scope, element: Element, nodes: list[NodeSpec]) -> None:
    where = scope.where(element)
    path = Path(_attr(scope, element, "file")).absolute()  # a relative path is from the cwd, as in ROS 2
    if scope.depth >= 32:
        _fail(where, f"includes nested 32 deep at {path} (an include cycle?)")
    given = []
    for arg in element.children:
        name = _attr(scope, arg, "name")
        scope.configs[name] = _attr(scope, arg, "value")
        given.append(name)
    # ROS 2 runs an included file in the includer's scope: it sees every launch configuration,
    # and its lets leak out; wrap the <include> in a <group> to keep them in.
    _load_file(_Scope(scope.configs, scope.env, path, frozenset(given), scope.depth + 1), nodes, where)


def _do_node(scope: _Scope, element: Element, nodes: list[NodeSpec]) -> None:
    where = scope.where(element)
    a = lambda name, default=None: _attr(scope, element, name, default)  # noqa: E731
    pkg, exe, name = a("pkg"), a("exec"), a("name")
    cmd = node_command(pkg, exe, scope.env, where)
    cmd += split_args(scope, parse_subst(element.attrs.get("args", ""), where), where)
    cmd.append("--ros-args")
    if name is not None:
        cmd += ["-r", f"__node:={name}"]
    namespace = _join_namespace(scope.configs.get("ros_namespace"), a("namespace"))
    if namespace is not None:
        cmd += ["-r", f"__ns:={namespace}"]
    remaps = []
    for child in element.children:
        c = lambda attr, child=child: _attr(scope, child, attr)  # noqa: E731
        if child.tag == "remap":
            remaps += ["-r", f"{c('from')}:={c('to')}"]
        elif "from" in child.attrs:
            params_file = Path(c("from")).absolute()
            if not params_file.is_file():
                _fail(scope.where(child), f"parameter file {params_file} not found")
            cmd += ["--params-file", str(params_file)]
        else:
            value = c("value")  # rcl parses a -p value as YAML and refuses an empty one: '' is the empty string
            cmd += ["-p", f"{c('name')}:={value if value else repr('')}"]
    output, on_exit = a("output", "log"), a("on_exit")
    if output not in ("screen", "log", "both"):
        _fail(where, f"output={output!r} must be screen, log or both")
    if on_exit not in (None, "shutdown"):
        _fail(where, f"on_exit={on_exit!r}: only on_exit=\"shutdown\" is supported")
    nodes.append(NodeSpec(
        label=name or Path(exe).name, cmd=cmd + remaps, env=dict(scope.env), where=where, output=output,
        shutdown_on_exit=on_exit == "shutdown", respawn=_truth(a("respawn", "false"), "respawn", where),
        respawn_delay=_number(a("respawn_delay", "0"), "respawn_delay", where),
        sigterm_timeout=_number(a("sigterm_timeout", "5"), "sigterm_timeout", where),
        sigkill_timeout=_number(a("sigkill_timeout", "5"), "sigkill_timeout", where)))


_HANDLERS: dict[str, Callable[[_Scope, Element, list[NodeSpec]], None]] = {
    "arg": _do_arg, "let": _do_let, "set_env": _do_set_env, "group": _do_group, "include": _do_include,
    "node": _do_node, "push-ros-namespace": _do_push_ns, "push_ros_namespace": _do_push_ns,
}


def _perform_actions(scope: _Scope, elements: list[Element], nodes: list[NodeSpec]) -> None:
    for element in elements:
        where = scope.where(element)
        if "if" in element.attrs and not _truth(_attr(scope, element, "if"), "if", where):
            continue
        if "unless" in element.attrs and _truth(_attr(scope, element, "unless"), "unless", where):
            continue
        _HANDLERS[element.tag](scope, element, nodes)


def _load_file(scope: _Scope, nodes: list[NodeSpec], included_from: str = "") -> None:
    try:
        root = read_xml(scope.file)
    except LaunchError as err:
        raise LaunchError(f"{err} (included from {included_from})" if included_from else str(err)) from None
    if root.tag != "launch":
        _fail(f"{scope.file}:{root.line}", f"the root tag must be <launch>, not <{root.tag}>")
    for name in root.attrs:
        _fail(f"{scope.file}:{root.line}", f"unknown attribute {name!r} of <launch>")
    for element in root.children:
        _check(scope.file, element, ACTIONS, "launch")
    _perform_actions(scope, root.children, nodes)


def load(path: str | Path, arguments: Mapping[str, str] | None = None,
         env: Mapping[str, str] | None = None) -> list[NodeSpec]:
    """The nodes a launch file starts, in order, with `arguments` (name:=value) given to it."""
    arguments = dict(arguments or {})
    scope = _Scope(dict(arguments), dict(os.environ if env is None else env), Path(path).absolute(),
                   frozenset(arguments))
    nodes: list[NodeSpec] = []
    _load_file(scope, nodes)
    seen: dict[str, int] = {}
    for node in nodes:  # unique output prefixes and log names
        seen[node.label] = seen.get(node.label, 0) + 1
        if seen[node.label] > 1:
            node.label = f"{node.label}-{seen[node.label]}"
    return nodes


def parse_arguments(words: list[str]) -> dict[str, str]:
    """`name:=value` words of the command line, as `ros2 launch` takes them."""
    out = {}
    for word in words:
        name, sep, value = word.partition(":=")
        if not sep or not name:
            raise LaunchError(f"launch arguments are name:=value, got {word!r}")
        out[name] = value
    return out


def find_launch_file(words: list[str], env: Mapping[str, str] | None = None) -> tuple[Path, list[str]]:
    """FILE [args] or, as `ros2 launch`, PKG FILE [args] (FILE searched under share/PKG)."""
    if len(words) >= 2 and ":=" not in words[1] and not Path(words[0]).is_file():
        share = package_share(words[0], env)
        share = share / "launch" if share == SOURCE_ROOT else share  # not the whole checkout
        found = sorted(p for p in share.rglob(words[1]) if p.is_file())
        if not found:
            raise LaunchError(f"no file {words[1]!r} under {share}")
        return found[0], words[2:]
    if not words:
        raise LaunchError("give a launch file")
    return Path(words[0]), words[1:]
