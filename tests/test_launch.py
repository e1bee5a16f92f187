"""`robolearn launch`: ROS 2 XML launch files resolved to exact command lines, and run as processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from robolearn.launcher import random_domain
from robolearn.launch_xml import EXECUTABLES, SOURCE_ROOT, LaunchError, load, package_executable, package_share

ROBOLEARN = [sys.executable, "-m", "robolearn.cli"]

# A stand-in node: prints its argv; can write its pid (and a child's) to a file, wait for a file,
# ignore SIGINT, start a child, or exit with a code.
NODE = """\
import os, signal, subprocess, sys, time
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1] if name in args else None
print("argv", " ".join(args))
print("to stderr", file=sys.stderr)
if "--ignore-sigint" in args:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child below
pids = [os.getpid()]
if "--child" in args:
    pids.append(subprocess.Popen(["sleep", "300"]).pid)
if opt("--pidfile"):
    with open(opt("--pidfile") + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.rename(opt("--pidfile") + ".tmp", opt("--pidfile"))
while opt("--wait-for") and not os.path.exists(opt("--wait-for")):
    time.sleep(0.05)
if opt("--exit"):
    sys.exit(int(opt("--exit")))
time.sleep(300)
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def make_executable(path: Path, body: str) -> Path:
    write(path, f"#!{sys.executable}\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


@pytest.fixture
def prefix(tmp_path):
    """An ament prefix holding package testpkg: lib/testpkg/talker and share/testpkg/params.yaml."""
    root = tmp_path / "prefix"
    write(root / "share/ament_index/resource_index/packages/testpkg", "")
    make_executable(root / "lib/testpkg/talker", NODE)
    write(root / "share/testpkg/params.yaml", "/**:\n  ros__parameters:\n    gain: 2.5\n")
    return root


@pytest.fixture
def env(prefix):
    return dict(os.environ, AMENT_PREFIX_PATH=str(prefix), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                ROS_LOCALHOST_ONLY="1", ROS_DOMAIN_ID=str(random_domain()))


def launch_cli(*args, env, timeout=120):
    return subprocess.run([*ROBOLEARN, "launch", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_resolves_exact_command_lines(tmp_path, prefix, env):
    main = write(tmp_path / "main.launch.xml", """
        <launch>
          <arg name="robot" default="arm" description="robot name"/>
          <arg name="sim" default="true"/>
          <arg name="hz" description="control rate"/>
          <let name="rate" value="$(eval '$(var hz) * 2')"/>
          <set_env name="LAUNCH_TEST" value="$(var robot)"/>
          <node pkg="testpkg" exec="talker" name="driver" namespace="$(var robot)"
                args="--mode 'a b' $(var robot)" if="$(var sim)">
            <param name="rate" value="$(var rate)"/>
            <param from="$(find-pkg-share testpkg)/params.yaml"/>
            <remap from="joint_states" to="/$(var robot)/joint_states"/>
          </node>
          <node pkg="testpkg" exec="talker" name="real" unless="$(var sim)"/>
          <group>
            <push-ros-namespace namespace="cam"/>
            <let name="robot" value="inner"/>
            <set_env name="LAUNCH_TEST" value="inner"/>
            <node pkg="testpkg" exec="talker" name="camera" output="screen"/>
            <group>
              <push-ros-namespace namespace="left"/>
              <node pkg="testpkg" exec="talker" name="lcam" namespace="x"/>
            </group>
          </group>
          <group scoped="false"><let name="leaked" value="yes"/></group>
          <include file="$(dirname)/sub.launch.xml">
            <arg name="who" value="$(var robot)"/>
          </include>
          <node pkg="testpkg" exec="talker" args="$(var leaked) $(var from_sub)" unless="FALSE"/>
        </launch>
        """)
    write(tmp_path / "sub.launch.xml", """
        <launch>
          <arg name="who"/>
          <let name="from_sub" value="sub-$(var who)"/>
          <node pkg="testpkg" exec="talker" name="$(var who)_helper" namespace="/abs"/>
        </launch>
        """)
    talker = str(prefix / "lib/testpkg/talker")
    nodes = load(main, {"hz": "5"}, env)
    assert [n.cmd for n in nodes] == [
        [talker, "--mode", "a b", "arm", "--ros-args", "-r", "__node:=driver", "-r", "__ns:=/arm",
         "-p", "rate:=10", "--params-file", str(prefix / "share/testpkg/params.yaml"),
         "-r", "joint_states:=/arm/joint_states"],
        [talker, "--ros-args", "-r", "__node:=camera", "-r", "__ns:=/cam"],
        [talker, "--ros-args", "-r", "__node:=lcam", "-r", "__ns:=/cam/left/x"],
        [talker, "--ros-args", "-r", "__node:=arm_helper", "-r", "__ns:=/abs"],
        [talker, "yes", "sub-arm", "--ros-args"],
    ]
    assert [n.label for n in nodes] == ["driver", "camera", "lcam", "arm_helper", "talker"]
    assert [n.env["LAUNCH_TEST"] for n in nodes] == ["arm", "inner", "inner", "arm", "arm"]
    assert [n.output for n in nodes] == ["log", "screen", "log", "log", "log"]

    nodes = load(main, {"hz": "5", "sim": "False", "robot": "ur5"}, env)
    assert nodes[0].cmd == [talker, "--ros-args", "-r", "__node:=real"]
    assert nodes[-2].cmd[-1] == "__ns:=/abs" and nodes[-2].label == "ur5_helper"


@pytest.mark.parametrize("body, line, words", [
    ('<arg name="a" default="1"/>\n  <nodee pkg="testpkg" exec="talker"/>', 3, ["unknown tag <nodee>"]),
    ('<node pkg="testpkg" exec="talker">\n    <param name="a" valu="1"/>\n  </node>', 3,
     ["unknown attribute 'valu'", "<param>"]),
    ('<group if="false">\n\n    <node pkg="testpkg" exec="talker" nmae="x"/>\n  </group>', 4,
     ["unknown attribute 'nmae'"]),  # checked before anything runs, as in ros2 launch
    ('<let name="a" value="$(optenv X)"/>', 2, ["unknown substitution $(optenv)"]),
    ('<let name="a" value="1"/>\n  <let name="b" value="2" if="yes"/>', 3, ["if='yes'"]),
    ('<let name="a" value="$(env ROBOLEARN_SURELY_UNSET)"/>', 2, ["ROBOLEARN_SURELY_UNSET is not set"]),
    ('<let name="a" value="$(eval \'open(\\\'x\\\')\')"/>', 2, ["$(eval", "NameError"]),
    ('<node pkg="robolearn" exec="no_such_node"/>', 2, ["exec='no_such_node'", "robolearn/ros/no_such_node.py"]),
    ('<node pkg="testpkg" exec="nope"/>', 2, ["pkg='testpkg' exec='nope'", "lib/testpkg/nope"]),
])
def test_errors_name_file_and_line(tmp_path, env, body, line, words):
    path = write(tmp_path / "bad.launch.xml", f"<launch>\n  {body}\n</launch>\n")
    with pytest.raises(LaunchError) as err:
        load(path, {}, env)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: ") and "\n" not in message
    assert all(word in message for word in words), message


def test_malformed_xml_and_missing_argument_are_one_line_cli_errors(tmp_path, env):
    bad = write(tmp_path / "bad.launch.xml", '<launch>\n  <node pkg="a" exec="b">\n</launch>\n')
    proc = launch_cli(bad, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{bad}:3: malformed XML" in proc.stderr

    needs = write(tmp_path / "needs.launch.xml",
                  '<launch>\n  <arg name="robot_ip" description="arm address"/>\n</launch>\n')
    proc = launch_cli(needs, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{needs}:2: missing required argument 'robot_ip' (arm address)" in proc.stderr
    assert launch_cli(needs, "robot_ip:=10.0.0.2", env=env).returncode == 0  # no node: nothing to run

    outer = write(tmp_path / "outer.launch.xml", f'<launch>\n  <include file="{needs}"/>\n</launch>\n')
    proc = launch_cli(outer, "robot_ip:=1", env=env)  # as ROS 2: an include must pass it
    assert proc.returncode == 2 and "missing required argument 'robot_ip'" in proc.stderr


def test_eval_and_env_substitutions(tmp_path, env):
    path = write(tmp_path / "subst.launch.xml", """
        <launch>
          <arg name="scale" default="3"/>
          <let name="v" value="$(eval 'math.sqrt(16) + pi * 0 + max(1, $(var scale))')"/>
          <let name="sim" value="$(eval '&quot;$(var scale)&quot; == &quot;3&quot;')"/>
          <node pkg="testpkg" exec="talker" if="$(var sim)"
                args="$(var v) $(env ROBOLEARN_UNSET_X fallback) $(env ROBOLEARN_SET_X) $(var nope dflt)"/>
        </launch>
        """)
    env = dict(env, ROBOLEARN_SET_X="from env")
    env.pop("ROBOLEARN_UNSET_X", None)
    (node,) = load(path, {}, env)
    assert node.cmd[1:6] == ["7.0", "fallback", "from env", "dflt", "--ros-args"]
    assert load(path, {"scale": "4"}, env) == []  # sim is "False"


def test_on_exit_shutdown_stops_the_others_with_its_status(tmp_path, env):
    ready = tmp_path / "worker.pid"
    path = write(tmp_path / "shutdown.launch.xml", f"""
        <launch>
          <node pkg="testpkg" exec="talker" name="worker" output="screen" args="--pidfile {ready}"/>
          <node pkg="testpkg" exec="talker" name="boss" output="screen" args="--wait-for {ready} --exit 3"
                on_exit="shutdown"/>
        </launch>
        """)
    proc = launch_cli(path, env=env)
    assert proc.returncode == 3, proc.stderr
    out = proc.stdout.splitlines()
    assert f"[worker] argv --pidfile {ready} --ros-args -r __node:=worker" in out
    assert f"[boss] argv --wait-for {ready} --exit 3 --ros-args -r __node:=boss" in out
    assert "[boss] to stderr" in proc.stderr.splitlines()
    assert_gone(int(ready.read_text()))


def test_sigint_stops_every_node_and_its_children(tmp_path, env):
    a, b = tmp_path / "a.pid", tmp_path / "b.pid"
    path = write(tmp_path / "two.launch.xml", f"""
        <launch>
          <node pkg="testpkg" exec="talker" name="a" args="--pidfile {a}"/>
          <node pkg="testpkg" exec="talker" name="b" sigterm_timeout="1"
                args="--pidfile {b} --ignore-sigint --child"/>
        </launch>
        """)
    launcher = subprocess.Popen([*ROBOLEARN, "launch", str(path)], env=dict(env, ROS_LOG_DIR=str(tmp_path / "logs")),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (a.exists() and b.exists()) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p) for f in (a, b) for p in f.read_text().split()]
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 130, err
    assert "b: still running, sending SIGTERM" in err and "a: still running" not in err
    for pid in pids:
        assert_gone(pid)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").rglob("*.log")}
    assert f"argv --pidfile {a} --ros-args -r __node:=a" in logs["a.log"]  # output="log" (default): stdout to file
    assert "[a] to stderr" in err and "[a] argv" not in out  # and stderr to the screen too


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def assert_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), f"pid {pid} outlived the launcher"


def test_real_rclpy_node_reads_the_generated_ros_args(tmp_path, prefix, env):
    pytest.importorskip("rclpy")
    make_executable(prefix / "lib/testpkg/listener", """
        import sys, rclpy
        from rclpy.node import Node
        rclpy.init(args=sys.argv)
        node = Node("unnamed", automatically_declare_parameters_from_overrides=True)
        print(node.get_fully_qualified_name(), node.get_parameter("gain").value, node.get_parameter("rate").value,
              node.resolve_topic_name("chatter"), repr(node.get_parameter("empty").value))
        node.destroy_node()
        rclpy.shutdown()
        """)
    path = write(tmp_path / "rclpy.launch.xml", """
        <launch>
          <push-ros-namespace namespace="robot"/>
          <node pkg="testpkg" exec="listener" name="listener" output="screen" on_exit="shutdown">
            <param from="$(find-pkg-share testpkg)/params.yaml"/>
            <param name="rate" value="10"/>
            <param name="empty" value=""/>
            <remap from="chatter" to="cmd"/>
          </node>
        </launch>
        """)
    proc = launch_cli(path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "[listener] /robot/listener 2.5 10 /robot/cmd ''" in proc.stdout.splitlines()  # '' reaches it as ""


def test_ament_install_layout_is_found_through_ament_prefix_path(tmp_path, prefix, env):
    install = tmp_path / "install"
    proc = subprocess.run([*ROBOLEARN, "ament-install", str(install)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    env = dict(env, AMENT_PREFIX_PATH=os.pathsep.join([str(prefix), str(install)]))
    share = package_share("robolearn", env)
    assert share == install / "share/robolearn"
    assert (share / "package.xml").read_text() == (SOURCE_ROOT / "package.xml").read_text()
    for src in (SOURCE_ROOT / "launch").glob("*.*"):
        if src.suffix in (".xml", ".yaml"):
            assert (share / "launch" / src.name).read_bytes() == src.read_bytes()
    for exe in EXECUTABLES:
        script = package_executable("robolearn", exe, env)
        assert script == install / "lib/robolearn" / exe and os.access(script, os.X_OK)
        assert script.read_text().splitlines()[:3] == [f"#!{sys.executable}", "import sys",
                                                       f"from robolearn.ros.{exe} import main"]
    assert package_share("robolearn", {}) == SOURCE_ROOT and (SOURCE_ROOT / "launch").is_dir()

    package = ET.parse(SOURCE_ROOT / "package.xml").getroot()
    version = tomllib.loads((SOURCE_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert package.get("format") == "3" and package.findtext("name") == "robolearn"
    assert package.findtext("export/build_type") == "ament_python" and package.findtext("version") == version

    # `robolearn launch PKG FILE`, as `ros2 launch`, finds FILE anywhere under share/PKG
    write(prefix / "share/testpkg/launch/demo.launch.xml", '<launch><node pkg="testpkg" exec="talker"/></launch>')
    proc = launch_cli("testpkg", "demo.launch.xml", "--print", env=env)
    assert proc.returncode == 0 and proc.stdout == f"[talker] {prefix / 'lib/testpkg/talker'} --ros-args\n"


@pytest.mark.parametrize("launch_file", sorted(p.name for p in (SOURCE_ROOT / "launch").glob("*.launch.xml")))
def test_shipped_launch_files_set_only_parameters_their_nodes_declare(launch_file):
    """Every -p NAME and every key of a params file a shipped launch file passes is a parameter of that node
    (a typo would otherwise be ignored or warned about at run time, far from the file)."""
    import importlib

    import yaml

    from robolearn.launch_xml import load

    for spec in load(SOURCE_ROOT / "launch" / launch_file, {"checkpoint": "ckpt", "out": "out"}):
        module = spec.cmd[spec.cmd.index("-m") + 1]
        declared = set(importlib.import_module(module).PARAMS) | {"use_sim_time"}
        given = [spec.cmd[i + 1].split(":=")[0] for i, a in enumerate(spec.cmd) if a == "-p"]
        for i, a in enumerate(spec.cmd):
            if a == "--params-file":
                given += list(yaml.safe_load(open(spec.cmd[i + 1]))["/**"]["ros__parameters"])
        empty = [spec.cmd[i + 1] for i, a in enumerate(spec.cmd) if a == "-p" and spec.cmd[i + 1].endswith(":=")]
        assert not empty, f"{launch_file}: rcl refuses an empty -p value: {empty}"
        unknown = sorted(set(given) - declared)
        assert not unknown, f"{launch_file} ({spec.where}): {module} has no parameter(s) {unknown}"
